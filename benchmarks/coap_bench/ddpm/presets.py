"""The presets and recipes of ``coap-bench ddpm``, and the options of one run (:class:`DdpmConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..config import ImageRunConfig, check_choice, override_settings
from ..frechet import CLASSIFIER_STEPS
from ..optimizers import LowRankSettings

__all__ = [
    "DDPM_PRESETS",
    "DDPM_RECIPES",
    "DEFAULT_DDPM_OPTIMIZERS",
    "DdpmConfig",
    "DdpmPreset",
    "meta_unet",
    "recipe_settings",
]


@dataclass(frozen=True)
class DdpmPreset:
    """A ``UNet2DModel`` configuration with the run defaults that go with it.

    ``unet`` holds the ``UNet2DModel`` keyword arguments beyond resolution and channels.
    ``lr``, ``batch_size``, ``steps``, ``samples``, ``sampler``, ``sample_steps`` and
    ``heldout_repeats`` are the defaults of a run with this preset.
    """

    resolution: int
    channels: int
    unet: dict[str, Any]
    lr: float
    batch_size: int
    steps: int
    samples: int
    sampler: str = "ddim"
    sample_steps: int = 50
    heldout_repeats: int = 1
    eval_batch_size: int = 256
    notes: str = ""

    def unet_config(self) -> dict[str, Any]:
        """The keyword arguments of ``diffusers.UNet2DModel``."""
        return {
            "sample_size": self.resolution,
            "in_channels": self.channels,
            "out_channels": self.channels,
            **self.unet,
        }

    def num_parameters(self) -> int:
        """Parameter count, from a model built on the meta device (no memory, no weights)."""
        return sum(p.numel() for p in meta_unet(self).parameters())


#: The DDPM CIFAR-10 UNet (Ho et al., 2020), as ``google/ddpm-cifar10-32`` configures it in diffusers:
#: 35.7M parameters, attention at 16x16, dropout 0.1 as in DDPM's CIFAR-10 training.
CIFAR10_UNET = {
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "dropout": 0.1,
}

#: Presets of ``coap-bench ddpm``.
DDPM_PRESETS: dict[str, DdpmPreset] = {
    "micro": DdpmPreset(
        8,
        1,
        {
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        },
        lr=1e-3,
        batch_size=16,
        steps=20,
        samples=32,
        sample_steps=4,
        eval_batch_size=128,
        notes="smoke tests only: 8x8, a few seconds on a CPU",
    ),
    "small": DdpmPreset(
        16,
        1,
        {
            "block_out_channels": (24, 32, 64),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        },
        lr=6e-3,
        batch_size=32,
        steps=500,
        samples=256,
        sample_steps=50,
        heldout_repeats=4,
        notes="the default: 16x16 grayscale, 742K parameters, a few minutes per optimizer on 2 CPU cores",
    ),
    "cifar10": DdpmPreset(
        32,
        3,
        CIFAR10_UNET,
        lr=2e-4,
        batch_size=128,
        steps=800_000,
        samples=10_000,
        sample_steps=100,
        eval_batch_size=500,
        notes="the paper's DDPM CIFAR-10 UNet (35.7M parameters), for GPU runs",
    ),
}
#: What ``coap-bench ddpm`` compares by default: the AdamW block of the paper's Table 2.
DEFAULT_DDPM_OPTIMIZERS = ("adamw", "coap_adamw", "galore_adamw")
#: The paper's DDPM CIFAR-10 settings (supplementary Tables 1 and 2).
PAPER_RANK_RATIO = 1.5
PAPER_UPDATE_INTERVAL = 16
PAPER_REPROJECT_FACTOR = 10
#: GaLore's / APOLLO's ``update_proj_gap`` in both recipes (GaLore's default).
PROJ_GAP = 200
#: The library defaults, for ``drop-in``.
DROP_IN_RANK_RATIO = 2.0
#: The noise schedule of DDPM (and of ``google/ddpm-cifar10-32``): 1000 linear betas, fixed_large variance.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
}
DDPM_VARIANCE = "fixed_large"
#: The low-rank settings of each recipe of ``--recipe``, before the flags that override them.
_RECIPE_SETTINGS = {
    "paper": LowRankSettings(
        rank_ratio=PAPER_RANK_RATIO,
        update_interval=PAPER_UPDATE_INTERVAL,
        reproject_factor=PAPER_REPROJECT_FACTOR,
        scale=1.0,
        proj_gap=PROJ_GAP,
        weight_decay=0.0,
    ),
    "drop-in": LowRankSettings(rank_ratio=DROP_IN_RANK_RATIO, proj_gap=PROJ_GAP, weight_decay=0.0),
}
#: The recipes of ``--recipe``.
DDPM_RECIPES = tuple(_RECIPE_SETTINGS)


@dataclass
class DdpmConfig(ImageRunConfig):
    """Options of one ``coap-bench ddpm`` run (the command-line flags, same names).

    Options left ``None`` take their defaults from the preset and recipe (:meth:`resolved`);
    ``lr`` set applies to every optimizer. ``isolate`` (default: on the CPU) runs each optimizer
    in a fresh process; ``threads`` sets ``torch.set_num_threads`` for the runs (default: torch's
    choice). ``stop_after`` ends each optimizer's run after that many steps of this
    call (checkpointing as usual): it simulates an interrupted run. ``plots`` is where the sample
    grid of each run is written (with matplotlib installed).
    """

    presets = DDPM_PRESETS
    preset_kind = "DDPM"
    recipes = DDPM_RECIPES

    preset: str = "small"
    optimizers: tuple[str, ...] = DEFAULT_DDPM_OPTIMIZERS
    correlation_normalize: bool = False
    projection_side: str | None = None
    conv_projection: str | None = None
    image_dir: str | None = None
    cifar10: bool = False
    max_images: int | None = None
    sampler: str | None = None
    classifier_steps: int = CLASSIFIER_STEPS
    fid: bool = False
    #: ``"ddp"`` or ``"fsdp2"``: a ``torchrun`` job (see :mod:`coap_bench.ddpm.distributed`).
    distributed: str | None = None

    def job_defaults(self) -> dict[str, Any]:
        if self.image_dir and self.cifar10:
            raise ValueError("image_dir and cifar10 are two different datasets: give one of them")
        sampler = self.sampler or self.preset_spec.sampler
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        return {**super().job_defaults(), "sampler": sampler}

    def recipe_defaults(self) -> LowRankSettings:
        return recipe_settings(self.recipe)


def recipe_settings(recipe: str, **options: Any) -> LowRankSettings:
    """The low-rank settings of ``recipe`` (``"paper"`` or ``"drop-in"``); any option given (a field of
    :class:`~coap_bench.optimizers.LowRankSettings`) overrides it.

    >>> s = recipe_settings("paper")
    >>> (s.rank_ratio, s.update_interval, s.reproject_factor, s.scale)
    (1.5, 16, 10, 1.0)
    """
    check_choice(recipe, DDPM_RECIPES, "recipe")
    return override_settings(_RECIPE_SETTINGS[recipe], **options)


def meta_unet(preset: DdpmPreset) -> nn.Module:
    """``preset``'s ``diffusers.UNet2DModel`` on the meta device: shapes only, no memory, no weights."""
    diffusers = require("diffusers", names=("UNet2DModel",))
    with torch.device("meta"):
        return diffusers.UNet2DModel(**preset.unet_config())
