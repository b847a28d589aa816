r"""SiT's objective and sampler: the linear interpolant, velocity prediction, and an ODE solved backwards.

For a clean image :math:`x`, noise :math:`\varepsilon \sim N(0, I)` and a time :math:`t \sim U[0, 1]`,

.. math::

    x_t = (1 - t)\, x + t\, \varepsilon, \qquad
    v = \frac{d x_t}{d t} = \varepsilon - x, \qquad
    \mathcal{L} = \mathbb{E}\, \lVert v_\theta(x_t, t, y) - (\varepsilon - x) \rVert^2

(the mean over every value): SiT's ``Linear`` path with ``velocity`` prediction (Ma et al., 2024), written
with ``t = 1`` at the noise end (SiT's code runs its time the other way; the two are the same objective
under ``t -> 1 - t``). Samples solve :math:`dx/dt = v_\theta(x, t, y)` from :math:`x_1 = \varepsilon` at
``t = 1`` to ``t = 0`` on a uniform grid, with Euler or Heun steps (Heun: two model calls a step; SiT's own
default ODE solver is adaptive dopri5, too costly here), seeded, the same noise and labels for every model.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..training import heldout_mean, sample_in_chunks
from .data import HeldoutSet

__all__ = ["evaluate_heldout", "generate_samples", "interpolate", "sample_labels", "velocity_loss"]


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, v)``: the point of the linear path at ``t`` and its velocity ``noise - x``."""
    shaped = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - shaped) * x + shaped * noise, noise - x


def velocity_loss(
    model: nn.Module, x: Tensor, labels: Tensor, noise: Tensor, t: Tensor, reduction: str = "mean"
) -> Tensor:
    """The MSE between the predicted and the true velocity at ``x_t`` (see the module docstring)."""
    x_t, target = interpolate(x, noise, t)
    return F.mse_loss(model(x_t, t, labels).float(), target.float(), reduction=reduction)


def evaluate_heldout(model: nn.Module, heldout: HeldoutSet, batch_size: int) -> float:
    """Mean squared velocity error on ``heldout`` (eval mode, chunks of ``batch_size``)."""
    device = next(model.parameters()).device

    def summed(chunk: slice) -> Tensor:
        batch = heldout.batch(chunk, device)
        return velocity_loss(model, batch.x, batch.labels, batch.noise, batch.t, reduction="sum")

    return heldout_mean(model, len(heldout), batch_size, summed, heldout.images.numel())


def sample_labels(count: int, num_classes: int) -> Tensor:
    """The class of each generated sample: ``0, 1, ..., num_classes - 1, 0, 1, ...`` (balanced classes)."""
    return torch.arange(count) % num_classes


def _velocity(model: nn.Module, x: Tensor, t: float, labels: Tensor, null: Tensor | None, cfg_scale: float) -> Tensor:
    times = torch.full((len(x),), t, device=x.device)
    if null is None:
        return model(x, times, labels)
    both = model(torch.cat([x, x]), torch.cat([times, times]), torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


def generate_samples(
    model: nn.Module,
    labels: Tensor,
    *,
    sampler: str = "heun",
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    cfg_scale: float = 1.0,
    progress: Any = None,
) -> Tensor:
    """One image per label (CPU, clamped to ``[-1, 1]``): the ODE solved from seeded noise in ``steps`` steps.

    ``cfg_scale`` above 1 mixes in the null-class velocity (classifier-free guidance: ``v_null + s (v_y -
    v_null)``). ``progress`` (a tqdm bar) is advanced per step.
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {sampler!r}; choose euler or heun")
    parameter = next(model.parameters())
    shape = (model.in_channels, model.grid * model.patch, model.grid * model.patch)
    generator = torch.Generator().manual_seed(seed)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()

    def sample(chunk: slice) -> Tensor:
        y = labels[chunk].to(parameter.device)
        null = torch.full_like(y, model.num_classes) if cfg_scale > 1 else None
        x = torch.randn((len(y), *shape), generator=generator).to(parameter.device, parameter.dtype)
        for t, t_next in itertools.pairwise(times):
            dt = t_next - t
            v = _velocity(model, x, t, y, null, cfg_scale)
            if sampler == "heun":
                v_next = _velocity(model, x + dt * v, t_next, y, null, cfg_scale)
                v = (v + v_next) / 2
            x = x + dt * v
            if progress is not None:
                progress.update(1)
        return x

    return sample_in_chunks(model, len(labels), batch_size, sample)
