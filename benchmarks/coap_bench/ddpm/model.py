"""The DDPM model: the UNet of a preset, its noise schedule and loss, held-out evaluation and sampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._deps import require
from ..training import heldout_mean, sample_in_chunks
from .data import HeldoutSet
from .presets import DDPM_PRESETS, DDPM_VARIANCE, SCHEDULER_CONFIG, DdpmPreset, meta_unet

__all__ = [
    "build_unet",
    "denoising_loss",
    "evaluate_heldout",
    "generate_samples",
    "noise_scheduler",
    "projection_summary",
]


def build_unet(preset: DdpmPreset | str, *, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """``diffusers.UNet2DModel`` of ``preset``, initialised from ``seed`` without touching the global RNG.

    >>> build_unet("micro", device="meta").config.sample_size
    8
    """
    preset = DDPM_PRESETS[preset] if isinstance(preset, str) else preset
    if torch.device(device).type == "meta":
        return meta_unet(preset)
    diffusers = require("diffusers", names=("UNet2DModel",))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = diffusers.UNet2DModel(**preset.unet_config())
    return model.to(device)


def noise_scheduler() -> Any:
    """The training scheduler: ``diffusers.DDPMScheduler`` with DDPM's linear betas and fixed_large variance."""
    diffusers = require("diffusers", names=("DDPMScheduler",))
    return diffusers.DDPMScheduler(**SCHEDULER_CONFIG, variance_type=DDPM_VARIANCE)


def denoising_loss(
    model: nn.Module, scheduler: Any, x0: Tensor, noise: Tensor, timesteps: Tensor, reduction: str = "mean"
) -> Tensor:
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(noisy, timesteps).sample
    return F.mse_loss(prediction.float(), noise.float(), reduction=reduction)


def evaluate_heldout(model: nn.Module, scheduler: Any, heldout: HeldoutSet, batch_size: int) -> float:
    """Mean squared error of the predicted noise on ``heldout`` (eval mode, chunks of ``batch_size``)."""
    device = next(model.parameters()).device

    def summed(chunk: slice) -> Tensor:
        return denoising_loss(model, scheduler, *heldout.batch(chunk, device), reduction="sum")

    return heldout_mean(model, len(heldout.images), batch_size, summed, heldout.images.numel())


def generate_samples(
    model: nn.Module,
    count: int,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    progress: Any = None,
) -> Tensor:
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
    parameter = next(model.parameters())
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (config.in_channels, config.sample_size, config.sample_size)

    def sample(chunk: slice) -> Tensor:
        x = torch.randn((chunk.stop - chunk.start, *shape), generator=generator).to(parameter.device, parameter.dtype)
        for t in scheduler.timesteps:
            eps = model(x, t.to(parameter.device)).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
            if progress is not None:
                progress.update(1)
        return x

    return sample_in_chunks(model, count, batch_size, sample)


def projection_summary(optimizer: torch.optim.Optimizer, family: str) -> dict[str, dict[str, int]]:
    """How many tensors and parameters the optimizer projects, by kind (``tucker``, ``conv_input``, ``matrix``, ``dense``).

    COAP's kinds are read from its state (``proj_out``: Tucker-2, ``proj_in`` alone: a kernel projected on
    its input channels, ``proj``: matrix); GaLore and
    APOLLO project the parameters of their groups with a ``rank``; dense optimizers project nothing.
    """
    summary: dict[str, dict[str, int]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if family == "coap":
                kind = (
                    "tucker"
                    if "proj_out" in state
                    else "conv_input"
                    if "proj_in" in state
                    else "matrix"
                    if "proj" in state
                    else "dense"
                )
            elif family in ("galore", "apollo"):
                kind = "matrix" if "rank" in group else "dense"
            else:
                kind = "dense"
            entry = summary.setdefault(kind, {"tensors": 0, "parameters": 0})
            entry["tensors"] += 1
            entry["parameters"] += param.numel()
    return summary
