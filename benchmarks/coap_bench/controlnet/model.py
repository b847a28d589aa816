"""The ControlNet model: the frozen UNet of a preset, its prompt, the ControlNet made from it, the loss,
held-out evaluation and controlled sampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._deps import require
from ..ddpm.data import HeldoutSet
from ..ddpm.presets import SCHEDULER_CONFIG
from ..training import heldout_mean, sample_in_chunks
from .data import edge_map
from .presets import CONTROLNET_PRESETS, ControlNetPreset

__all__ = [
    "PROMPT_SEED",
    "build_controlnet",
    "build_unet",
    "denoising_loss",
    "evaluate_heldout",
    "generate_samples",
    "predict_noise",
    "prompt_embedding",
]

#: Seed of the prompt embedding: fixed, so that every run and every ``--seed`` sees the same prompt.
PROMPT_SEED = 4321


def _diffusers() -> Any:
    return require("diffusers", names=("UNet2DConditionModel", "ControlNetModel", "DDIMScheduler"))


def _preset(preset: ControlNetPreset | str) -> ControlNetPreset:
    return CONTROLNET_PRESETS[preset] if isinstance(preset, str) else preset


def build_unet(preset: ControlNetPreset | str, *, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """``diffusers.UNet2DConditionModel`` of ``preset``, initialised from ``seed`` without touching the global
    RNG (on ``meta``: shapes only).

    >>> build_unet("micro", device="meta").config.sample_size
    8
    """
    preset = _preset(preset)
    diffusers = _diffusers()
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return diffusers.UNet2DConditionModel(**preset.unet_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = diffusers.UNet2DConditionModel(**preset.unet_config())
    return model.to(device)


def build_controlnet(unet: nn.Module, preset: ControlNetPreset | str, *, seed: int = 0) -> nn.Module:
    """``ControlNetModel.from_unet(unet)``: a copy of the UNet's encoder and middle block, the control encoder
    (``preset.conditioning_channels``) drawn from ``seed``, and zero convolutions, so that it starts by changing
    nothing. On ``unet``'s device; the global RNG is left alone."""
    preset = _preset(preset)
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = _diffusers().ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=preset.conditioning_channels,
            conditioning_channels=1,
            load_weights_from_unet=device.type != "meta",
        )
    return controlnet if device.type == "meta" else controlnet.to(device)


def prompt_embedding(preset: ControlNetPreset | str, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """The prompt every image is trained and sampled with, ``(batch, 1, cross_attention_dim)``: one fixed
    unit-variance vector (:data:`PROMPT_SEED`), the stand-in for a frozen text encoder's empty prompt (the
    ControlNet recipe trains with empty prompts so that the control alone must say what to draw)."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    vector = torch.randn(1, 1, _preset(preset).prompt_dim, generator=generator)
    return vector.expand(batch, 1, -1).to(device)


def predict_noise(
    unet: nn.Module, controlnet: nn.Module | None, noisy: Tensor, timesteps: Tensor, prompt: Tensor, control: Tensor
) -> Tensor:
    """The UNet's noise prediction, with the ControlNet's residuals added to its skip connections and middle
    block (none without ``controlnet``: the frozen UNet alone)."""
    residuals: dict[str, Any] = {}
    if controlnet is not None:
        down, mid = controlnet(noisy, timesteps, prompt, controlnet_cond=control, return_dict=False)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(noisy, timesteps, prompt, **residuals).sample


def denoising_loss(
    unet: nn.Module,
    controlnet: nn.Module | None,
    scheduler: Any,
    preset: ControlNetPreset,
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """The ControlNet objective: MSE of the predicted noise on ``add_noise(x0, noise, t)``, controlled by the
    edge map of ``x0``."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    control = edge_map(x0, preset.edge_threshold)
    prompt = prompt_embedding(preset, len(x0), x0.device)
    prediction = predict_noise(unet, controlnet, noisy, timesteps, prompt, control)
    return F.mse_loss(prediction.float(), noise.float(), reduction=reduction)


def evaluate_heldout(
    unet: nn.Module,
    controlnet: nn.Module | None,
    scheduler: Any,
    preset: ControlNetPreset,
    heldout: HeldoutSet,
    batch_size: int,
) -> float:
    """Mean squared error of the predicted noise on ``heldout``, each image controlled by its own edge map (eval
    mode, chunks of ``batch_size``); without ``controlnet``, the frozen UNet's own figure."""
    device = next(unet.parameters()).device

    def summed(chunk: slice) -> Tensor:
        return denoising_loss(unet, controlnet, scheduler, preset, *heldout.batch(chunk, device), reduction="sum")

    model = controlnet if controlnet is not None else unet
    return heldout_mean(model, len(heldout.images), batch_size, summed, heldout.images.numel())


def generate_samples(
    unet: nn.Module,
    controlnet: nn.Module | None,
    preset: ControlNetPreset,
    control: Tensor,
    *,
    steps: int,
    seed: int,
    batch_size: int = 256,
    progress: Any = None,
) -> Tensor:
    """One image per control map of ``control`` (``(N, 1, H, W)``), sampled with DDIM (eta 0) in ``steps`` steps
    from noise seeded with ``seed`` (CPU, ``[-1, 1]``); ``progress`` (a tqdm bar) is advanced per step."""
    scheduler = _diffusers().DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    parameter = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)
    shape = (preset.channels, preset.resolution, preset.resolution)

    def sample(chunk: slice) -> Tensor:
        cond = control[chunk].to(parameter.device, parameter.dtype)
        x = torch.randn((len(cond), *shape), generator=generator).to(parameter.device, parameter.dtype)
        prompt = prompt_embedding(preset, len(cond), parameter.device).to(parameter.dtype)
        for t in scheduler.timesteps:
            eps = predict_noise(unet, controlnet, x, t.to(parameter.device), prompt, cond)
            x = scheduler.step(eps, t, x).prev_sample
            if progress is not None:
                progress.update(1)
        return x

    return sample_in_chunks(controlnet if controlnet is not None else unet, len(control), batch_size, sample)
