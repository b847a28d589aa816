"""The DDPM benchmark: a ``diffusers`` ``UNet2DModel`` trained to denoise, once per optimizer.

The model is built from a config (:data:`DDPM_PRESETS`; no weights are downloaded) and trained
with the DDPM objective (Ho et al., 2020): for a clean image ``x0``, a timestep ``t`` and noise
``eps``, the UNet predicts ``eps`` from ``DDPMScheduler.add_noise(x0, eps, t)`` under a mean squared
error. Every optimizer gets the same initial weights, the same images, noise and timesteps in the
same order (:class:`ImageBatches`, seeded from ``seed``) and the same learning-rate schedule
(linear warm-up, then cosine decay to 10% of the peak, :func:`~coap_torch.bench.training.lr_lambda`).

Each run is scored on:

* the **held-out denoising loss**: the same MSE on the held-out images, each with ``repeats``
  fixed ``(t, eps)`` draws (timesteps stratified over ``[0, T)``), drawn once from a fixed seed,
  so it is the same set for every optimizer and every ``--seed`` (:func:`heldout_set`);
* **sample quality**: ``samples`` images generated with DDIM (or DDPM) from seeded noise, scored
  by the Frechet distance of their features in a small classifier trained on the training images
  (:mod:`coap_torch.bench.frechet`; *not* FID: comparable between the optimizers of one run only)
  and, with ``fid``, by real FID on Inception-v3 features against the training images;
* memory and time: optimizer-state bytes (:func:`~coap_torch.utils.optimizer_state_nbytes`),
  the median iteration and ``optimizer.step()`` times, the time of projection refreshes.

Recipes (:func:`recipe_settings`), every parameter handed to the optimizer as ``projected`` (COAP
routes by shape: Tucker-2 for 3x3 kernels of at least ``min_conv_numel`` entries, matrices for
linear / attention / 1x1 weights, dense for the rest; GaLore and APOLLO project 2-D weights only):

* ``paper``: the paper's DDPM CIFAR-10 settings: rank ratio 1.5 for matrices and kernels
  (supplementary Table 2), ``T_u`` 16 and lambda 10 (Table 1, its diffusion rows), update scale 1,
  no weight decay; GaLore's ``update_proj_gap`` is its default 200. The lr is the preset's, the
  same for every optimizer: DDPM's CIFAR-10 lr 2e-4 (Ho et al., 2020, appendix B) for ``cifar10``;
  the CPU presets train a few hundred steps instead of 800K, at 6e-3 (``small``) and 1e-3
  (``micro``). ``small``'s lr is the middle of AdamW's stable range: over seeds 0-2, AdamW's mean
  held-out loss is 0.0318 at 6e-3 and 0.0313 at 8e-3, and it diverged at 1.1e-2 and 1.6e-2 (seed 0), so a
  ``--lr-sweep`` (3e-3, 6e-3, 1.2e-2) brackets its best lr instead of ending at it.
* ``drop-in``: the library defaults (rank ratio 2, ``T_u`` 32, lambda 5) at the same lr.

As in ``coap-bench llama``, each run has a process of its own on the CPU (a crash is a failed
row), and with ``checkpoint_dir`` a run saves everything every ``checkpoint_every`` steps and
continues from there when started again, ending with the numbers of a run that never stopped.

Example, the Python side of ``coap-bench ddpm --preset micro --steps 20 --optimizers adamw,coap_adamw``
(half a minute on a CPU)::

    from coap_torch.bench.ddpm import DdpmConfig, format_ddpm_table, run_ddpm

    run = run_ddpm(DdpmConfig(preset="micro", steps=20, optimizers=("adamw", "coap_adamw")))
    print(format_ddpm_table(run))
    coap = run["results"][1]
    coap["state_ratio_to_adamw"], coap["heldout_loss"], coap["classifier_frechet_distance"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.memory import state_nbytes_by_kind
from ._deps import require
from ._quiet import gather_import_notes, import_note_lines
from .environment import hardware, versions
from .frechet import CLASSIFIER_STEPS, FrechetScorer, frechet_scorer
from .images import ImageData, load_image_data
from .optimizers import OPTIMIZERS, LowRankSettings, build_optimizer
from .report import _number, markdown_table
from .runner import checkpoint_workarounds
from .training import (
    FINAL_LOSS_WINDOW,
    FINAL_LR_FRACTION,
    LR_SWEEP_FACTORS,
    FileCheckpoint,
    TrainingLoop,
    measurement_columns,
    plot_heldout_vs_state,
    result_remarks,
    result_row,
    run_fingerprint,
    run_optimizers,
    run_stem,
    seed_label,
    start_measuring,
)

__all__ = [
    "DDPM_PRESETS",
    "DDPM_RECIPES",
    "DEFAULT_DDPM_OPTIMIZERS",
    "DdpmConfig",
    "DdpmPreset",
    "HeldoutSet",
    "ImageBatches",
    "add_ddpm_parser",
    "build_unet",
    "evaluate_heldout",
    "format_ddpm_table",
    "generate_samples",
    "heldout_set",
    "projection_summary",
    "recipe_settings",
    "run_ddpm",
    "run_ddpm_command",
    "save_sample_grid",
    "train_one",
    "write_ddpm_plots",
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
        return {"sample_size": self.resolution, "in_channels": self.channels, "out_channels": self.channels,
                **self.unet}

    def num_parameters(self) -> int:
        """Parameter count, from a model built on the meta device (no memory, no weights)."""
        return sum(p.numel() for p in build_unet(self, device="meta").parameters())


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
        8, 1,
        {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
         "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
        lr=1e-3, batch_size=16, steps=20, samples=32, sample_steps=4, eval_batch_size=128,
        notes="smoke tests only: 8x8, a few seconds on a CPU",
    ),
    "small": DdpmPreset(
        16, 1,
        {"block_out_channels": (24, 32, 64), "layers_per_block": 1, "norm_num_groups": 8,
         "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
         "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")},
        lr=6e-3, batch_size=32, steps=500, samples=256, sample_steps=50, heldout_repeats=4,
        notes="the default: 16x16 grayscale, 742K parameters, a few minutes per optimizer on 2 CPU cores",
    ),
    "cifar10": DdpmPreset(
        32, 3, CIFAR10_UNET, lr=2e-4, batch_size=128, steps=800_000, samples=10_000, sample_steps=100,
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
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "clip_sample": True}
DDPM_VARIANCE = "fixed_large"
#: Seed of the held-out (t, noise) draws: fixed, so every ``--seed`` is scored on the same set.
HELDOUT_SEED = 1234
#: Number of generated samples drawn in the PNG grid of each run (8 x 8).
GRID_SAMPLES = 64
#: Offsets between ``seed`` and the seeds of the batch stream and of the sampling noise.
_BATCH_STREAM = 2**32
_SAMPLE_STREAM = 2 * 2**32
_CHECKPOINT_FORMAT = 1


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
    scale: float | None = None
    proj_gap: int | None = None
    correlation_normalize: bool = False
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
        """The :class:`~coap_torch.bench.optimizers.LowRankSettings` of this run (recipe + overrides)."""
        return recipe_settings(self.recipe, rank_ratio=self.rank_ratio, update_interval=self.update_interval,
                               reproject_factor=self.reproject_factor, scale=self.scale, proj_gap=self.proj_gap,
                               correlation_normalize=self.correlation_normalize, weight_decay=self.weight_decay,
                               seed=self.seed)

    def lr_for(self, name: str) -> float:
        """The peak lr of optimizer ``name``: ``lr`` if given, else the preset's (the same for every optimizer)."""
        return self.lr if self.lr is not None else DDPM_PRESETS[self.preset].lr


def recipe_settings(recipe: str, *, rank_ratio: float | None = None, update_interval: int | None = None,
                    reproject_factor: int | None = None, scale: float | None = None, proj_gap: int | None = None,
                    correlation_normalize: bool = False, weight_decay: float = 0.0,
                    seed: int = 0) -> LowRankSettings:
    """The low-rank settings of ``recipe`` (``"paper"`` or ``"drop-in"``); any argument given overrides it.

    >>> s = recipe_settings("paper")
    >>> (s.rank_ratio, s.update_interval, s.reproject_factor, s.scale)
    (1.5, 16, 10, 1.0)
    """
    if recipe == "paper":
        base = LowRankSettings(rank_ratio=PAPER_RANK_RATIO, update_interval=PAPER_UPDATE_INTERVAL,
                               reproject_factor=PAPER_REPROJECT_FACTOR, scale=1.0, proj_gap=PROJ_GAP)
    elif recipe == "drop-in":
        base = LowRankSettings(rank_ratio=DROP_IN_RANK_RATIO, proj_gap=PROJ_GAP)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(DDPM_RECIPES)}")
    overrides = {"rank_ratio": rank_ratio, "update_interval": update_interval, "reproject_factor": reproject_factor,
                 "scale": scale, "proj_gap": proj_gap}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None},
                               correlation_normalize=correlation_normalize, weight_decay=weight_decay, seed=seed)


# ------------------------------------------------------------------------------------------ model and data


def build_unet(preset: DdpmPreset | str, *, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """``diffusers.UNet2DModel`` of ``preset``, initialised from ``seed`` without touching the global RNG.

    >>> build_unet("micro", device="meta").config.sample_size
    8
    """
    diffusers = require("diffusers", names=("UNet2DModel",))
    preset = DDPM_PRESETS[preset] if isinstance(preset, str) else preset
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return diffusers.UNet2DModel(**preset.unet_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = diffusers.UNet2DModel(**preset.unet_config())
    return model.to(device)


def noise_scheduler() -> Any:
    """The training scheduler: ``diffusers.DDPMScheduler`` with DDPM's linear betas and fixed_large variance."""
    diffusers = require("diffusers", names=("DDPMScheduler",))
    return diffusers.DDPMScheduler(**SCHEDULER_CONFIG, variance_type=DDPM_VARIANCE)


class ImageBatches:
    """The training stream: image indices (a fresh permutation per epoch), noise and timesteps.

    Everything is drawn from one :class:`torch.Generator` seeded with ``seed``, so every optimizer
    sees the same batches; :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.
    """

    def __init__(self, images: Tensor, batch_size: int, num_timesteps: int, *, seed: int) -> None:
        if batch_size > len(images):
            raise ValueError(f"batch size {batch_size} exceeds the {len(images)} training images")
        self.images, self.batch_size, self.num_timesteps = images, batch_size, num_timesteps
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, noise, timesteps)`` of the next batch, on the CPU."""
        if self.cursor + self.batch_size > len(self.order):  # the last partial batch of an epoch is dropped
            self.order = torch.randperm(len(self.images), generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        x0 = self.images[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        timesteps = torch.randint(self.num_timesteps, (self.batch_size,), generator=self.generator)
        return x0, noise, timesteps

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.order = state["order"].cpu()
        self.cursor = int(state["cursor"])


@dataclass
class HeldoutSet:
    """Held-out images with their fixed timesteps and noise (``repeats`` draws per image)."""

    images: Tensor
    timesteps: Tensor
    noise: Tensor
    repeats: int


def heldout_set(images: Tensor, repeats: int, num_timesteps: int, *, seed: int = HELDOUT_SEED) -> HeldoutSet:
    """Each held-out image ``repeats`` times, with timesteps stratified over ``[0, T)`` and seeded noise.

    >>> s = heldout_set(torch.zeros(10, 1, 4, 4), 2, 1000)
    >>> s.images.shape[0], int(s.timesteps.min()) >= 0, int(s.timesteps.max()) < 1000
    (20, True, True)
    """
    generator = torch.Generator().manual_seed(seed)
    tiled = images.repeat(repeats, 1, 1, 1)
    n = len(tiled)
    strata = ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).long().clamp_(0, num_timesteps - 1)
    timesteps = strata[torch.randperm(n, generator=generator)]
    noise = torch.randn(tiled.shape, generator=generator)
    return HeldoutSet(tiled, timesteps, noise, repeats)


def _denoising_loss(model: nn.Module, scheduler: Any, x0: Tensor, noise: Tensor, timesteps: Tensor,
                    reduction: str = "mean") -> Tensor:
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(noisy, timesteps).sample
    return F.mse_loss(prediction.float(), noise.float(), reduction=reduction)


@torch.no_grad()
def evaluate_heldout(model: nn.Module, scheduler: Any, heldout: HeldoutSet, batch_size: int) -> float:
    """Mean squared error of the predicted noise on ``heldout`` (eval mode, chunks of ``batch_size``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(heldout.images), batch_size):
        chunk = slice(start, start + batch_size)
        total += _denoising_loss(model, scheduler, heldout.images[chunk].to(device), heldout.noise[chunk].to(device),
                                 heldout.timesteps[chunk].to(device), reduction="sum").item()
    model.train(was_training)
    return total / heldout.images.numel()


@torch.no_grad()
def generate_samples(model: nn.Module, count: int, *, sampler: str = "ddim", steps: int = 50, seed: int = 0,
                     batch_size: int = 256, progress: Any = None) -> Tensor:
    """``count`` images (CPU, ``[-1, 1]``) sampled from ``model`` with DDIM (eta 0) or DDPM in ``steps`` steps.

    The initial noise (and DDPM's per-step noise) comes from a CPU generator seeded with ``seed``,
    so every model is sampled from the same noise. ``progress`` (a tqdm bar) is advanced per step.
    """
    diffusers = require("diffusers", names=("DDIMScheduler", "DDPMScheduler"))
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(**SCHEDULER_CONFIG)
    elif sampler == "ddpm":
        scheduler = diffusers.DDPMScheduler(**SCHEDULER_CONFIG, variance_type=DDPM_VARIANCE)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
    scheduler.set_timesteps(steps)
    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (config.in_channels, config.sample_size, config.sample_size)
    chunks = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        x = torch.randn((n, *shape), generator=generator).to(parameter.device, parameter.dtype)
        for t in scheduler.timesteps:
            eps = model(x, t.to(parameter.device)).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
            if progress is not None:
                progress.update(1)
        chunks.append(x.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(chunks)


def save_sample_grid(images: Tensor, path: str | Path, *, columns: int = 8, min_side: int = 512) -> Path | None:
    """A PNG grid of ``images`` (N, C, H, W in ``[-1, 1]``), upscaled (nearest) to about ``min_side``
    pixels; ``None`` (nothing written) when matplotlib is not installed."""
    from .report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate((images.float().clamp(-1, 1) + 1) / 2):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    factor = max(1, math.ceil(min_side / max(grid.shape[1:])))
    grid = grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array, cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
    return path


def projection_summary(optimizer: torch.optim.Optimizer, family: str) -> dict[str, dict[str, int]]:
    """How many tensors and parameters the optimizer projects, by kind (``tucker``, ``matrix``, ``dense``).

    COAP's kinds are read from its state (``proj_out``: Tucker-2, ``proj``: matrix); GaLore and
    APOLLO project the parameters of their groups with a ``rank``; dense optimizers project nothing.
    """
    summary: dict[str, dict[str, int]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if family == "coap":
                kind = "tucker" if "proj_out" in state else "matrix" if "proj" in state else "dense"
            elif family in ("galore", "apollo"):
                kind = "matrix" if "rank" in group else "dense"
            else:
                kind = "dense"
            entry = summary.setdefault(kind, {"tensors": 0, "parameters": 0})
            entry["tensors"] += 1
            entry["parameters"] += param.numel()
    return summary


# ------------------------------------------------------------------------------------------ one run


def _fingerprint(name: str, lr: float, config: DdpmConfig, data: ImageData) -> dict[str, Any]:
    """What must match for a checkpoint to be continued."""
    return run_fingerprint(name, lr, config, train_sha256=data.describe()["train_sha256"])


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the duration (nothing when ``count`` is ``None``)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_one(name: str, lr: float, config: DdpmConfig, data: ImageData, heldout: HeldoutSet,
              scorer: FrechetScorer, fid_reference: tuple[Tensor, Tensor] | None,
              checkpoint: Path | None) -> dict[str, Any]:
    """Train a fresh UNet (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``, then score it."""
    with _threads(config.threads):
        return _train_one(name, lr, config, data, heldout, scorer, fid_reference, checkpoint)


class _DdpmLoop(TrainingLoop):
    """The training loop of one DDPM run, with held-out evaluations before and during training
    (every ``eval_every`` steps), logged in ``heldout_curve`` and kept in checkpoints."""

    def __init__(self, *args: Any, noise: Any, heldout: HeldoutSet, config: DdpmConfig, **kwargs: Any) -> None:
        super().__init__(*args, config=config, logs={"heldout_curve": []}, **kwargs)
        self.noise, self.heldout = noise, heldout
        self.eval_every, self.eval_batch_size = config.eval_every, config.eval_batch_size

    def evaluate(self, step: int) -> float:
        loss = evaluate_heldout(self.model, self.noise, self.heldout, self.eval_batch_size)
        self.logs["heldout_curve"].append({"step": step, "loss": loss})
        return loss

    def before_steps(self) -> None:
        if self.eval_every and self.start_step == 0:
            self.evaluate(0)

    def after_step(self, step: int) -> None:
        if self.eval_every and step % self.eval_every == 0 and step != self.steps:
            self.evaluate(step)


def _train_one(name: str, lr: float, config: DdpmConfig, data: ImageData, heldout: HeldoutSet,
               scorer: FrechetScorer, fid_reference: tuple[Tensor, Tensor] | None,
               checkpoint: Path | None) -> dict[str, Any]:
    tqdm = require("tqdm").tqdm
    spec = OPTIMIZERS[name]
    settings = config.settings()
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    model = build_unet(DDPM_PRESETS[config.preset], seed=config.seed, device=device)
    model.train()
    scheduler_ = noise_scheduler()
    optimizer = build_optimizer(name, list(model.parameters()), [], lr, settings)
    batches = ImageBatches(data.train, config.batch_size, scheduler_.config.num_train_timesteps,
                           seed=config.seed + _BATCH_STREAM)
    label = name if not config.lr_sweep else f"{name} lr={lr:g}"
    loop = _DdpmLoop(model, optimizer, batches, lambda batch: _denoising_loss(model, scheduler_, *batch),
                     noise=scheduler_, heldout=heldout, config=config, device=device, label=label,
                     next_batch=lambda: tuple(t.to(device) for t in batches.next()))
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        loop.resume(FileCheckpoint(checkpoint, spec, _fingerprint(name, lr, config, data), _CHECKPOINT_FORMAT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        loop.run()
    heldout_curve = loop.logs["heldout_curve"]
    heldout_loss = loop.evaluate(len(loop.losses))
    if not config.eval_every:
        heldout_curve.clear()

    sampling_started = time.perf_counter()
    chunks = math.ceil(config.samples / config.eval_batch_size)
    with tqdm(total=chunks * config.sample_steps, desc=f"{label} sampling", file=sys.stderr, leave=False,
              disable=not config.progress, unit="step") as bar:
        samples = generate_samples(model, config.samples, sampler=config.sampler, steps=config.sample_steps,
                                   seed=config.seed + _SAMPLE_STREAM, batch_size=config.eval_batch_size,
                                   progress=bar)
    sampling_seconds = time.perf_counter() - sampling_started
    finite = bool(torch.isfinite(samples).all())
    frechet = scorer.score(samples) if finite else float("nan")
    fid = None
    if fid_reference is not None and finite:
        from .frechet import frechet_distance, gaussian_statistics, inception_features, inception_fid_features

        features = inception_fid_features(samples, inception_features(device)[1])
        fid = frechet_distance(*gaussian_statistics(features), *fid_reference)
    grid = None
    if config.plots:
        grid = save_sample_grid(samples[:GRID_SAMPLES],
                                Path(config.plots) / f"ddpm_samples_{run_stem(name, lr, config.lr_sweep)}.png")

    messages = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip()}" for w in caught))
    return result_row(
        name, spec, lr,
        **loop.measurements(spec, settings, items_per_step=config.batch_size, throughput="images_per_s"),
        state_bytes_by_kind=state_nbytes_by_kind(optimizer),
        projected=projection_summary(optimizer, spec.family),
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        heldout_loss=heldout_loss,
        heldout_curve=heldout_curve,
        classifier_frechet_distance=frechet,
        fid=fid,
        samples=config.samples,
        sampling_seconds=sampling_seconds,
        sample_grid=str(grid) if grid is not None else None,
        workarounds=workarounds,
        warnings=messages[:5],
    )


#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = ("lr", "heldout_loss", "final_loss", "classifier_frechet_distance", "first_nonfinite_step", "error")


def run_ddpm(config: DdpmConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config``; return ``{"config", "data", "versions", "hardware", "argv", "results"}``.

    With ``lr_sweep``, each optimizer runs at its lr times
    :data:`~coap_torch.bench.training.LR_SWEEP_FACTORS` and the run with the lowest held-out loss is
    kept (all of them are listed in its ``lr_sweep``). A run that raises (or whose process dies)
    is a result with ``failed: True`` and its ``error``. Ratios to AdamW are added when ``adamw`` ran.
    ``import_notes`` says what packages printed while the runs imported them.
    """
    config = config.resolved()
    with _threads(config.threads):
        return _run_ddpm(config)


def _run_ddpm(config: DdpmConfig) -> dict[str, Any]:
    preset = DDPM_PRESETS[config.preset]
    if config.fid:  # fail before training when real FID cannot work here
        from .frechet import inception_features

        backend, _ = inception_features(config.device)
    data = load_image_data(preset.resolution, preset.channels, image_dir=config.image_dir, cifar10=config.cifar10,
                           max_images=config.max_images)
    if config.batch_size > len(data.train):
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} training images")
    num_timesteps = SCHEDULER_CONFIG["num_train_timesteps"]
    heldout = heldout_set(data.heldout, config.heldout_repeats, num_timesteps)
    scorer = frechet_scorer(data, samples=config.samples, seed=config.seed, steps=config.classifier_steps)
    fid_reference = None
    fid_info = None
    if config.fid:
        from .frechet import gaussian_statistics, inception_features, inception_fid_features

        real_features = inception_fid_features(data.train, inception_features(config.device)[1])
        fid_reference = gaussian_statistics(real_features)
        fid_info = {"backend": backend, "reference": f"{len(data.train)} training images (as in the paper)"}

    results = run_optimizers(config, train_one, (config, data, heldout, scorer, fid_reference), _SWEEP_KEYS)
    base = next((r for r in results if r["name"] == "adamw" and not r.get("failed")), None)
    for result in results:
        if base is not None and not result.get("failed") and base.get("classifier_frechet_distance"):
            result["classifier_frechet_distance_ratio_to_adamw"] = (
                result["classifier_frechet_distance"] / base["classifier_frechet_distance"])

    settings = dataclasses.asdict(config)
    settings["optimizers"] = list(config.optimizers)
    settings.update(
        low_rank=dataclasses.asdict(config.settings()),
        lrs={name: config.lr_for(name) for name in config.optimizers},
        unet=_jsonable(preset.unet_config()),
        scheduler={**SCHEDULER_CONFIG, "variance_type": DDPM_VARIANCE},
        parameters=preset.num_parameters(),
        heldout_evaluations=len(heldout.images),
        lr_sweep_factors=list(LR_SWEEP_FACTORS) if config.lr_sweep else None,
        final_lr_fraction=FINAL_LR_FRACTION,
        torch_threads=torch.get_num_threads(),
        frechet=scorer.info,
        fid=fid_info,
    )
    return {"config": settings, "data": data.describe(), "versions": versions(),
            "hardware": hardware(config.device), "argv": list(config.argv), "results": results,
            "import_notes": gather_import_notes(results)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ report

_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step; img/s: batch "
    "images / median iteration; final loss: mean of the last {window} batch losses; held-out loss: MSE of the "
    "predicted noise on the held-out images with fixed timesteps and noise (the same for every optimizer); "
    "clf-FD: Frechet distance between the features of the generated samples and of the held-out images in a "
    "small classifier trained on the training images (NOT FID: compare it within this table only; real-vs-real "
    "floor {floor}){fid}."
)

_HEADER = ["optimizer", "lr", "state", "vs AdamW", "peak mem", "iter ms", "vs AdamW", "step ms", "refresh ms",
           "img/s", "final loss", "held-out loss", "vs AdamW", "clf-FD"]


def _columns(result: dict[str, Any], with_fid: bool) -> list[str]:
    width = len(_HEADER) + with_fid
    if result.get("failed"):
        return [result["name"], f"{result['lr']:g}", "failed", *["-"] * (width - 3)]
    row = [*measurement_columns(result, "images_per_s"), _number(result["classifier_frechet_distance"], ".3f")]
    return [*row, _number(result.get("fid"), ".2f")] if with_fid else row


def _projection_line(result: dict[str, Any]) -> str | None:
    summary = result.get("projected") or {}
    parts = []
    for kind, label in (("tucker", "Tucker-2 kernels"), ("matrix", "matrices")):
        if kind in summary:
            parts.append(f"{summary[kind]['tensors']} {label} ({summary[kind]['parameters']:,} parameters)")
    if not parts:
        return None
    dense = summary.get("dense", {"tensors": 0, "parameters": 0})
    return (f"{result['name']} projects {' and '.join(parts)}; {dense['tensors']} tensors "
            f"({dense['parameters']:,} parameters) dense")


def _recipe_line(config: dict[str, Any]) -> str:
    low = config["low_rank"]
    lrs = sorted(set(config["lrs"].values()))
    return (
        f"recipe {config['recipe']}: every parameter offered for projection; COAP rank ratio {low['rank_ratio']:g} "
        f"for matrices and 3x3 kernels (Tucker-2), T_u {low['update_interval']}, lambda {low['reproject_factor']}; "
        f"GaLore/APOLLO rank ratio {low['rank_ratio']:g} on 2-D weights only (conv kernels dense), "
        f"update_proj_gap {low['proj_gap']}; update scale {low['scale']:g}, weight decay {low['weight_decay']:g}; "
        f"peak lr {', '.join(f'{lr:g}' for lr in lrs)} for every optimizer"
        + (f"; lr sweep x{config['lr_sweep_factors']}, best held-out kept" if config.get("lr_sweep") else "")
    )


def format_ddpm_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    unet = config["unet"]
    title = (
        f"ddpm {config['preset']}: UNet2DModel {tuple(unet['block_out_channels'])}, {config['parameters']:,} "
        f"parameters, {unet['sample_size']}x{unet['sample_size']}x{unet['in_channels']}; {data['name']}: "
        f"{data['train_images']:,} train / {data['heldout_images']:,} held-out images; {config['steps']} steps, "
        f"batch {config['batch_size']}, warm-up {config['warmup_steps']}, cosine to {config['final_lr_fraction']:g} "
        f"x lr, {seed_label(config)}, {config['device']} ({config['torch_threads']} threads)"
    )
    frechet = config["frechet"]
    sampling = (
        f"samples: {config['samples']} per optimizer, {config['sampler'].upper()} {config['sample_steps']} steps, "
        f"same noise for all; held-out loss on {config['heldout_evaluations']:,} fixed (image, t, noise) triples; "
        f"clf-FD feature classifier: held-out accuracy "
        + (f"{100 * frechet['heldout_accuracy']:.1f}%" if frechet.get("heldout_accuracy") is not None else "-")
        + (f" (labels: {frechet['label_source']})" if frechet.get("label_source") != "classes" else "")
    )
    with_fid = bool(config.get("fid"))
    header = [*_HEADER, "FID"] if with_fid else _HEADER
    results = run["results"]
    text = [*textwrap.wrap(title, width=120), *textwrap.wrap(_recipe_line(config), width=120),
            *textwrap.wrap(sampling, width=120), ""]
    text += markdown_table(header, [_columns(r, with_fid) for r in results])
    remarks = [line for result in results
               for line in result_remarks(result, config["steps"], more=[_projection_line(result)],
                                          sweep_edge=lambda r: f"note: {r['name']}: the best lr {r['lr']:g} is at "
                                                             "the edge of the sweep")]
    remarks += import_note_lines(run)  # what peers printed while imported, said once
    if remarks:
        text += ["", *remarks]
    if notes:
        finished = [r for r in results if not r.get("failed")]
        peak = finished[0]["peak_memory_kind"] if finished else ""
        fid = (f"; FID: Frechet Inception Distance ({config['fid']['backend']}) of the samples against "
               f"{config['fid']['reference']}") if with_fid else ""
        floor = f"{frechet['real_train_vs_heldout']:.3f}"
        text += ["", *textwrap.wrap(_NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak, floor=floor, fid=fid),
                                    width=120)]
    return "\n".join(text)


def write_ddpm_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``ddpm_loss.png``, ``ddpm_heldout_vs_state.png`` and ``ddpm_samples.png`` (every
    optimizer's sample grid side by side); ``None`` if matplotlib is not installed.

    The per-run grids ``ddpm_samples_<optimizer>.png`` are written during the runs (``plots`` of
    :class:`DdpmConfig`) and listed too.
    """
    from .report import _pyplot, plot_loss_curves

    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    finished = [r for r in run["results"] if not r.get("failed")]
    paths = [plot_loss_curves(
        plt,
        {**run, "results": finished},
        directory / "ddpm_loss.png",
        title=f"ddpm {run['config']['preset']}, {seed_label(run['config'])}",
        label=lambda result: f"{result['name']} lr={result['lr']:g}",
        log_scale=True,
        ylabel="training loss (batch MSE of the predicted noise)",
    )]
    paths.append(plot_heldout_vs_state(plt, finished, directory / "ddpm_heldout_vs_state.png",
                                       "held-out denoising loss"))

    grids = [r for r in finished if r.get("sample_grid") and Path(r["sample_grid"]).is_file()]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), squeeze=False)
        for ax, result in zip(axes[0], grids, strict=True):
            ax.imshow(plt.imread(result["sample_grid"]), cmap="gray")
            ax.set_title(f"{result['name']} lr={result['lr']:g}\nclf-FD {result['classifier_frechet_distance']:.3f}",
                         fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(directory / "ddpm_samples.png", dpi=120)
        plt.close(fig)
        paths.append(directory / "ddpm_samples.png")
        paths += [Path(r["sample_grid"]) for r in grids]
    return paths


# ------------------------------------------------------------------------------------------ command line


def add_ddpm_parser(commands: Any) -> None:
    """Register ``coap-bench ddpm`` on the ``argparse`` sub-parsers ``commands``."""
    import argparse

    from .cli import _float_at_least, _non_negative_int, _optimizer_list, _positive_int

    ddpm = commands.add_parser(
        "ddpm",
        help="train a diffusers UNet2DModel with DDPM once per optimizer on offline images and print a table",
        description=(
            "Train a DDPM (diffusers' UNet2DModel built from a config, DDPMScheduler; nothing downloaded) on "
            "scikit-learn's bundled digits (or a folder of images, or CIFAR-10) once per optimizer, with the same "
            "initial weights, images, noise, timesteps and learning-rate schedule, and print memory, speed, "
            "training and held-out denoising loss and sample quality side by side."
        ),
    )
    ddpm.add_argument("--preset", choices=list(DDPM_PRESETS), default="small",
                      help="small (default): 16x16 grayscale UNet for CPUs; cifar10: the paper's DDPM CIFAR-10 UNet "
                           "(35.7M parameters) for GPUs; micro: smoke tests")
    ddpm.add_argument("--steps", type=_positive_int, help="training steps (default: small 500, cifar10 800000)")
    ddpm.add_argument("--batch-size", type=_positive_int, help="images per batch (default: small 32, cifar10 128)")
    ddpm.add_argument(
        "--optimizers", type=_optimizer_list, default=list(DEFAULT_DDPM_OPTIMIZERS), metavar="A,B",
        help=f"comma-separated optimizers, from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_DDPM_OPTIMIZERS)})",
    )
    ddpm.add_argument("--recipe", choices=list(DDPM_RECIPES), default="paper",
                      help="paper (default): the paper's DDPM CIFAR-10 settings, rank ratio 1.5 for matrices and "
                           "conv kernels, T_u 16, lambda 10; drop-in: the library defaults (rank ratio 2, T_u 32, "
                           "lambda 5); both at the preset's lr for every optimizer")
    ddpm.add_argument("--rank-ratio", type=_float_at_least(1.0),
                      help="rank ratio of every low-rank optimizer (matrices and COAP's Tucker-2 kernels)")
    ddpm.add_argument("--update-interval", type=_positive_int, help="COAP update_interval T_u (default: recipe's)")
    ddpm.add_argument("--reproject-factor", type=_positive_int, help="COAP reproject_factor lambda (default: recipe's)")
    ddpm.add_argument("--scale", type=_float_at_least(0.0, strict=True),
                      help="update scale of projected weights, every low-rank optimizer (default 1)")
    ddpm.add_argument("--proj-gap", type=_positive_int, help="GaLore / APOLLO update_proj_gap (default 200)")
    ddpm.add_argument("--correlation-normalize", action="store_true",
                      help="COAP correlation_normalize (the scale-invariant Eq. 2 step)")
    ddpm.add_argument("--weight-decay", type=_float_at_least(0.0), default=0.0,
                      help="weight decay of every optimizer (default 0, as DDPM's Adam)")
    ddpm.add_argument("--lr", type=_float_at_least(0.0, strict=True),
                      help="peak learning rate of every optimizer (default: small 6e-3, cifar10 2e-4 as in DDPM)")
    ddpm.add_argument("--lr-sweep", action="store_true",
                      help="run each optimizer at its lr x 0.5, 1, 2 and keep the lowest held-out loss")
    ddpm.add_argument("--warmup-steps", type=_non_negative_int, help="linear warm-up steps (default steps / 10)")
    ddpm.add_argument("--image-dir", metavar="PATH",
                      help="train on this folder of images instead (class labels from first-level subfolders)")
    ddpm.add_argument("--cifar10", action="store_true",
                      help="train on CIFAR-10 from the Hugging Face Hub (needs internet and `pip install datasets`)")
    ddpm.add_argument("--samples", type=_positive_int,
                      help="images generated per optimizer for the sample-quality figures (default: small 256)")
    ddpm.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler of the generated images (default ddim)")
    ddpm.add_argument("--sample-steps", type=_positive_int,
                      help="denoising steps of the sampler (default: small 50, cifar10 100; the paper: ddpm 1000)")
    ddpm.add_argument("--eval-every", type=_non_negative_int, default=0,
                      help="also measure the held-out loss before training and every N steps (default: at the end)")
    ddpm.add_argument("--fid", action="store_true",
                      help="also report real FID (Inception-v3; needs torch-fidelity or pytorch-fid and its weights)")
    ddpm.add_argument("--max-images", type=_positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument("--heldout-repeats", type=_positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument("--classifier-steps", type=_positive_int, default=CLASSIFIER_STEPS, help=argparse.SUPPRESS)
    ddpm.add_argument("--stop-after", type=_positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument("--seed", type=_non_negative_int, default=0,
                      help="seed of the initial weights, batches, noise and samples (default 0)")
    ddpm.add_argument("--seeds", type=_positive_int, default=1,
                      help="train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
                           "held-out loss and sample quality, with the spread (default 1)")
    ddpm.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    ddpm.add_argument("--threads", type=_positive_int,
                      help="torch threads of each run (default: torch's; 1 gives steadier times on a busy machine)")
    ddpm.add_argument("--in-process", action="store_true",
                      help="run every optimizer in this process (default on CPU: a fresh process each, so that "
                           "peak RSS is per run and a crashing peer cannot end the comparison)")
    ddpm.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    ddpm.add_argument("--plots", metavar="DIR",
                      help="write loss plots and a PNG grid of samples per optimizer to this folder (needs matplotlib)")
    ddpm.add_argument("--checkpoint-dir", metavar="DIR",
                      help="save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds) and "
                           "continue from there when started again")
    ddpm.add_argument("--checkpoint-every", type=_positive_int, default=100,
                      help="steps between checkpoints (default 100)")
    ddpm.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_ddpm_command(args: Any, argv: list[str]) -> int:
    """``coap-bench ddpm``: run, print the table, write the JSON and plots asked for; returns the exit status."""
    from .cli import _run_and_report, config_from_args

    config = config_from_args(DdpmConfig, args, argv)
    return _run_and_report(lambda: run_ddpm(config), args, format_ddpm_table, write_ddpm_plots)
