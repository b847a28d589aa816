"""The round-trip error of a quantizer, ``deq(q(x))`` against ``x``, and against the best its code map allows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import BLOCK_SIZE

__all__ = ["nearest_code_error", "roundtrip_errors"]


def nearest_code_error(x64: Tensor, block_absmax: Tensor, code_map: Tensor) -> Tensor:
    """The smallest error a value can have with this code map: ``min_j |map_j * a_b - x|``."""
    nb = block_absmax.numel()
    pad = nb * BLOCK_SIZE - x64.numel()
    scale = (
        block_absmax.repeat_interleave(BLOCK_SIZE)[: x64.numel()] if pad else block_absmax.repeat_interleave(BLOCK_SIZE)
    )
    values = code_map.double().sort().values
    normalized = x64 / scale.clamp_min(torch.finfo(torch.float64).tiny)
    upper = torch.searchsorted(values, normalized).clamp(max=values.numel() - 1)
    lower = (upper - 1).clamp(min=0)
    best = torch.minimum((values[upper] * scale - x64).abs(), (values[lower] * scale - x64).abs())
    return best


def roundtrip_errors(x: Tensor, y: Tensor, code_map: Tensor | None = None) -> dict[str, float]:
    """Round-trip error of ``y = deq(q(x))`` (computed in float64); with the backend's code map,
    also the fraction of values that did not get their nearest code (float32 rounding allowed)."""
    x64, y64 = x.double().reshape(-1), y.double().reshape(-1)
    err = (y64 - x64).abs()
    absmax = x64.abs().max()
    n = x64.numel()
    nb = math.ceil(n / BLOCK_SIZE)
    pad = nb * BLOCK_SIZE - n
    block_err = torch.nn.functional.pad(err, (0, pad)).view(nb, BLOCK_SIZE).amax(1)
    block_absmax = torch.nn.functional.pad(x64.abs(), (0, pad)).view(nb, BLOCK_SIZE).amax(1)
    nonzero = x64 != 0
    not_nearest = None
    if code_map is not None:
        best = nearest_code_error(x64, block_absmax, code_map)
        scale = block_absmax.repeat_interleave(BLOCK_SIZE)[:n]
        # a relative 1e-6 of the block's absmax covers float32 rounding of the scaling and of ties
        not_nearest = (err > best + 1e-6 * scale).double().mean().item()
    return {
        "not_nearest_code_fraction": not_nearest,
        "max_abs_err_over_absmax": (err.max() / absmax).item(),
        "max_block_err_over_block_absmax": (block_err / block_absmax.clamp_min(torch.finfo(torch.float64).tiny))
        .max()
        .item(),
        "mean_rel_err": (err[nonzero] / x64[nonzero].abs()).mean().item(),
        "rel_rms_err": (torch.linalg.vector_norm(y64 - x64) / torch.linalg.vector_norm(x64)).item(),
        "zeroed_fraction": ((y64 == 0) & nonzero).double().mean().item() if nonzero.any() else 0.0,
        "max_abs_err": err.max().item(),
        "absmax": absmax.item(),
    }
