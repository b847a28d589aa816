r"""The subspace refreshes on a matrix whose rows are sharded across processes (FSDP2).

Under FSDP2 a weight ``W`` (M, N) is sharded on dim 0: each rank holds rows ``W_k`` (m_k, N) and
receives the matching rows ``G_k`` of the averaged gradient. ``P`` (N, r) sits on the unsharded
side and is replicated, so a steady step (``G_k P``, the moment rule, ``W_k += D_k P^T``) is
local and the moments ``(m_k, r)`` shard exactly like the weight. Only the refreshes need
collectives, each an all-reduce of small sums that every rank then finishes identically:

* the low-cost SVD: ``Y = G Omega``, orthonormalised through its Gram matrix ``Y^T Y`` (r, r;
  float64, so that squaring the condition number costs nothing in float32), then the r x N
  product ``Q^T G``; the small SVD that follows runs on every rank on identical data;
* the Eq. 2 step: the cosine sum, ``||G||^2`` and two (r, r) sums, then one N x r sum.

Adafactor is the exception: its column accumulator, the mean of its row accumulator, its update
clipping and its parameter scale are sums over all rows, so each of its steps all-reduces
``r + 2`` numbers, then one (:func:`sharded_adafactor_direction_`).

The collectives are coalesced per step. Each function here is a generator that yields an
:class:`AllReduce` request where it needs sums (``sums = yield from comm.all_reduce(...)``), and
an optimizer step runs the generators of all its parameters in lockstep
(:func:`run_coalesced`): each round gathers the pending requests of every parameter and issues
one all-reduce of their concatenation per process group and dtype. A refresh step therefore
issues a fixed number of all-reduces (one per round: two for a low-cost SVD or an Eq. 2 step),
however many matrices it refreshes; the payload bytes are the same as one all-reduce per sum.

Signs are canonical (by correlation with the sketch, as in one process), so every rank and
every world size computes the same ``P`` as one process would, up to the order of float sums.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.correlation import DEFAULT_CORRELATION_MAX_NORM, _safe_reciprocal, descend
from ..functional.subspace import _rank_tolerance, orthonormalize

__all__ = [
    "AllReduce",
    "CommunicationLog",
    "ShardComm",
    "Task",
    "correlation_step_payload_bytes",
    "low_cost_svd_payload_bytes",
    "run_coalesced",
    "sharded_adafactor_direction_",
    "sharded_correlation_step",
    "sharded_low_cost_svd",
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


#: A step that may wait for sums: it yields :class:`AllReduce` requests and is sent their results.
Task = Generator[AllReduce, list[Tensor], T]


class ShardComm:
    """All-reduces over one process group; ``rows`` of the whole matrix."""

    def __init__(self, group: dist.ProcessGroup, *, rows: int) -> None:
        self.group = group
        self.rows = rows

    def all_reduce(self, *tensors: Tensor) -> Task[list[Tensor]]:
        """Sums of ``tensors`` over the group: ``sums = yield from comm.all_reduce(a, b)``.

        The request is issued by :func:`run_coalesced`, in one all-reduce with the requests of
        the other parameters of the step.
        """
        return (yield AllReduce(self.group, tensors))


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
    """All-reduce payload (bytes per rank) of :func:`sharded_low_cost_svd` on an (M, n) row-sharded
    matrix: the float64 (r, r) Gram matrix, then the (r, n) product ``Q^T G`` in the gradient's dtype."""
    return 8 * rank * rank + element_size * rank * n


def correlation_step_payload_bytes(n: int, rank: int, element_size: int) -> int:
    """All-reduce payload (bytes per rank) of :func:`sharded_correlation_step`: two (r, r) sums and
    two scalars, then one (n, r) sum, all in ``P``'s dtype."""
    return element_size * (2 * rank * rank + 2) + element_size * n * rank


def sharded_low_cost_svd(
    grad: Tensor, rank: int, sketch: Tensor, comm: ShardComm, global_shape: tuple[int, int]
) -> Task[tuple[Tensor, Tensor] | None]:
    """:func:`~coap_torch.functional.subspace.low_cost_svd_with_values` of the row-sharded ``grad``.

    ``grad`` holds this rank's rows (m_k, N); ``sketch`` (N, r) is the same on every rank.
    Returns the replicated ``P`` (N, r) and the estimated singular values (r,), after two rounds
    of all-reduces; or ``None`` after the first round when some rank's gradient is not finite
    (the summed Gram matrix then is not finite on every rank, so every rank returns ``None``).
    """
    Y = grad @ sketch.to(grad.dtype)  # (m_k, r)
    (gram,) = yield from comm.all_reduce(Y.double().mT @ Y.double())
    if not bool(torch.isfinite(gram).all()):
        return None
    # Q = Y K^{-1/2} on the numerically non-zero part of K = Y^T Y; the columns of a
    # rank-deficient sketch product become zero (their singular values 0, filled below).
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values[-1:].clamp_min(0) * (rank * torch.finfo(torch.float64).eps)
    inverse_sqrt = torch.where(keep, values.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(values))
    Q = Y @ (vectors * inverse_sqrt).to(grad.dtype)  # (m_k, r), orthonormal columns over all ranks
    (B,) = yield from comm.all_reduce(Q.mT @ grad)  # (r, N), identical on every rank
    return _right_subspace(B, rank, sketch.to(grad.dtype), global_shape)


def _right_subspace(B: Tensor, rank: int, sketch: Tensor, global_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    # The rest of the range finder, as in one process: right singular vectors of B = Q^T G
    # through a QR of B^T and an (r, r) SVD, signs closest to the sketch, undetermined columns
    # taken from the sketch.
    Q_B, R_B = torch.linalg.qr(B.mT)
    _, S, Vh = torch.linalg.svd(R_B.mT)
    P = Q_B @ Vh.mT
    signs = torch.sign((P * sketch).sum(dim=-2, keepdim=True))
    P = P * torch.where(signs == 0, torch.ones_like(signs), signs)
    tolerance = _rank_tolerance(torch.empty(global_shape, device="meta"), S)
    determined = S > tolerance
    return orthonormalize(torch.where(determined.unsqueeze(-2), P, sketch)), S


def sharded_correlation_step(
    P: Tensor,
    grad: Tensor,
    exp_avg_proj: Tensor,
    comm: ShardComm,
    global_shape: tuple[int, int],
    lr: float,
    *,
    normalize: bool = False,
    max_norm: float | None = DEFAULT_CORRELATION_MAX_NORM,
) -> Task[Tensor]:
    """:func:`~coap_torch.functional.correlation_aware_step` on row-sharded ``grad`` and ``exp_avg_proj``.

    The gradient of Eq. 2 (see :mod:`coap_torch.functional.correlation`) is
    ``c1 (G^T A (P^T P - 2 I) + P A^T A) - c2 (G^T (a M) - P U^T (c U))`` with the scalars
    ``c1 = 2 (1 - CosSim) / (M N)`` and ``c2 = MSE / M``: one all-reduce for the scalars and the
    (r, r) sums, one for the N x r sum (two rounds).
    """
    G, M = grad, exp_avg_proj
    rows, n = global_shape
    r = P.shape[-1]
    PtP = P.mT @ P
    A = G @ P
    row_max = M.abs().amax(dim=-1, keepdim=True) if M.numel() else M.new_zeros(M.shape[0], 1)
    M_scaled = M * _safe_reciprocal(row_max)
    m_hat_norm = ((M_scaled @ PtP) * M_scaled).sum(dim=-1, keepdim=True).clamp_min(0).sqrt()
    U = M_scaled * _safe_reciprocal(m_hat_norm)
    g_norm = torch.linalg.vector_norm(G, dim=-1)
    inv_g = _safe_reciprocal(g_norm)
    cos = (U * A).sum(dim=-1) * inv_g
    sums = torch.stack([cos.sum(), g_norm.square().sum()])
    AtA, UcU, sums = yield from comm.all_reduce(A.mT @ A, U.mT @ (cos.unsqueeze(-1) * U), sums)
    cos_sim, g_sq = sums[0] / rows, sums[1]
    sq_err = ((AtA * PtP).sum() - 2 * torch.diagonal(AtA).sum() + g_sq).clamp_min(0)
    mse = sq_err / (rows * n)
    c1 = (2.0 / (rows * n)) * (1 - cos_sim)
    c2 = mse / rows
    eye = torch.eye(r, dtype=P.dtype, device=P.device)
    (partial,) = yield from comm.all_reduce(G.mT @ (c1 * (A @ (PtP - 2 * eye)) - c2 * (inv_g.unsqueeze(-1) * U)))
    grad_P = partial + P @ (c1 * AtA + c2 * UcU)
    if normalize:
        grad_P = grad_P * _safe_reciprocal(g_sq / (rows * n))
    return descend(P, grad_P, lr, normalize=normalize, max_norm=max_norm)


def sharded_adafactor_direction_(
    grad: Tensor,
    *,
    step: int,
    decay_rate: float,
    eps1: float,
    clip_threshold: float,
    comm: ShardComm,
    numel: int,
    param_sq: Tensor,
    exp_avg_sq: Tensor | None = None,
    exp_avg_sq_row: Tensor | None = None,
    exp_avg_sq_col: Tensor | None = None,
) -> Task[tuple[Tensor, Tensor]]:
    """:func:`~coap_torch.functional.adafactor_direction_` on a row shard of a vector or matrix.

    ``numel`` is the whole parameter's number of entries (the clipping RMS is over all of it);
    ``param_sq`` this shard's sum of squared weights, returned summed over every shard (for
    ``scale_parameter``) next to the clipped, unit-lr update. Two rounds of all-reduces for a
    factored moment, one for a vector.
    """
    beta2t = 1.0 - math.pow(step, decay_rate)
    update = grad.square().add_(eps1)
    if exp_avg_sq_row is not None and exp_avg_sq_col is not None:
        exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        sums = (update.sum(dim=-2), exp_avg_sq_row.sum(), param_sq)
        del update  # full-size for a dense matrix: not kept while the step waits for the sums
        col_sum, row_sum, param_sq = yield from comm.all_reduce(*sums)
        exp_avg_sq_col.mul_(beta2t).add_(col_sum / comm.rows, alpha=1.0 - beta2t)
        row_factor = (exp_avg_sq_row / (row_sum / comm.rows)).rsqrt_().unsqueeze(-1)
        col_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()

        def direction() -> Tensor:
            return (row_factor * col_factor).mul_(grad)

        (update_sq,) = yield from comm.all_reduce(direction().square().sum())
    elif exp_avg_sq is not None:
        exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        del update

        def direction() -> Tensor:
            return exp_avg_sq.rsqrt().mul_(grad)

        update_sq, param_sq = yield from comm.all_reduce(direction().square().sum(), param_sq)
    else:
        raise ValueError("sharded_adafactor_direction_ needs exp_avg_sq or both exp_avg_sq_row and exp_avg_sq_col")
    # The direction is computed again after the sums rather than kept while waiting for them (for
    # a dense matrix it is full-size): the same operations on the same inputs, so the same values.
    rms = update_sq.sqrt() / math.sqrt(numel)
    return direction().div_((rms / clip_threshold).clamp_(min=1.0)), param_sq
