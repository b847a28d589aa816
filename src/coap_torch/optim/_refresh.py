"""Building and refreshing the projections of one parameter, never from non-finite values.

:func:`initial_factors` runs at a parameter's first step (the low-cost SVD of its first gradient
with a sketch seeded from ``(seed, parameter index)``); :func:`refreshed_factors` every
``update_interval`` steps (the warm-started low-cost SVD every ``reproject_factor`` of those,
one Eq. 2 step otherwise). Both are generators: under FSDP2 they yield the all-reduces of the
sharded refreshes (see :mod:`coap_torch.optim._sharded`); in one process they yield nothing.

Neither ever returns factors that are not finite. A non-finite gradient (or first moment), or a
failed SVD, makes :func:`initial_factors` return ``None`` (initialisation waits for the next
finite gradient) and :func:`refreshed_factors` return ``None`` (the previous factors stay), each
with a ``RuntimeWarning`` that names the parameter. The checks cost a host sync, at refresh
steps only. Under FSDP2 every rank takes the same decision: it reads sums all-reduced over the
ranks, or factors computed from them.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from ..functional.correlation import correlation_aware_step
from ..functional.subspace import _rank_tolerance, gaussian_sketch, low_cost_svd, low_cost_svd_with_values
from ..functional.tucker import unfold
from ._layout import Layout
from ._sharded import ShardComm, Task, sharded_correlation_step, sharded_low_cost_svd

__all__ = ["all_finite", "caller_stacklevel", "initial_factors", "refreshed_factors", "sketch_seed"]


def sketch_seed(seed: int, index: int) -> int:
    """The seed of parameter ``index``'s first sketch under the group ``seed``.

    Distinct, reproducible streams per (seed, parameter index) without the overlap that
    ``seed + index`` would give (seed 0 / index 1 vs seed 1 / index 0).
    """
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host sync)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


def caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the
    first frame outside this package's optimizers and torch (the user's ``step()`` or backward)."""
    skip = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "") for path in (__file__, torch.__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def initial_factors(
    layout: Layout, grad: Tensor, group: dict[str, Any], index: int, where: str, comm: ShardComm | None = None
) -> Task[dict[str, Tensor] | None]:
    """The projections of a parameter at its first step, from its (canonical) gradient, or ``None``."""
    factors: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(sketch_seed(group["seed"], index))
    try:
        if layout.kind == "matrix" and comm is not None:
            n, rank = grad.shape[-1], layout.ranks[0]
            sketch = gaussian_sketch((n, rank), generator=generator, dtype=grad.dtype, device=grad.device)
            global_shape = (comm.rows, n)
            result = yield from sharded_low_cost_svd(grad, rank, sketch, comm, global_shape)
            if result is None:  # a non-finite gradient on some rank: every rank sees it in the sums
                return _deferred(where)
            factors["proj"], singular = result
            _warn_if_rank_deficient(torch.empty(global_shape, device="meta"), singular, layout, where)
        elif not all_finite(grad):
            return _deferred(where)
        elif layout.kind == "matrix":
            factors["proj"], singular = low_cost_svd_with_values(grad, layout.ranks[0], generator=generator)
            _warn_if_rank_deficient(grad, singular, layout, where)
        else:  # Tucker-2: one factor per channel mode
            for key, mode, rank in zip(layout.factor_keys, (0, 1), layout.ranks):
                factors[key] = low_cost_svd(unfold(grad, mode).mT, rank, generator=generator)
    except torch.linalg.LinAlgError as error:
        return _deferred(where, error)
    if not all_finite(*factors.values()):
        return _deferred(where)
    return factors


def _deferred(where: str, error: Exception | None = None) -> None:
    cause = f"the low-cost SVD failed ({error})" if error is not None else "its gradient is not finite"
    warnings.warn(
        f"{where}: no projection could be built at its first step: {cause}. The parameter was left "
        "unchanged; its projection and moments are created at its next step with a finite gradient.",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def _warn_if_rank_deficient(grad: Tensor, singular: Tensor, layout: Layout, where: str) -> None:
    # Once per parameter, at initialisation only (the check needs one host sync).
    tolerance = _rank_tolerance(grad, singular)
    if bool((singular[..., -1] <= tolerance[..., 0]).any()):
        numerical = int((singular > tolerance).sum(-1).min())
        warnings.warn(
            f"{where}: its first gradient has numerical rank {numerical} < rank {layout.ranks[0]}, so its "
            f"top-{layout.ranks[0]} subspace is not unique. The undetermined directions are filled "
            "deterministically from the seeded sketch; use batches larger than the rank (or a smaller rank) "
            "for a data-driven subspace.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )


def refreshed_factors(
    layout: Layout,
    grad: Tensor,
    first_moment: Tensor,
    old: list[Tensor],
    group: dict[str, Any],
    step: int,
    where: str,
    comm: ShardComm | None = None,
) -> Task[list[Tensor] | None]:
    """The factors after the refresh due at ``step``, or ``None`` (with a warning) to keep ``old``."""
    reproject = step % (group["update_interval"] * group["reproject_factor"]) == 0
    pairs = layout.refresh_pairs(grad, first_moment, old)
    new: list[Tensor] | None = None
    # LAPACK's SVD raises on non-finite input, so one process checks it first; FSDP2's sharded
    # SVD checks its all-reduced Gram matrix, the same on every rank.
    if comm is not None or not reproject or all_finite(*(matrix for matrix, _ in pairs)):
        try:
            new = []
            for (matrix, moment), P, rank in zip(pairs, old, layout.ranks):
                factor = yield from _refreshed_factor(matrix, moment, P, rank, group, reproject, comm)
                if factor is None:
                    new = None
                    break
                new.append(factor)
        except torch.linalg.LinAlgError:
            new = None
    if new is None or not all_finite(*new):
        kind = "low-cost SVD" if reproject else "Eq. 2 step"
        warnings.warn(
            f"{where}: the {kind} refresh of its projection at step {step} met non-finite values (gradient or "
            "first moment); the previous projection is kept.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
        return None
    return new


def _refreshed_factor(
    matrix: Tensor, moment: Tensor, P: Tensor, rank: int, group: dict[str, Any], reproject: bool, comm: ShardComm | None
) -> Task[Tensor | None]:
    """One refreshed factor: the warm-started low-cost SVD or the Eq. 2 step (``None``: no finite result)."""
    step_options = {"normalize": group["correlation_normalize"], "max_norm": group["correlation_max_norm"]}
    if comm is not None:
        global_shape = (comm.rows, matrix.shape[-1])
        if reproject:
            result = yield from sharded_low_cost_svd(matrix, rank, P, comm, global_shape)
            return None if result is None else result[0]
        return (yield from sharded_correlation_step(P, matrix, moment, comm, global_shape, group["correlation_lr"], **step_options))
    if reproject:
        return low_cost_svd(matrix, rank, sketch=P)
    return correlation_aware_step(P, matrix, moment, lr=group["correlation_lr"], **step_options)
