r"""Rounding float32 state to bfloat16 without stalling: stochastic rounding.

bfloat16 keeps 8 significant bits, so round-to-nearest drops any change smaller than half a
unit in the last place, ``2^-9`` of the value. An exponential moving average with ``beta2 = 0.999``
moves by ``(1 - beta2) (g^2 / v - 1)`` of its value per step: unless a gradient is about three
times the running RMS, ``v * 0.999 + 0.001 g^2`` rounds back to ``v`` and the average stops
tracking (it *stalls*). Storing ``sqrt(v)`` halves the relative move and stalls the same way.

Stochastic rounding rounds up with probability equal to the fraction of the gap below the
value, so the stored value is the exact one in expectation: small moves accumulate on average
instead of being dropped. For float32 the two bfloat16 neighbours of ``x`` are its bit pattern
with the low 16 bits cleared (toward zero) and that plus one unit; adding a uniform random
integer in ``[0, 2^16)`` to the bit pattern and clearing the low 16 bits picks the upper one with
exactly that probability (for either sign, since floats are sign-magnitude). The randomness
comes from a caller's :class:`torch.Generator`, so results are reproducible and the global RNG
is never touched.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_to_bfloat16", "stochastic_round_to_bfloat16"]

_LOW_BITS = 16
_HIGH_MASK = -(1 << _LOW_BITS)  # 0xFFFF0000 as an int32
_SIGN = -(1 << 31)  # 0x80000000 as an int32
_LARGEST_NAN_BASE = 0x7FFF0000  # a NaN pattern; no magnitude at or below it carries past the exponent


def round_to_bfloat16(x: Tensor) -> Tensor:
    """``x`` rounded to nearest (ties to even) bfloat16, torch's own cast."""
    return x.to(torch.bfloat16)


def _random_halves(numel: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``numel`` uniform 16-bit integers: full-range 64-bit draws cut in four (a quarter of the
    generator calls of drawing each one)."""
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:numel]


def stochastic_round_to_bfloat16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (float32, or float64 first rounded to float32) stochastically rounded to bfloat16.

    Each entry becomes one of its two bfloat16 neighbours, the upper one (in magnitude) with
    probability ``(|x| - lower) / (upper - lower)``, so ``E[result] = x`` exactly for every finite
    ``x`` whose neighbours are finite. Values that bfloat16 holds exactly, infinities and NaN are
    kept as they are.

    Args:
        x: the values to round.
        generator: the source of the random bits, on ``x``'s device (``None``: the global RNG).

    Example:
        >>> x = torch.full((100_000,), 1.0 + 2**-10)   # a quarter of the way from 1 to 1 + 2**-7
        >>> y = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0))
        >>> sorted(set(y.tolist()))
        [1.0, 1.0078125]
        >>> abs(y.float().mean().item() - x[0].item()) < 1e-4   # unbiased: round-to-nearest gives 1.0
        True
    """
    x32 = x.to(torch.float32).contiguous()
    bits = x32.view(torch.int32)
    # Uniform in [0, 2^16): adding it to the magnitude's bits and clearing the low 16 rounds up
    # exactly when it reaches past the gap's fraction below x.
    rounded = _random_halves(x32.numel(), x32.device, generator).view(x32.shape).to(torch.int32)
    rounded += 1 << (_LOW_BITS - 1)
    magnitude = bits & ~_SIGN
    # A NaN whose payload's top bits are all ones would carry into the sign; capped, it stays NaN
    # (infinities and finite values are below the cap).
    magnitude.clamp_max_(_LARGEST_NAN_BASE)
    rounded += magnitude
    rounded &= _HIGH_MASK
    rounded |= bits & _SIGN
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
