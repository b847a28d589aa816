"""Routing: how a parameter is projected, derived from its shape and its group, never stored.

Four kinds of parameter:

* ``dense``: updated by the plain moment rule (1-D tensors, matrices whose smaller side does
  not exceed the rank, small kernels, and every parameter of a group with ``coap=False``).
* ``matrix``: ``G`` (m, n), or a stack (B, m, n) of independent matrices such as MoE experts,
  or a 1x1 convolution kernel (O, I, 1, 1) seen as the (O, I) matrix it is. The projection ``P``
  sits on the smaller side (the paper): when m < n we work on ``G^T`` (``transposed``), so there
  is one code path and the Eq. 2 cosine is taken over the rows of the canonical orientation. The
  group option ``projection_side`` moves it: ``"input"`` to the last axis (n, the input side of a
  linear layer, which FSDP2 does not shard), ``"larger"`` to the larger side. The choice is the
  same in every engine (FSDP2's cost of each: :mod:`coap_torch.optim._sharding`).
* ``tucker``: kernels (O, I, *k) with a kernel of more than one tap and at least
  ``min_conv_numel`` entries: Tucker-2 with ``P_O`` (O, r_O) and ``P_I`` (I, r_I).
* ``conv_input``: the same kernels with ``conv_projection="input"``: only the input-channel mode
  is projected, by ``P_I`` (I, r_I); the moments are (O, *k, r_I). Under FSDP2 (sharded on O)
  its steady steps then need no communication, where Tucker-2's ``P_O`` sits on the sharded
  side (see :mod:`coap_torch.optim._sharding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from torch import Tensor

from ..functional.moments import rotate_first_moment, rotate_second_moment
from ..functional.tucker import (
    conv_ranks,
    mode_matrices,
    tucker2_add_restored_,
    tucker2_project,
    tucker2_restore,
    unfold,
)
from ..functional.update_scale import norm_matched_scale

#: The rank ratio used when neither ``rank`` nor the matching ``rank_ratio_*`` is set.
DEFAULT_RANK_RATIO = 2.0

#: Values of the ``projection_side`` option: ``None`` (the smaller side, but the input side for
#: parameters sharded on dim 0), ``"smaller"`` (always the smaller side), ``"input"`` (always
#: the last axis), ``"larger"`` (the larger side, the moments on the smaller one).
PROJECTION_SIDES = (None, "smaller", "input", "larger")

#: Where ``projection_side=None`` puts ``P`` on a matrix whose state is created now: the smaller
#: side, the paper's, chosen by measurement against the input and larger sides (README, "Where P
#: sits"): the best held-out loss on both training jobs.
DEFAULT_PROJECTION_SIDE = "smaller"

#: Where earlier versions put it in one process: with ``projection_side=None``, a matrix whose
#: saved state was built there keeps it (:func:`keeps_earlier_side`), so their checkpoints resume.
EARLIER_DEFAULT_SIDE = "smaller"

#: Values of the ``conv_projection`` option: Tucker-2 on both channel modes, or the input mode only.
CONV_PROJECTIONS = ("tucker2", "input")

Kind = Literal["dense", "matrix", "tucker", "conv_input"]


@dataclass(frozen=True)
class Layout:
    """How one parameter is projected. ``ranks`` is ``(r,)`` for matrices, ``(r_O, r_I)`` for Tucker-2."""

    kind: Kind
    shape: tuple[int, ...]
    ranks: tuple[int, ...] = ()
    transposed: bool = False

    @property
    def factor_keys(self) -> tuple[str, ...]:
        return {"dense": (), "matrix": ("proj",), "tucker": ("proj_out", "proj_in"), "conv_input": ("proj_in",)}[
            self.kind
        ]

    @property
    def projected(self) -> bool:
        return self.kind != "dense"

    # -- the canonical view of a gradient-shaped tensor ------------------------------------
    def canonical(self, x: Tensor) -> Tensor:
        """``x`` (param-shaped) as the matrix / stack of matrices / kernel the math works on."""
        if self.kind == "matrix":
            x = x.reshape(self.shape[:2]) if len(self.shape) >= 4 else x
            return x.mT if self.transposed else x
        if self.kind == "conv_input":  # (O, *k, I): a stack of (k_last, I) matrices
            return x.movedim(1, -1)
        return x

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        if self.kind == "conv_input":
            return (self.shape[0], *self.shape[2:], self.shape[1])
        if self.kind != "matrix":
            return self.shape
        shape = self.shape[:2] if len(self.shape) >= 4 else self.shape
        return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

    def factor_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``P`` (..., n, r) or of ``(P_O, P_I)``."""
        if self.kind == "matrix":
            *batch, _, n = self.canonical_shape
            return [(*batch, n, self.ranks[0])]
        if self.kind == "conv_input":
            return [(self.shape[1], self.ranks[0])]
        if self.kind == "tucker":
            return [(self.shape[0], self.ranks[0]), (self.shape[1], self.ranks[1])]
        return []

    @property
    def projected_shape(self) -> tuple[int, ...]:
        """Shape of the moments: (..., m, r) for matrices, (r_O, r_I, *k) for Tucker-2, (O, *k, r_I) for input-mode kernels."""
        if self.kind in ("matrix", "conv_input"):
            return (*self.canonical_shape[:-1], self.ranks[0])
        if self.kind == "tucker":
            return (*self.ranks, *self.shape[2:])
        return self.shape

    def _reduced_modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The sizes of the modes ``P`` reduces and their ranks (per matrix of a stack, so
        that an empty shard of one still has them)."""
        if self.kind == "matrix":
            return (self.canonical_shape[-1],), self.ranks
        if self.kind == "conv_input":
            return (self.shape[1],), self.ranks
        return tuple(self.shape[:2]), self.ranks

    def update_scale(self, scale: float | str) -> float:
        """The factor of this parameter's restored update: ``scale``, or for ``"auto"`` the one
        that gives it the RMS of the projected update (:func:`~coap_torch.functional.norm_matched_scale`)."""
        if isinstance(scale, str):
            return norm_matched_scale(*self._reduced_modes()) if self.projected else 1.0
        return float(scale)

    def rms_fraction(self, scale: float | str) -> float | None:
        """The fraction of the weight's entries a rule measures its update's RMS over (Adafactor's
        clip): for ``"auto"`` the projected update's share, whose RMS the weight then receives;
        ``None`` (all of them) otherwise, where an explicit ``scale`` multiplies after the clip,
        as ``lr`` does."""
        if not (isinstance(scale, str) and self.projected):
            return None
        full, reduced = self._reduced_modes()
        return math.prod(reduced) / math.prod(full)

    # -- the math, one code path per kind ---------------------------------------------------
    def project(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """Canonical gradient (or moment, with rotation factors) -> low-rank space."""
        if self.kind in ("matrix", "conv_input"):
            return x @ factors[0]
        return tucker2_project(x, *factors)

    def restore(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """Low-rank update -> param-shaped full update."""
        if self.kind == "conv_input":
            return (x @ factors[0].mT).movedim(-1, 1)
        if self.kind == "matrix":
            full = x @ factors[0].mT
            full = full.mT if self.transposed else full
            return full.reshape(self.shape)
        return tucker2_restore(x, *factors)

    def add_restored_(
        self, target: Tensor, x: Tensor, factors: list[Tensor], *, beta: float | Tensor, alpha: float
    ) -> None:
        """``target <- beta * target + alpha * restore(x)`` in place (param-shaped ``target``).

        For matrices this is a single GEMM with accumulation (``addmm_`` / ``baddbmm_``), and for
        Tucker-2 kernels the last of its two products is, so the restored full-size update is
        never materialised and the decay costs no extra pass.
        """
        if isinstance(beta, Tensor):  # a step size that depends on the weight (Adafactor)
            target.mul_(beta)
            beta = 1.0
        if self.kind == "matrix" and target.is_contiguous():
            P = factors[0]
            view = target.view(self.shape[:2]) if len(self.shape) >= 4 else target
            a, b = (P, x.mT) if self.transposed else (x, P.mT)
            if view.dim() == 2:
                view.addmm_(a, b, beta=beta, alpha=alpha)
            else:
                view.baddbmm_(a, b, beta=beta, alpha=alpha)
            return
        if self.kind == "tucker" and target.is_contiguous():
            tucker2_add_restored_(target, x, *factors, beta=beta, alpha=alpha)
            return
        if beta != 1.0:
            target.mul_(beta)
        target.add_(self.restore(x, factors), alpha=alpha)

    def factor_matrices(self, grad: Tensor) -> list[Tensor]:
        """For each factor, the matrix of the (canonical) gradient its first low-cost SVD reads."""
        if self.kind == "matrix":
            return [grad]
        if self.kind == "conv_input":
            return [grad.reshape(-1, grad.shape[-1])]
        return [unfold(grad, mode).mT for mode in (0, 1)]

    def refresh_pairs(self, grad: Tensor, exp_avg: Tensor, factors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """For each factor, the (gradient matrix, first-moment matrix) pair of its Eq. 2 / SVD."""
        if self.kind == "matrix":
            return [(grad, exp_avg)]
        if self.kind == "conv_input":  # the mode-2 fibres as rows: (O * k, I) and (O * k, r_I)
            return [(grad.reshape(-1, grad.shape[-1]), exp_avg.reshape(-1, exp_avg.shape[-1]))]
        return list(mode_matrices(grad, exp_avg, *factors))

    def rotate(self, moment: Tensor, rotations: list[Tensor], kind: str) -> Tensor:
        """Move a low-rank moment to new factors, given ``R_k = P_old_k^T P_new_k``.

        ``kind`` is ``"linear"`` (first moments: ``M R``), ``"squared"`` (second moments:
        ``V (R*R)``, see :func:`~coap_torch.functional.rotate_second_moment`), or ``"row"`` /
        ``"col"`` for the accumulators of a factored second moment, which hold means of squares
        over the last / second-to-last axis of the projected gradient and so take the squared
        rotation on the projected axes they keep.
        """
        if kind not in ("linear", "squared", "row", "col"):
            raise ValueError(f"unknown moment rotation kind {kind!r}")
        if self.kind in ("matrix", "conv_input"):
            if kind == "linear":
                return rotate_first_moment(moment, rotations[0])
            if kind == "squared":
                return rotate_second_moment(moment, rotations[0])
            if kind == "row":  # indexed by the unprojected side: means over r are kept
                return moment
            return rotate_second_moment(moment.unsqueeze(-2), rotations[0]).squeeze(-2)
        # Tucker-2: every accumulator keeps both projected modes (r_O, r_I, ...).
        if kind != "linear":
            rotations = [R.square() for R in rotations]
        return tucker2_project(moment, *rotations)


def matrix_rank(small_side: int, group: dict[str, Any]) -> int:
    """The rank of a projected matrix: ``rank_ratio_matrix`` overrides ``rank``."""
    if group["rank_ratio_matrix"] is not None:
        return max(1, int(small_side // group["rank_ratio_matrix"]))
    if group["rank"] is not None:
        return int(group["rank"])
    return max(1, int(small_side // DEFAULT_RANK_RATIO))


def cnn_ratio(group: dict[str, Any]) -> float:
    ratio = group["rank_ratio_cnn"]
    return DEFAULT_RANK_RATIO if ratio is None else float(ratio)


def tucker_saves_memory(shape: tuple[int, ...], ranks: tuple[int, int]) -> bool:
    """Whether ``P_O``, ``P_I`` and one (r_O, r_I, *k) core take fewer entries than the kernel.

    A kernel with one narrow channel side, such as a patch-embedding conv (1152, 4, 2, 2), keeps
    a factor ``P_O`` (O, r_O) far larger than the kernel itself. The test is for one moment:
    a kernel is projected only when that alone pays for the factors, so a projection that would
    save little memory (and lose gradient information and time) is not made.
    """
    out_channels, in_channels = shape[:2]
    kernel = math.prod(shape[2:])
    r_out, r_in = ranks
    factors = out_channels * r_out + in_channels * r_in
    return factors + r_out * r_in * kernel < out_channels * in_channels * kernel


def route(shape: tuple[int, ...], group: dict[str, Any]) -> Layout:
    """The :class:`Layout` of a parameter of ``shape`` in ``group`` (pure: shape + group only).

    ``group`` may leave out ``projection_side`` (the smaller side is used).
    """
    shape = tuple(shape)
    side = group.get("projection_side") or DEFAULT_PROJECTION_SIDE
    if not group["coap"] or len(shape) < 2:
        return Layout("dense", shape)
    if len(shape) >= 4:
        kernel = math.prod(shape[2:])
        if kernel == 1:
            # A 1x1 kernel is an (O, I) matrix; Tucker-2 would store P_O and P_I (about
            # 1.4 O^2 floats at ratio 2), more than the dense moments it replaces.
            small = min(shape[0], shape[1])
            rank = max(1, int(small // cnn_ratio(group)))
            return _matrix_layout(shape, shape[:2], rank, side)
        if math.prod(shape) < group["min_conv_numel"]:
            return Layout("dense", shape)
        r_out, r_in = conv_ranks(shape, cnn_ratio(group))
        if group.get("conv_projection") == "input":
            # P_I and one (O, *k, r_I) moment must take fewer entries than the kernel.
            if r_in >= shape[1] or shape[1] * r_in + shape[0] * r_in * kernel >= math.prod(shape):
                return Layout("dense", shape)
            return Layout("conv_input", shape, (r_in,))
        if r_out >= shape[0] and r_in >= shape[1]:
            return Layout("dense", shape)
        if not tucker_saves_memory(shape, (r_out, r_in)):
            return Layout("dense", shape)
        return Layout("tucker", shape, (r_out, r_in))
    # 2-D matrices and 3-D stacks of matrices (B, m, n), each with its own P.
    small = min(shape[-2], shape[-1])
    return _matrix_layout(shape, shape, matrix_rank(small, group), side)


def _matrix_layout(shape: tuple[int, ...], matrix_shape: tuple[int, ...], rank: int, side: str | None) -> Layout:
    m, n = matrix_shape[-2], matrix_shape[-1]
    if min(m, n) <= rank:
        return Layout("dense", shape)
    # The canonical matrix is (rows, P's side): transposed puts P on the first axis (m).
    transposed = {"input": False, "larger": m > n, "smaller": m < n}[side]
    return Layout("matrix", shape, (rank,), transposed=transposed)


_ROUTING_KEYS = (
    "coap",
    "rank",
    "rank_ratio_matrix",
    "rank_ratio_cnn",
    "min_conv_numel",
    "projection_side",
    "conv_projection",
)


@lru_cache(maxsize=4096)
def _cached_route(shape: tuple[int, ...], options: tuple[Any, ...]) -> Layout:
    return route(shape, dict(zip(_ROUTING_KEYS, options)))


def layout_of(param: Tensor, group: dict[str, Any]) -> Layout:
    """The :class:`Layout` of ``param`` under ``group``'s options (global shapes for a DTensor):
    the same in one process, under DDP and under FSDP2."""
    return _cached_route(tuple(param.shape), tuple(group.get(key) for key in _ROUTING_KEYS))


def earlier_default(group: dict[str, Any]) -> dict[str, Any] | None:
    """``group`` with ``P`` where earlier versions' default put it, or ``None`` when that is
    where it already goes (an explicit ``projection_side``, or the same default)."""
    if group.get("projection_side") is not None or EARLIER_DEFAULT_SIDE == DEFAULT_PROJECTION_SIDE:
        return None
    return {**group, "projection_side": EARLIER_DEFAULT_SIDE}
