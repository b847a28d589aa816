"""The occasional low-cost SVD: a randomized range finder for the dominant right subspace.

Shapes follow the paper: ``G`` is (m, n) and the projection ``P`` is (n, r) with orthonormal
columns, so that ``G @ P`` is the (m, r) projected gradient. Every function here also accepts
leading batch dimensions (``(..., m, n)``), which is how stacked matrices such as MoE experts
are handled: each matrix of the batch gets its own ``P``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduction import LOCAL, Rows, Task, run_local

__all__ = [
    "DEFAULT_SKETCH_SEED",
    "gaussian_sketch",
    "low_cost_svd",
    "low_cost_svd_task",
    "orthonormalize",
    "rank_tolerance",
]

#: Seed of the Gaussian test matrix when neither a sketch nor a generator is given. Any fixed
#: value works; a fixed one makes ``low_cost_svd(G, r)`` a deterministic function of ``G``.
DEFAULT_SKETCH_SEED = 0


def gaussian_sketch(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A standard Gaussian test matrix drawn from ``generator`` (a private CPU one by default).

    The draw always happens on the CPU and is then moved, so a given seed gives the same sketch
    on every device, and the global RNG of every device is left alone.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SKETCH_SEED)
    sketch = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    return sketch.to(dtype=dtype, device=device)


def orthonormalize(A: Tensor) -> Tensor:
    """Orthonormal columns spanning ``A`` (..., n, r), by QR with the signs fixed.

    Choosing ``diag(R) >= 0`` makes the map continuous and the identity on matrices whose
    columns are already orthonormal, so a nearly orthonormal ``P`` moves only by its defect.
    """
    Q, R = torch.linalg.qr(A)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


def _rank_tolerance(G: Tensor, S: Tensor) -> Tensor:
    # The tolerance of torch.linalg.matrix_rank: max(m, n) * eps * largest singular value.
    return rank_tolerance(S, G.shape[-2], G.shape[-1])


def rank_tolerance(S: Tensor, rows: int, cols: int) -> Tensor:
    """The singular-value tolerance of :func:`torch.linalg.matrix_rank` for a (rows, cols) matrix
    whose singular values are ``S`` (..., k): ``max(rows, cols) * eps * S_max``, shape (..., 1)."""
    return S[..., :1] * (max(rows, cols) * torch.finfo(S.dtype).eps)


def low_cost_svd_with_values(
    grad: Tensor,
    rank: int,
    sketch: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`low_cost_svd`, also returning the ``rank`` estimated singular values (..., r).

    A singular value at or below the rank tolerance of :func:`torch.linalg.matrix_rank` marks a
    column of ``P`` that the gradient does not determine; see :func:`low_cost_svd`.
    """
    n = grad.shape[-1]
    if not 0 < rank <= n:
        raise ValueError(f"rank must be in [1, {n}] for a gradient of shape {tuple(grad.shape)}, got {rank}")
    if sketch is None:
        sketch = gaussian_sketch((*grad.shape[:-2], n, rank), generator=generator, dtype=grad.dtype, device=grad.device)
    elif sketch.shape[-2:] != (n, rank):
        raise ValueError(f"sketch must have shape (..., {n}, {rank}), got {tuple(sketch.shape)}")
    result = run_local(low_cost_svd_task(grad, rank, sketch))
    assert result is not None  # one process never returns None (see Rows.orthonormal_basis)
    return result


def low_cost_svd_task(
    grad: Tensor, rank: int, sketch: Tensor, rows: Rows = LOCAL
) -> Task[tuple[Tensor, Tensor] | None]:
    """The low-cost SVD (see :func:`low_cost_svd`) of a gradient whose rows ``rows`` sums over.

    ``grad`` holds this process's rows (..., m_k, n); ``sketch`` (..., n, r) is the same
    everywhere. Returns ``(P, S)``, or ``None`` when the range of ``G @ sketch`` has no finite
    orthonormal basis (a non-finite gradient under FSDP2, which every rank sees in its sums).
    """
    sketch = sketch.to(dtype=grad.dtype)
    # Range finder: Y = G Omega spans (approximately) the dominant left subspace; the SVD of the
    # small r x n matrix Q^T G then gives the dominant right singular vectors.
    Q = yield from rows.orthonormal_basis(grad @ sketch)
    if Q is None:
        return None
    (B,) = yield from rows.sum(Q.mT @ grad)
    return _right_subspace(B, rank, sketch, rows.count(grad), grad.shape[-1])


def _right_subspace(B: Tensor, rank: int, sketch: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """The top-``rank`` right singular vectors of ``B = Q^T G`` (..., k, n) and their values."""
    # SVD of B through B^T = Q_B R_B: B = R_B^T Q_B^T, so the right singular vectors of B are
    # Q_B V with R_B^T = U S V^T. The SVD then runs on a (k, k) matrix.
    Q_B, R_B = torch.linalg.qr(B.mT)
    _, S, Vh = torch.linalg.svd(R_B.mT)
    P = Q_B @ Vh.mT
    if P.shape[-1] < rank:
        # m < r: the reduced QR and SVD give only m columns; G (rank <= m) determines no more.
        # Mark the missing r - m columns undetermined (singular value 0) so they are filled below.
        P = torch.cat([P, sketch[..., P.shape[-1] :].expand(*P.shape[:-1], -1)], dim=-1)
        S = torch.cat([S, S.new_zeros((*S.shape[:-1], rank - S.shape[-1]))], dim=-1)

    # Singular vectors are defined up to sign; take the sign closest to the sketch, so that a
    # warm start moves P (and the moments expressed in it) as little as possible.
    signs = torch.sign((P * sketch).sum(dim=-2, keepdim=True))
    P = P * torch.where(signs == 0, torch.ones_like(signs), signs)

    # A gradient of numerical rank k < r determines only k directions; the SVD fills the rest
    # from rounding noise, so two runs that differ in the last bit (gradient accumulation,
    # all-reduce order) would pick different subspaces. Replace those columns by the sketch's
    # (the previous P on a warm start: keep what the gradient says nothing about) and
    # re-orthonormalize. Gram-Schmidt order keeps the determined columns as they are.
    determined = S > rank_tolerance(S, m, n)
    filled = torch.where(determined.unsqueeze(-2), P, sketch)
    return orthonormalize(filled), S


def low_cost_svd(
    grad: Tensor,
    rank: int,
    sketch: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The occasional low-cost SVD: ``P`` (..., n, r) spanning the dominant right subspace of ``grad``.

    A randomized range finder whose test matrix is ``sketch``:

    .. math::
        Y = G\,\Omega,\quad Q R = Y,\quad U S V^\top = Q^\top G,\quad P = V_{[:, :r]}

    (the SVD of the (r, n) matrix ``Q^T G`` is computed as a QR of its transpose and an SVD of
    the (r, r) triangular factor).

    With ``sketch = P_prev`` (the warm start of the paper) one call costs two (m, n, r) matmuls,
    QRs of (m, r) and (n, r) and an SVD of (r, r), instead of the full SVD of (m, n) that GaLore pays.
    When ``G`` has rank at least ``r`` and the sketch is not orthogonal to its top-r subspace,
    the result spans exactly the top-r right singular subspace of a rank-r ``G``.

    Args:
        grad: the gradient ``G``, shape (..., m, n); a floating-point tensor (float32 or float64
            recommended: QR and SVD are not implemented for half precision).
        rank: ``r``, with ``1 <= r <= n``.
        sketch: the test matrix ``Omega`` (..., n, r), typically the previous ``P``. When omitted,
            a Gaussian matrix drawn from ``generator``; when that is omitted too, from a private
            generator seeded with :data:`DEFAULT_SKETCH_SEED`. The global RNG is never used.
        generator: a CPU :class:`torch.Generator` for the Gaussian sketch.

    Returns:
        ``P`` with orthonormal columns, same dtype and device as ``grad``.

    Note:
        Rank-deficient gradients (a batch of b samples gives a gradient of rank at most b) do not
        determine the top-r subspace. Columns whose singular value is at or below the tolerance of
        :func:`torch.linalg.matrix_rank` are taken from the sketch and orthonormalized against
        the determined ones, so the result is a deterministic, continuous function of
        ``(grad, sketch)`` instead of depending on rounding noise.
    """
    return low_cost_svd_with_values(grad, rank, sketch, generator=generator)[0]
