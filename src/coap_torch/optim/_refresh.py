"""Building and refreshing the projections of one parameter, never from non-finite values.

:func:`initial_factors` runs at a parameter's first step (the low-cost SVD of its first gradient
with a sketch seeded from ``(seed, parameter index)``); :func:`refreshed_factors` every
``update_interval`` steps (the warm-started low-cost SVD every ``reproject_factor`` of those,
one Eq. 2 step otherwise). A parameter's first step is its first with a finite, non-zero
gradient: an all-zero gradient (a layer behind a zero-initialised one) has no subspace to
project on, so the parameter is left as it is, as if it had no gradient (its state is created,
with a step count of 0, for ``torch.distributed.checkpoint``, which creates state by a step on
zero gradients before it loads a checkpoint into it). Both are generators: under FSDP2 they yield the all-reduces of the
sharded refreshes (see :mod:`coap_torch.optim._sharded`); in one process they yield nothing.

Both run the functional refreshes (:mod:`coap_torch.functional`) with the gradient's
:class:`~coap_torch.functional.reduction.Rows`: the same code in one process and under FSDP2.
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
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..functional.correlation import correlation_step_task
from ..functional.reduction import LOCAL, Rows, Task
from ..functional.subspace import gaussian_sketch, low_cost_svd_task, rank_tolerance
from ._layout import Layout

__all__ = [
    "InitialFactors",
    "Problem",
    "all_finite",
    "caller_stacklevel",
    "initial_factors",
    "local_problems",
    "refreshed_factors",
    "sketch_seed",
]


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


#: Per factor of a parameter: the matrix its refresh reads (``G``, or an unfolding of a
#: kernel's gradient), the first moment expressed for it (``None`` at the first step), and the
#: :class:`~coap_torch.functional.reduction.Rows` that sums over the matrix's rows.
Problem = tuple[Tensor, "Tensor | None", Rows]


def local_problems(layout: Layout, grad: Tensor, moment: Tensor | None, factors: list[Tensor] | None) -> list[Problem]:
    """The :data:`Problem` of each factor in one process."""
    if factors is None:  # the first step
        return [(matrix, None, LOCAL) for matrix in layout.factor_matrices(grad)]
    return [(matrix, first, LOCAL) for matrix, first in layout.refresh_pairs(grad, moment, factors)]


class InitialFactors(NamedTuple):
    """What :func:`initial_factors` builds: the projections, and whether the gradient determined
    them (``False`` for an all-zero gradient: they are the orthonormalized sketch)."""

    factors: dict[str, Tensor]
    informed: bool


def initial_factors(
    layout: Layout,
    grad: Tensor,
    problems: list[Problem],
    group: dict[str, Any],
    index: int,
    where: str,
    rows: Rows = LOCAL,
    sketch_part: Callable[[tuple[int, ...]], tuple[tuple[int, ...], Callable[[Tensor], Tensor]]] | None = None,
) -> Task[InitialFactors | None]:
    """The projections of a parameter at its first step, from its (canonical) gradient, or ``None``.

    ``None`` (with a warning) when the gradient is not finite or the SVD failed. An all-zero
    gradient (every entry, on every rank) gives uninformed factors: a layer behind a
    zero-initialised one (ControlNet's zero convolutions, adaLN-Zero gates) gets one, and a
    ``P`` drawn from the sketch alone would stay until the first low-cost SVD, T_u * lambda
    steps later (an Eq. 2 step correlates it with moments that are still about zero); the
    optimizer builds them again from the next gradient.

    ``problems`` are its factors' matrices (:func:`local_problems` in one process); ``rows`` the
    parameter's own sums, which decide (alike on every rank) whether ``grad`` is finite, and
    whether it is zero (from the singular values, computed from sums or counted over the ranks).
    ``sketch_part`` maps a factor's sketch shape to the whole shape to draw and this rank's part
    of it (a stack sharded on its experts draws every expert's sketch, as one process does).
    """
    if not (yield from rows.finite(grad)):
        return _deferred(where)
    generator = torch.Generator().manual_seed(sketch_seed(group["seed"], index))
    factors: dict[str, Tensor] = {}
    informed = True
    try:
        for key, (matrix, _, matrix_rows), rank in zip(layout.factor_keys, problems, layout.ranks):
            shape = (*matrix.shape[:-2], matrix.shape[-1], rank)
            whole, part = (shape, lambda sketch: sketch) if sketch_part is None else sketch_part(shape)
            sketch = part(gaussian_sketch(whole, generator=generator, dtype=grad.dtype, device=grad.device))
            result = yield from low_cost_svd_task(matrix, rank, sketch, matrix_rows)
            if result is None:  # a non-finite gradient on some rank: every rank sees it in the sums
                return _deferred(where)
            factors[key], singular = result
            if len(factors) == 1:  # every unfolding of a zero gradient is zero
                informed = yield from rows.any_nonzero(singular[..., 0])
            if informed and layout.kind != "tucker":
                first_svd = max(2, group["update_interval"] * group["reproject_factor"])  # never at step 1
                _warn_if_rank_deficient(singular, matrix_rows.count(matrix), matrix.shape[-1], layout, first_svd, where)
    except torch.linalg.LinAlgError as error:
        return _deferred(where, error)
    if not all_finite(*factors.values()):
        return _deferred(where)
    return InitialFactors(factors, informed)


def _deferred(where: str, error: Exception | None = None) -> None:
    cause = f"the low-cost SVD failed ({error})" if error is not None else "its gradient is not finite"
    warnings.warn(
        f"{where}: no projection could be built at its first step: {cause}. The parameter was left "
        "unchanged; its projection and moments are created at its next step with a finite gradient.",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def _warn_if_rank_deficient(singular: Tensor, rows: int, cols: int, layout: Layout, first_svd: int, where: str) -> None:
    # Once per parameter, at initialisation only (the check needs one host sync). The remedies
    # differ by cause: a batch smaller than the rank, or a layer behind a nearly closed
    # zero-initialised gate (adaLN-Zero), whose gradient is low-rank for its first steps only.
    tolerance = rank_tolerance(singular, rows, cols)
    if bool((singular[..., -1] <= tolerance[..., 0]).any()):
        numerical = int((singular > tolerance).sum(-1).min())
        warnings.warn(
            f"{where}: its first gradient has numerical rank {numerical} < rank {layout.ranks[0]}, so its "
            f"top-{layout.ranks[0]} subspace is not unique. The undetermined directions are filled "
            "deterministically from the seeded sketch and stay until the first low-cost SVD, at its step "
            f"{first_svd} (update_interval * reproject_factor; Eq. 2 steps move P little at usual gradient scales). Use batches "
            "larger than the rank (or a smaller rank) for a data-driven subspace; behind a zero-initialised "
            "gate (adaLN-Zero), whose early gradients are low-rank, a smaller reproject_factor brings that "
            "SVD sooner.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )


def refreshed_factors(
    layout: Layout,
    problems: list[Problem],
    old: list[Tensor],
    group: dict[str, Any],
    step: int,
    where: str,
    rows: Rows = LOCAL,
) -> Task[list[Tensor] | None]:
    """The factors after the refresh due at ``step``, or ``None`` (with a warning) to keep ``old``.

    ``problems`` are the factors' (matrix, first moment, sums); ``rows`` the parameter's own sums.
    """
    reproject = step % (group["update_interval"] * group["reproject_factor"]) == 0
    new: list[Tensor] | None = None
    # LAPACK's SVD raises on non-finite input, so it is checked first (an Eq. 2 step in one
    # process passes non-finite values on to its result, checked below); row-split sums check
    # themselves, the same on every rank.
    if (not reproject and rows.local) or (yield from rows.finite(*(matrix for matrix, _, _ in problems))):
        try:
            new = []
            for (matrix, moment, matrix_rows), P, rank in zip(problems, old, layout.ranks):
                factor = yield from _refreshed_factor(matrix, moment, P, rank, group, reproject, matrix_rows)
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
    matrix: Tensor, moment: Tensor, P: Tensor, rank: int, group: dict[str, Any], reproject: bool, rows: Rows
) -> Task[Tensor | None]:
    """One refreshed factor: the warm-started low-cost SVD or the Eq. 2 step (``None``: no finite result)."""
    if reproject:
        result = yield from low_cost_svd_task(matrix, rank, P, rows)
        return None if result is None else result[0]
    options = {"normalize": group["correlation_normalize"], "max_norm": group["correlation_max_norm"]}
    return (yield from correlation_step_task(P, matrix, moment, group["correlation_lr"], rows=rows, **options))
