"""The presets and recipes of ``coap-bench ddpm``, and the options of one run (:class:`DdpmConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..frechet import CLASSIFIER_STEPS
from ..optimizers import OPTIMIZERS, PROJECTION_SIDES, STATE_DTYPES, LowRankSettings

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
#: The recipes of ``--recipe``.
DDPM_RECIPES = ("paper", "drop-in")
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


@dataclass
class DdpmConfig:
    """Options of one ``coap-bench ddpm`` run (the command-line flags, same names).

    Options left ``None`` take their defaults from the preset and recipe (:meth:`resolved`);
    ``lr`` set applies to every optimizer. ``isolate`` (default: on the CPU) runs each optimizer
    in a fresh process; ``threads`` sets ``torch.set_num_threads`` for the runs (default: torch's
    choice). ``stop_after`` ends each optimizer's run after that many steps of this
    call (checkpointing as usual): it simulates an interrupted run. ``plots`` is where the sample
    grid of each run is written (with matplotlib installed).
    """

    preset: str = "small"
    steps: int | None = None
    batch_size: int | None = None
    optimizers: tuple[str, ...] = DEFAULT_DDPM_OPTIMIZERS
    recipe: str = "paper"
    rank_ratio: float | None = None
    update_interval: int | None = None
    reproject_factor: int | None = None
    scale: float | str | None = None
    proj_gap: int | None = None
    correlation_normalize: bool = False
    projection_side: str | None = None
    conv_projection: str | None = None
    state_dtype: str = "float32"
    weight_decay: float = 0.0
    lr: float | None = None
    lr_sweep: bool = False
    warmup_steps: int | None = None
    image_dir: str | None = None
    cifar10: bool = False
    max_images: int | None = None
    samples: int | None = None
    sampler: str | None = None
    sample_steps: int | None = None
    heldout_repeats: int | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None
    classifier_steps: int = CLASSIFIER_STEPS
    fid: bool = False
    seed: int = 0
    seeds: int = 1
    device: str = "cpu"
    threads: int | None = None
    isolate: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    stop_after: int | None = None
    plots: str | None = None
    progress: bool = True
    #: ``"ddp"`` or ``"fsdp2"``: a ``torchrun`` job (see :mod:`coap_bench.ddpm.distributed`).
    distributed: str | None = None
    argv: list[str] = field(default_factory=list)

    def resolved(self) -> DdpmConfig:
        """A copy with every ``None`` default filled in; raises :class:`ValueError` on bad options."""
        if self.preset not in DDPM_PRESETS:
            raise ValueError(f"unknown DDPM preset {self.preset!r}; choose from {', '.join(DDPM_PRESETS)}")
        if self.recipe not in DDPM_RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(DDPM_RECIPES)}")
        if not self.optimizers:
            raise ValueError("no optimizer to run")
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown))}; known: {', '.join(OPTIMIZERS)}")
        if self.rank_ratio is not None and self.rank_ratio < 1:
            raise ValueError(f"rank_ratio must be >= 1, got {self.rank_ratio}")
        if self.projection_side is not None and self.projection_side not in PROJECTION_SIDES:
            raise ValueError(
                f"unknown projection_side {self.projection_side!r}; choose from {', '.join(PROJECTION_SIDES)}"
            )
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"unknown state_dtype {self.state_dtype!r}; choose from {', '.join(STATE_DTYPES)}")
        if self.image_dir and self.cifar10:
            raise ValueError("image_dir and cifar10 are two different datasets: give one of them")
        preset = DDPM_PRESETS[self.preset]
        steps = self.steps if self.steps is not None else preset.steps
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
        sampler = self.sampler or preset.sampler
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        samples = self.samples if self.samples is not None else preset.samples
        if samples < 2:
            raise ValueError(f"samples must be at least 2 (a covariance needs two), got {samples}")
        warmup = self.warmup_steps if self.warmup_steps is not None else min(max(1, steps // 10), steps - 1)
        if warmup >= steps and warmup > 0:
            raise ValueError(f"warmup_steps ({warmup}) must be smaller than steps ({steps})")
        return dataclasses.replace(
            self,
            steps=steps,
            batch_size=self.batch_size or preset.batch_size,
            optimizers=tuple(self.optimizers),
            warmup_steps=warmup,
            samples=samples,
            sampler=sampler,
            sample_steps=self.sample_steps or preset.sample_steps,
            heldout_repeats=self.heldout_repeats or preset.heldout_repeats,
            eval_batch_size=self.eval_batch_size or preset.eval_batch_size,
            isolate=torch.device(self.device).type == "cpu" if self.isolate is None else self.isolate,
        )

    def settings(self) -> LowRankSettings:
        """The :class:`~coap_bench.optimizers.LowRankSettings` of this run (recipe + overrides)."""
        return recipe_settings(
            self.recipe,
            rank_ratio=self.rank_ratio,
            update_interval=self.update_interval,
            reproject_factor=self.reproject_factor,
            scale=self.scale,
            proj_gap=self.proj_gap,
            correlation_normalize=self.correlation_normalize,
            projection_side=self.projection_side,
            conv_projection=self.conv_projection,
            state_dtype=self.state_dtype,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )

    def lr_for(self, name: str) -> float:
        """The peak lr of optimizer ``name``: ``lr`` if given, else the preset's (the same for every optimizer)."""
        return self.lr if self.lr is not None else DDPM_PRESETS[self.preset].lr


def recipe_settings(
    recipe: str,
    *,
    rank_ratio: float | None = None,
    update_interval: int | None = None,
    reproject_factor: int | None = None,
    scale: float | str | None = None,
    proj_gap: int | None = None,
    correlation_normalize: bool = False,
    projection_side: str | None = None,
    conv_projection: str | None = None,
    state_dtype: str = "float32",
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LowRankSettings:
    """The low-rank settings of ``recipe`` (``"paper"`` or ``"drop-in"``); any argument given overrides it.

    >>> s = recipe_settings("paper")
    >>> (s.rank_ratio, s.update_interval, s.reproject_factor, s.scale)
    (1.5, 16, 10, 1.0)
    """
    if recipe == "paper":
        base = LowRankSettings(
            rank_ratio=PAPER_RANK_RATIO,
            update_interval=PAPER_UPDATE_INTERVAL,
            reproject_factor=PAPER_REPROJECT_FACTOR,
            scale=1.0,
            proj_gap=PROJ_GAP,
        )
    elif recipe == "drop-in":
        base = LowRankSettings(rank_ratio=DROP_IN_RANK_RATIO, proj_gap=PROJ_GAP)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(DDPM_RECIPES)}")
    overrides = {
        "rank_ratio": rank_ratio,
        "update_interval": update_interval,
        "reproject_factor": reproject_factor,
        "scale": scale,
        "proj_gap": proj_gap,
    }
    return dataclasses.replace(
        base,
        **{k: v for k, v in overrides.items() if v is not None},
        correlation_normalize=correlation_normalize,
        projection_side=projection_side,
        conv_projection=conv_projection,
        state_dtype=state_dtype,
        weight_decay=weight_decay,
        seed=seed,
    )


def meta_unet(preset: DdpmPreset) -> nn.Module:
    """``preset``'s ``diffusers.UNet2DModel`` on the meta device: shapes only, no memory, no weights."""
    diffusers = require("diffusers", names=("UNet2DModel",))
    with torch.device("meta"):
        return diffusers.UNet2DModel(**preset.unet_config())
