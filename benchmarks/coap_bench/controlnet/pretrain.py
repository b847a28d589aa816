"""The frozen UNet of a ControlNet run: trained briefly on the same images once, cached, then loaded by every run.

ControlNet is trained on top of a denoiser that already works. :func:`frozen_unet` gives that
denoiser for a preset: a ``UNet2DConditionModel`` trained with the DDPM objective (AdamW, linear
warm-up then cosine decay, no control) for ``pretrain_steps`` steps, from the UNet seed, on the
training images with the fixed prompt. Every draw comes from that seed, so the same options give the
same weights on the same machine; the weights are saved to
``<cache_dir>/controlnet/unet-<preset>-<key>.pt`` (``cache_dir`` default ``$COAP_TORCH_CACHE`` or
``~/.cache/coap-torch``), where ``key`` hashes everything the training depended on, and loaded from
there by the next call. A user's own UNet (``pretrained``, a diffusers ``save_pretrained`` folder)
replaces the training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..ddpm.data import ImageBatches
from ..ddpm.model import noise_scheduler
from ..ddpm.presets import SCHEDULER_CONFIG
from ..images import ImageData
from ..runner import atomic_save, unreadable_checkpoint
from ..text import default_cache_dir, remove_stale_temporaries
from ..training import TrainingLoop
from .model import PROMPT_SEED, build_unet, denoising_loss
from .presets import CONTROLNET_PRESETS, ControlNetConfig

__all__ = ["FrozenUnet", "frozen_unet", "load_frozen_unet", "state_sha256"]

#: Bumped when the pretraining changes in a way its options do not show: older cache files are then unused.
_CACHE_FORMAT = 1
#: Offset between the UNet seed and the seed of its training batches.
_BATCH_STREAM = 2**32
#: Peak lr of the pretraining warm-up, as a share of its steps.
_WARMUP_SHARE = 0.05


@dataclass(frozen=True)
class FrozenUnet:
    """Where a run finds its frozen UNet (a cache file, or a ``pretrained`` folder) and what identifies it."""

    path: str
    sha256: str
    source: str  # "pretrained here", "cache", or "user"
    steps: int
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "source": self.source, "steps": self.steps, "seed": self.seed}


def state_sha256(model: nn.Module) -> str:
    """sha256 of ``model``'s state dict (names and float32 values, in order): what checkpoints must match."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_key(config: ControlNetConfig, data: ImageData, unet_seed: int) -> dict[str, Any]:
    preset = CONTROLNET_PRESETS[config.preset]
    return json.loads(
        json.dumps(
            {
                "format": _CACHE_FORMAT,
                "unet": preset.unet_config(),
                "steps": config.pretrain_steps,
                "lr": preset.pretrain_lr,
                "batch_size": preset.batch_size,
                "seed": unet_seed,
                "prompt_seed": PROMPT_SEED,
                "scheduler": SCHEDULER_CONFIG,
                "train_sha256": data.describe()["train_sha256"],
            }
        )
    )


def _cache_file(config: ControlNetConfig, key: dict[str, Any]) -> Path:
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / "controlnet" / f"unet-{config.preset}-{digest}.pt"


def load_frozen_unet(frozen: FrozenUnet, config: ControlNetConfig, device: torch.device | str) -> nn.Module:
    """The frozen UNet of ``frozen`` on ``device``, in eval mode, with no parameter requiring a gradient."""
    path = Path(frozen.path)
    if path.is_dir():
        diffusers = require("diffusers", names=("UNet2DConditionModel",))
        unet = diffusers.UNet2DConditionModel.from_pretrained(path)
    else:
        unet = build_unet(config.preset, seed=frozen.seed)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            unet.load_state_dict(saved["model"])
        except Exception as error:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
            raise unreadable_checkpoint(path, error) from None
    unet.requires_grad_(False)
    return unet.to(device).eval()


def frozen_unet(config: ControlNetConfig, data: ImageData, *, unet_seed: int = 0) -> FrozenUnet:
    """The frozen UNet of ``config``: the user's ``pretrained`` folder, the cached one, or one trained now (and
    cached) for ``config.pretrain_steps`` steps from ``unet_seed``."""
    if config.pretrained:
        folder = Path(config.pretrained).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"--pretrained {config.pretrained}: not a diffusers UNet2DConditionModel folder (no config.json)"
            )
        unet = load_frozen_unet(FrozenUnet(str(folder), "", "user", 0, unet_seed), config, "cpu")
        _check_matches_preset(unet, config)
        return FrozenUnet(str(folder), state_sha256(unet), "user", 0, unet_seed)
    key = _cache_key(config, data, unet_seed)
    path = _cache_file(config, key)
    remove_stale_temporaries(path, older_than_s=600)  # another process may be writing it now
    source = "cache"
    if not path.is_file():
        _pretrain(config, data, unet_seed, key, path)
        source = "pretrained here"
    unet = load_frozen_unet(FrozenUnet(str(path), "", source, config.pretrain_steps, unet_seed), config, "cpu")
    return FrozenUnet(str(path), state_sha256(unet), source, config.pretrain_steps, unet_seed)


def _check_matches_preset(unet: nn.Module, config: ControlNetConfig) -> None:
    """Raise :class:`ValueError` unless a user's UNet takes the preset's images and prompt."""
    preset = CONTROLNET_PRESETS[config.preset]
    wanted = {
        "sample_size": preset.resolution,
        "in_channels": preset.channels,
        "cross_attention_dim": preset.prompt_dim,
    }
    wrong = [
        f"{key} {unet.config[key]!r} (the preset's {value!r})"
        for key, value in wanted.items()
        if unet.config[key] != value
    ]
    if wrong:
        raise ValueError(
            f"--pretrained {config.pretrained}: this UNet does not fit the {config.preset} preset: {', '.join(wrong)}"
        )


def _pretrain(config: ControlNetConfig, data: ImageData, unet_seed: int, key: dict[str, Any], path: Path) -> None:
    """Train the UNet of ``config``'s preset without control (AdamW, the training loop of every run) and save it."""
    preset = CONTROLNET_PRESETS[config.preset]
    device = torch.device(config.device)
    unet = build_unet(preset, seed=unet_seed, device=device)
    unet.train()
    scheduler = noise_scheduler()
    batches = ImageBatches(
        data.train, preset.batch_size, scheduler.config.num_train_timesteps, seed=unet_seed + _BATCH_STREAM
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.pretrain_lr, weight_decay=0.0)
    steps = max(1, config.pretrain_steps)
    schedule = SimpleNamespace(
        steps=steps,
        warmup_steps=min(max(1, int(steps * _WARMUP_SHARE)), steps - 1),
        checkpoint_every=steps,
        stop_after=None,
        progress=config.progress,
    )
    loop = TrainingLoop(
        unet,
        optimizer,
        batches,
        lambda batch: denoising_loss(unet, None, scheduler, preset, *batch),
        config=schedule,
        device=device,
        label=f"frozen UNet ({config.preset}, once)",
        next_batch=lambda: tuple(t.to(device) for t in batches.next()),
    )
    if config.pretrain_steps:
        loop.run()
    state = {name: tensor.detach().cpu() for name, tensor in unet.state_dict().items()}
    atomic_save({"key": key, "model": state, "losses": loop.losses}, path)
