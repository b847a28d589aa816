"""The update scale that gives a restored low-rank update the size of a full-rank one.

A moment rule normalizes the projected gradient entry by entry (Adam divides by ``sqrt(v)``,
Adafactor by its factored RMS), so the projected update ``U`` has entries of the size a
full-rank optimizer's update would have. Restoring it with orthonormal factors keeps its
Frobenius norm, ``||U P^T|| = ||U||`` (Tucker-2: ``||C x_1 P_O x_2 P_I|| = ||C||``), but spreads it
over every entry of the weight, so its RMS shrinks by ``sqrt(numel(U) / numel(W))``: for an
``m x n`` weight projected to ``m x r``, by ``sqrt(r / n)``. Multiplying by the inverse restores
the RMS the rule gave, the RMS a full-rank step of the same rule has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["norm_matched_scale"]


def norm_matched_scale(full_shape: Sequence[int], projected_shape: Sequence[int]) -> float:
    """``sqrt(numel(full_shape) / numel(projected_shape))``: the factor that makes the restored
    update's RMS equal to the projected update's, with orthonormal factors.

    ``sqrt(n / r)`` for an ``(m, n)`` matrix whose moments are ``(m, r)``; for a Tucker-2 kernel
    ``(O, I, *k)`` with a core ``(r_O, r_I, *k)``, ``sqrt(O I / (r_O r_I))``.
    """
    full, projected = math.prod(full_shape), math.prod(projected_shape)
    if full <= 0 or projected <= 0:
        raise ValueError(f"shapes must be non-empty, got {tuple(full_shape)} and {tuple(projected_shape)}")
    return math.sqrt(full / projected)
