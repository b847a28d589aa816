r"""How a parameter sharded on dim 0 (FSDP2's ``fully_shard``) is stepped: a :class:`ShardPlan`.

Each rank holds rows ``[offset, offset + rows)`` of dim 0 of the weight and of its averaged
gradient. What that means for COAP depends on where dim 0 falls in the parameter's layout
(:mod:`coap_torch.optim._layout`), and gives one of three splits (``ShardPlan.split``):

* ``"rows"``: dim 0 is the rows of the matrix that ``P`` multiplies (a dense matrix or vector,
  a matrix with ``P`` on its input side). ``P`` is replicated, ``G_k P`` is local, and the
  moments shard like the weight. A steady step sends nothing (Adafactor: a few sums);
  refreshes all-reduce small sums (:mod:`coap_torch.optim._sharded`).
* ``"batch"``: dim 0 is a batch of whole matrices (a 3-D stack such as MoE experts, or a dense
  kernel that Adafactor factors over its last two axes). Every rank owns whole matrices, and
  their ``P`` and moments shard with them: nothing is sent but Adafactor's whole-tensor RMS
  sums, and one flag per refresh so that every rank decides alike on non-finite gradients.
* ``"replicated"``: dim 0 is the side a factor projects (``P`` on the output side of a matrix;
  ``P_O`` of a Tucker-2 kernel). The projected gradient ``G P = sum_k G_k P_k`` is all-reduced
  at every step (the size of one moment), and the moments, computed from it, are the same on
  every rank (replicated, not sharded). The restored update ``D P_k^T`` of this rank's rows is
  local. A refresh turns the factor's column-split matrix into a row-split one by one
  all-to-all (:func:`~coap_torch.optim._sharded.columns_to_rows`: each rank sends its own share;
  no rank ever holds the whole gradient) and runs the row-split refresh.

Every split gives the result of one process up to the order of float sums.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..functional.reduction import Rows, Task
from ._layout import Layout
from ._placement import ALL_STATE, RowShard
from ._sharded import AllReduce, CommunicationLog, ShardComm, chunk_bounds, columns_to_rows

__all__ = ["ShardPlan", "contracted", "plan_shard", "replicated_state", "split_of"]


def contracted(layout: Layout) -> tuple[bool, ...]:
    """For each factor of a (global) layout, whether it projects the weight's dim 0."""
    if layout.kind == "tucker":
        return (True, False)
    if layout.kind == "matrix":
        return (layout.transposed and len(layout.shape) != 3,)
    return (False,) * len(layout.factor_keys)


def split_of(layout: Layout) -> str:
    """The :data:`~coap_torch.optim._sharded.SPLITS` entry of a (global) layout sharded on dim 0."""
    if any(contracted(layout)):
        return "replicated"
    if layout.kind == "conv_input" or (len(layout.shape) >= 3 and (layout.kind == "dense" or len(layout.shape) == 3)):
        return "batch"  # the moments' last two axes are whole on every rank
    return "rows"


def replicated_state(layout: Layout) -> frozenset[str]:
    """The state entries of a dim-0-sharded parameter that are the same on every rank (the rest
    shard like the weight); :data:`~coap_torch.optim._placement.ALL_STATE` for all of them."""
    split = split_of(layout)
    if split == "replicated":
        return ALL_STATE
    if split == "batch":  # every moment (and a stack's P) is indexed by dim 0
        return frozenset({"step", "proj_in"}) if layout.kind == "conv_input" else frozenset({"step"})
    # Rows: P on the unsharded side, and Adafactor's column accumulator, indexed by it.
    return frozenset({"step", "proj", "exp_avg_sq_col"})


@dataclass(frozen=True)
class ShardPlan:
    """A dim-0-sharded parameter's step: its local ``layout``, its ``split`` and its global one."""

    shard: RowShard
    layout: Layout  # the layout of this rank's rows
    global_layout: Layout
    split: str

    @property
    def rows(self) -> ShardComm:
        """The sums of the moment rule (see :class:`~coap_torch.optim._sharded.ShardComm`)."""
        global_rows = self.shard.global_shape[0]
        return ShardComm(self.shard.group, rows=global_rows, split=self.split, weight_rows=global_rows)

    def factor_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the stored factors: whole for replicated ones, this rank's for a stack."""
        if self.split == "batch":
            return self.layout.factor_shapes()
        return self.global_layout.factor_shapes()

    def local_factors(self, factors: list[Tensor]) -> list[Tensor]:
        """The factors as this rank's rows use them: a factor on the sharded side, its rows."""
        start, stop = self.shard.offset, self.shard.offset + self.shard.rows
        return [P[start:stop] if cut else P for P, cut in zip(factors, contracted(self.global_layout))]

    def project(self, grad: Tensor, factors: list[Tensor]) -> Task[Tensor]:
        """The projected gradient: local, or (``"replicated"``) summed over the ranks."""
        projected = self.layout.project(grad, self.local_factors(factors))
        if self.split == "replicated":
            (projected,) = yield AllReduce(self.shard.group, (projected,))
        return projected

    def sketch_part(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Callable[[Tensor], Tensor]]:
        """The whole sketch to draw for a factor whose sketch has (local) ``shape``, and this
        rank's part of it: a stack's experts draw every expert's sketch, as one process does."""
        if self.split == "batch" and len(shape) == 3:
            start, stop = self.shard.offset, self.shard.offset + self.shard.rows
            return (self.shard.global_shape[0], *shape[1:]), lambda sketch: sketch[start:stop]
        return shape, lambda sketch: sketch

    def factor_problems(
        self,
        grad: Tensor,
        moment: Tensor | None,
        factors: list[Tensor] | None,
        log: CommunicationLog,
    ) -> list[tuple[Tensor, Tensor | None, Rows]]:
        """For each factor, the (gradient matrix, first-moment matrix, sums) of its refresh.

        A factor on the sharded side gets its matrix row-split by one all-to-all, and its
        (replicated) moment cut to the same rows; the others keep this rank's rows.
        """
        layout, group, shard = self.layout, self.shard.group, self.shard
        if factors is None:  # the first step: no moment yet
            matrices, moments = layout.factor_matrices(grad), [None] * len(layout.factor_keys)
        else:
            pairs = layout.refresh_pairs(grad, moment, self.local_factors(factors))
            matrices, moments = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        taps = math.prod(shard.global_shape[2:])
        if layout.kind == "tucker":
            global_rows: tuple[int, ...] = (shard.global_shape[1] * taps, shard.global_shape[0] * taps)
        elif layout.kind == "conv_input":  # the (O * k, I) unfolding, split on O like the weight
            global_rows = (shard.global_shape[0] * taps,)
        else:
            global_rows = (layout.canonical_shape[-2] if self.split == "replicated" else shard.global_shape[0],)
        problems: list[tuple[Tensor, Tensor | None, Rows]] = []
        for matrix, first, cut, rows in zip(matrices, moments, contracted(self.global_layout), global_rows):
            if self.split == "batch" and layout.kind != "conv_input":
                problems.append((matrix, first, ShardComm(group, rows=matrix.shape[-2], split="batch")))
                continue
            if cut:
                columns = self.global_layout.factor_shapes()[len(problems)][0]
                matrix = columns_to_rows(matrix, group, columns, log)
                start, stop = chunk_bounds(rows, torch.distributed.get_world_size(group))[
                    torch.distributed.get_rank(group)
                ]
                first = None if first is None else first[start:stop]
            problems.append((matrix, first, ShardComm(group, rows=rows, split="rows")))
        return problems


def plan_shard(layout: Layout, shard: RowShard) -> ShardPlan:
    """The :class:`ShardPlan` of a parameter of (global) ``layout`` with this rank's ``shard``."""
    local = dataclasses.replace(layout, shape=(shard.rows, *shard.global_shape[1:]))
    shard = dataclasses.replace(shard, replicated=replicated_state(layout))
    return ShardPlan(shard, local, layout, split_of(layout))
