r"""Sums over the rows of a matrix sharded across processes (FSDP2), coalesced across parameters.

Under FSDP2 a weight ``W`` (M, N) is sharded on dim 0: each rank holds rows ``W_k`` (m_k, N) and
receives the matching rows ``G_k`` of the averaged gradient. With ``P`` (N, r) on the unsharded
side, replicated, a steady step (``G_k P``, the moment rule, ``W_k += D_k P^T``) is local and
the moments ``(m_k, r)`` shard exactly like the weight. Only the refreshes (and Adafactor's
statistics) need sums over all rows. (The other layouts, and how they reduce to this one at
their refreshes, are in :mod:`coap_torch.optim._sharding`.) They are the same code as in one process
(:mod:`coap_torch.functional`: the low-cost SVD, the Eq. 2 step, Adafactor's direction), run
with a :class:`ShardComm` as their :class:`~coap_torch.functional.reduction.Rows`:

* a sum is an all-reduce;
* the orthonormal basis of the range-finder product ``Y = G Omega`` comes from its Gram matrix
  ``Y^T Y`` (r, r; float64, so that squaring the condition number costs nothing in float32)
  and an eigendecomposition, the same on every rank, instead of a QR of rows no rank holds.

The collectives are coalesced per step. Each computation is a generator that yields an
:class:`AllReduce` request where it needs sums, and an optimizer step runs the generators of all
its parameters in lockstep (:func:`run_coalesced`): each round gathers the pending requests of
every parameter and issues one all-reduce of their concatenation per process group and dtype. A
refresh step therefore issues a fixed number of all-reduces (one per round: two for a low-cost
SVD or an Eq. 2 step), however many matrices it refreshes; the payload bytes are the same as one
all-reduce per sum.

Signs are canonical (by correlation with the sketch, as in one process), so every rank and
every world size computes the same ``P`` as one process would, up to the order of float sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.reduction import Rows, Task

__all__ = [
    "SPLITS",
    "AllReduce",
    "CommunicationLog",
    "ShardComm",
    "Task",
    "chunk_bounds",
    "columns_to_rows",
    "correlation_step_payload_bytes",
    "low_cost_svd_payload_bytes",
    "run_coalesced",
]

T = TypeVar("T")


@dataclass
class CommunicationLog:
    """The collectives an optimizer issued: ``calls`` and payload ``bytes`` (per rank).

    The all-reduces of one ``step()`` are coalesced (see :func:`run_coalesced`): ``calls`` grows
    by the number of rounds of the step (per process group and dtype), not by the number of
    parameters. ``bytes`` is the size of the tensors passed to ``all_reduce``; a ring all-reduce
    moves about ``2 (W - 1) / W`` times that per rank. Read it around ``step()`` to get a
    per-step figure, and :meth:`reset` it when you like; it is not part of the optimizer's
    ``state_dict``.
    """

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0


@dataclass(frozen=True)
class AllReduce:
    """What a step yields where it needs sums: ``tensors`` summed over the process ``group``."""

    group: dist.ProcessGroup
    tensors: tuple[Tensor, ...]


#: How a :class:`ShardComm` parameter's tensors are split over the ranks: ``"rows"`` (the rows of
#: its matrices: a dense matrix or vector, or a matrix with ``P`` on its unsharded side),
#: ``"batch"`` (its leading dimension only: stacks of matrices and dense kernels, each matrix
#: whole on one rank), ``"replicated"`` (its moments are the same on every rank: ``P`` on the
#: sharded side, Tucker-2 cores; only the weight is split).
SPLITS = ("rows", "batch", "replicated")


class ShardComm(Rows):
    """Sums over a parameter sharded on dim 0 across ``group`` (see :class:`~coap_torch.functional.reduction.Rows`).

    ``split`` says which of the three kinds of sums cross ranks (see :data:`SPLITS`); ``rows``
    is the number of rows of the whole matrices (``"rows"`` only), ``weight_rows`` the size of
    the weight's dim 0.
    """

    local = False

    def __init__(self, group: dist.ProcessGroup, *, rows: int, split: str = "rows", weight_rows: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        self.group = group
        self.rows = rows
        self.split = split
        self.weight_rows = rows if weight_rows is None else weight_rows

    def reduce(
        self, sums: tuple[Tensor, ...] = (), totals: tuple[Tensor, ...] = (), weight: tuple[Tensor, ...] = ()
    ) -> Task[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """One all-reduce request (coalesced by :func:`run_coalesced`) for the kinds that cross ranks."""
        crossing = (self.split == "rows", self.split != "replicated", True)
        parts = (list(sums), list(totals), list(weight))
        send = [t for part, cross in zip(parts, crossing) if cross for t in part]
        if send:
            summed = iter((yield AllReduce(self.group, tuple(send))))
            parts = tuple([next(summed) for _ in part] if cross else part for part, cross in zip(parts, crossing))
        return parts

    def finite(self, *tensors: Tensor) -> Task[bool]:
        if self.split != "batch":
            return True  # row-split sums tell (see Rows.finite); a replicated split refreshes on row splits
        # Non-finite entries counted on every rank, summed: every rank takes the same decision.
        bad = torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum().to(torch.float32).reshape(1)
        _, _, (bad,) = yield from self.reduce(weight=(bad,))
        return not bool(bad.item())

    def any_nonzero(self, values: Tensor) -> Task[bool]:
        if self.split != "batch":
            return (yield from Rows.any_nonzero(self, values))
        nonzero = values.ne(0).sum().to(torch.float32).reshape(1)  # a rank's experts, counted over the ranks
        _, _, (nonzero,) = yield from self.reduce(weight=(nonzero,))
        return bool(nonzero.item())

    def orthonormal_basis(self, Y: Tensor) -> Task[Tensor | None]:
        """``Q = Y K^{-1/2}`` on the numerically non-zero part of ``K = Y^T Y`` (summed over the
        ranks): orthonormal columns over all rows, the columns of a rank-deficient ``Y`` zero
        (their singular values then 0, filled from the sketch). ``None`` when ``K`` is not finite,
        which every rank sees alike. Whole matrices (``"batch"``) take the QR of one process."""
        if self.split != "rows":
            return (yield from Rows.orthonormal_basis(self, Y))
        (gram,) = yield from self.sum(Y.double().mT @ Y.double())
        if not bool(torch.isfinite(gram).all()):
            return None
        values, vectors = torch.linalg.eigh(gram)
        keep = values > values[..., -1:].clamp_min(0) * (Y.shape[-1] * torch.finfo(torch.float64).eps)
        inverse_sqrt = torch.where(
            keep, values.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(values)
        )
        return Y @ (vectors * inverse_sqrt.unsqueeze(-2)).to(Y.dtype)

    def count(self, matrix: Tensor) -> int:
        return self.rows if self.split == "rows" else matrix.shape[-2]

    def numel(self, tensor: Tensor) -> int:
        return math.prod(tensor.shape[1:]) * self.weight_rows


def chunk_bounds(total: int, world: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each rank's chunk of ``total`` rows, as ``torch.chunk`` (and ``Shard(0)``) split them."""
    chunk = -(-total // world) if total else 0
    return [(min(rank * chunk, total), min((rank + 1) * chunk, total)) for rank in range(world)]


def columns_to_rows(matrix: Tensor, group: dist.ProcessGroup, columns: int, log: CommunicationLog) -> Tensor:
    """This rank's chunk of rows, with every column, of a matrix whose columns are split over ``group``.

    ``matrix`` (a, c_k) holds this rank's columns (in rank order, ``columns`` in all); the result
    is (a_k, columns), rows chunked as :func:`chunk_bounds`. One all-to-all: each rank sends and
    receives about its own share, so no rank ever holds the whole matrix. Used at refreshes of a
    factor that sits on the sharded side, which then run on row shards as any other.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = chunk_bounds(matrix.shape[0], world)
    widths = [stop - start for start, stop in chunk_bounds(columns, world)]
    mine = rows[rank][1] - rows[rank][0]
    # all_to_all_single on flat buffers: gloo's list all_to_all wants equal blocks.
    send = matrix.contiguous().reshape(-1)  # row chunks are contiguous runs of it, in rank order
    send_sizes = [(stop - start) * matrix.shape[1] for start, stop in rows]
    receive_sizes = [mine * width for width in widths]
    receive = matrix.new_empty(sum(receive_sizes))
    dist.all_to_all_single(receive, send, receive_sizes, send_sizes, group=group)
    log.calls += 1
    log.bytes += send.numel() * send.element_size()
    blocks = [part.view(mine, width) for part, width in zip(receive.split(receive_sizes), widths)]
    return torch.cat(blocks, dim=1)


def run_coalesced(tasks: Iterable[Task[Any]], log: CommunicationLog) -> None:
    """Run ``tasks`` to completion, their all-reduces coalesced round by round.

    Tasks start in order, each running until its first request (a task that needs no collective
    finishes before the next one starts). Then, while requests are pending, one all-reduce per
    (process group, dtype) sums all of them, and each waiting task resumes, in order, until its
    next request. Every rank must run the same tasks and take the same branches (refreshes are
    decided by the step counter, the same on every rank), so that their collectives match.

    A suspended task keeps its working state alive until its round completes: that is a few
    r-sized tensors per refreshing matrix, besides the gradient shard it reads on both sides of
    a collective; the steps avoid holding other full-size temporaries while suspended.
    """
    pending: list[tuple[Task[Any], AllReduce]] = []
    for task in tasks:
        request = _advance(task, None)
        if request is not None:
            pending.append((task, request))
    while pending:
        results = _all_reduce_coalesced([request for _, request in pending], log)
        waiting, pending = pending, []
        for (task, _), sums in zip(waiting, results):
            request = _advance(task, sums)
            if request is not None:
                pending.append((task, request))


def _advance(task: Task[Any], sums: list[Tensor] | None) -> AllReduce | None:
    try:
        return task.send(sums)  # type: ignore[arg-type]
    except StopIteration:
        return None


def _group_key(group: dist.ProcessGroup) -> Any:
    # The same on every rank (a group's name is given in creation order), so every rank puts the
    # same requests in the same buckets.
    return getattr(group, "group_name", None) or group


def _all_reduce_coalesced(requests: list[AllReduce], log: CommunicationLog) -> list[list[Tensor]]:
    """The sums of every request's tensors: one all-reduce per (group, dtype, device), in order of first use."""
    buckets: dict[Any, tuple[dist.ProcessGroup, list[tuple[int, int]]]] = {}
    for i, request in enumerate(requests):
        for j, tensor in enumerate(request.tensors):
            key = (_group_key(request.group), tensor.dtype, tensor.device)
            buckets.setdefault(key, (request.group, []))[1].append((i, j))
    results: list[list[Any]] = [[None] * len(request.tensors) for request in requests]
    for group, members in buckets.values():
        tensors = [requests[i].tensors[j] for i, j in members]
        # All-reduce is element-wise: every entry is the same sum over the ranks as in an
        # all-reduce of its own request (bit for bit on two ranks; on more, the order of the
        # additions may follow an entry's place in the buffer, as within one request already).
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        log.calls += 1
        log.bytes += flat.numel() * flat.element_size()
        for (i, j), part, tensor in zip(members, flat.split([t.numel() for t in tensors]), tensors):
            results[i][j] = part.view_as(tensor)
    return results


def low_cost_svd_payload_bytes(n: int, rank: int, element_size: int) -> int:
    """All-reduce payload (bytes per rank) of the low-cost SVD (:func:`~coap_torch.functional.subspace.low_cost_svd_task`)
    of an (M, n) row-sharded matrix: the float64 (r, r) Gram matrix, then the (r, n) product ``Q^T G`` in the
    gradient's dtype."""
    return 8 * rank * rank + element_size * rank * n


def correlation_step_payload_bytes(n: int, rank: int, element_size: int) -> int:
    """All-reduce payload (bytes per rank) of the Eq. 2 step (:func:`~coap_torch.functional.correlation.correlation_step_task`):
    two (r, r) sums and two scalars, then one (n, r) sum, all in ``P``'s dtype."""
    return element_size * (2 * rank * rank + 2) + element_size * n * rank
