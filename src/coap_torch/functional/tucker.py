r"""Tucker-2 projection of convolution kernels (supplementary Sec. 1.5, Algorithm 2).

A kernel ``W`` of shape (O, I, K1, K2) (or any (O, I, *kernel)) is projected on its first two
modes only, by ``P_O`` (O, r_O) and ``P_I`` (I, r_I):

.. math::
    \mathcal{G}^{proj} = \mathcal{G} \times_1 P_O^\top \times_2 P_I^\top
    \qquad (r_O, r_I, K_1, K_2), \qquad
    \hat{\mathcal{G}} = \mathcal{G}^{proj} \times_1 P_O \times_2 P_I .

Each factor is refreshed like the matrix ``P``, on the matching unfolding. In the matrix
convention of :func:`~coap_torch.functional.low_cost_svd` (``P`` spans the *right* singular
subspace of an (m, n) matrix), ``P_O`` belongs to ``unfold(G, 0).mT``, shape (I*K, O), whose
rows are the mode-1 fibres; its Eq. 2 first moment is the moment projected on every mode but
mode 1, ``unfold(M ×_2 P_I, 0).mT`` of shape (I*K, r_O). Mode 2 is the same with the roles
swapped. :func:`mode_matrices` builds exactly these pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "conv_ranks",
    "mode_matrices",
    "mode_product",
    "tucker2_add_restored_",
    "tucker2_project",
    "tucker2_restore",
    "unfold",
]


def unfold(X: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: the fibres of that mode as columns, shape (X.shape[mode], -1)."""
    return X.movedim(mode, 0).reshape(X.shape[mode], -1)


def mode_product(X: Tensor, A: Tensor, mode: int) -> Tensor:
    r"""The n-mode product ``X ×_mode A`` for ``A`` of shape (J, X.shape[mode])."""
    return torch.tensordot(A, X, dims=([1], [mode])).movedim(0, mode)


def _leading_mode_product(X: Tensor, A: Tensor) -> Tensor:
    # X ×_1 A as one GEMM on the (X.shape[0], rest) view: no permute, no copy of X.
    return (A @ X.reshape(X.shape[0], -1)).reshape(A.shape[0], *X.shape[1:])


def _second_mode_product(X: Tensor, A: Tensor) -> Tensor:
    # X ×_2 A. tensordot lays X out as one GEMM; a broadcast (J, b) @ (a, b, K) matmul would be a
    # batch of a small GEMMs, 3-7x slower on a CPU for 3x3 kernels.
    return torch.tensordot(A, X, dims=([1], [1])).movedim(0, 1)


def tucker2_project(G: Tensor, P_O: Tensor, P_I: Tensor) -> Tensor:
    """``G ×_1 P_O^T ×_2 P_I^T``: (O, I, *k) -> (r_O, r_I, *k)."""
    return _second_mode_product(_leading_mode_product(G, P_O.mT), P_I.mT)


def tucker2_restore(C: Tensor, P_O: Tensor, P_I: Tensor) -> Tensor:
    """``C ×_1 P_O ×_2 P_I``: (r_O, r_I, *k) -> (O, I, *k), the adjoint of :func:`tucker2_project`."""
    return _leading_mode_product(_second_mode_product(C, P_I), P_O)


def tucker2_add_restored_(target: Tensor, C: Tensor, P_O: Tensor, P_I: Tensor, *, beta: float, alpha: float) -> Tensor:
    """``target <- beta * target + alpha * tucker2_restore(C, P_O, P_I)`` in place, for a contiguous ``target``.

    The mode-1 product is one GEMM with accumulation into ``target``'s (O, I*k) view, so the
    restored (O, I, *k) update is never materialised.
    """
    inner = _second_mode_product(C, P_I)  # (r_O, I, *k)
    view = target.view(target.shape[0], -1)
    view.addmm_(P_O, inner.reshape(inner.shape[0], -1), beta=beta, alpha=alpha)
    return target


def mode_matrices(
    G: Tensor, M: Tensor, P_O: Tensor, P_I: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The (gradient, first moment) matrix pairs on which ``P_O`` and ``P_I`` are refreshed.

    Args:
        G: the gradient (O, I, *k). M: the low-rank first moment (r_O, r_I, *k).

    Returns:
        ``((G_O, M_O), (G_I, M_I))`` with ``G_O`` (I*k, O), ``M_O`` (I*k, r_O), ``G_I`` (O*k, I),
        ``M_I`` (O*k, r_I); ``M_O @ P_O.mT`` is the mode-1 unfolding (transposed) of the full
        moment estimate ``M ×_1 P_O ×_2 P_I``, and likewise for mode 2.
    """
    G_O = unfold(G, 0).mT
    G_I = unfold(G, 1).mT
    M_O = unfold(_second_mode_product(M, P_I), 0).mT
    M_I = unfold(_leading_mode_product(M, P_O), 1).mT
    return (G_O, M_O), (G_I, M_I)


def conv_ranks(shape: tuple[int, ...] | torch.Size, rank_ratio: float) -> tuple[int, int]:
    r"""Tucker-2 ranks ``(r_O, r_I) = (floor(O / sqrt(a)), floor(I / sqrt(a)))``, each at least 1.

    Algorithm 2 prints ``r_O = O^{1/\sqrt{\alpha}}``, an extraction artefact: with
    ``O / sqrt(alpha)`` the core (r_O, r_I, K1, K2) has ``1/alpha`` of the kernel's entries, which
    is what "rank ratio" means for matrices too.
    """
    if rank_ratio < 1:
        raise ValueError(f"rank_ratio_cnn must be >= 1, got {rank_ratio}")
    scale = math.sqrt(rank_ratio)
    return max(1, int(shape[0] / scale)), max(1, int(shape[1] / scale))
