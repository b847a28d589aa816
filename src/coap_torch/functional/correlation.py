r"""The inter-projection correlation-aware update of ``P`` (supplementary Sec. 1.1, Eq. 2-7).

The objective (Eq. 2), for ``P`` (n, r), a gradient ``G`` (m, n) and the previous low-rank first
moment ``M`` (m, r):

.. math::
    L(P) = \underbrace{\tfrac{1}{mn}\lVert G P P^\top - G\rVert_F^2}_{\mathrm{MSE}}
           \Bigl(1 - \underbrace{\tfrac{1}{m}\textstyle\sum_i \cos(\hat M_i, G_i)}_{\mathrm{CosSim}}\Bigr),
    \qquad \hat M = M P^\top .

Its gradient, derived here and checked against autograd in the tests (with ``A = G P``,
``E = A P^\top - G``, ``c_i`` the row cosines, ``a_i = 1 / (\lVert\hat M_i\rVert\lVert G_i\rVert)``,
``b_i = c_i / \lVert\hat M_i\rVert^2``; computed with the rows of ``M`` normalized,
``U_i = M_i / \lVert\hat M_i\rVert``, so that ``b_i M_i^\top M_i = c_i U_i^\top U_i``):

.. math::
    \nabla\mathrm{MSE} &= \tfrac{2}{mn}\,(G^\top E P + E^\top G P)
                        = \tfrac{2}{mn}\,\bigl(G^\top A\,(P^\top P) - 2\,G^\top A + P\,(A^\top A)\bigr) \\
    \nabla\mathrm{CosSim} &= \tfrac{1}{m}\,\bigl(G^\top (a \odot M) - P\,M^\top (b \odot M)\bigr) \\
    \nabla L &= \nabla\mathrm{MSE}\,(1 - \mathrm{CosSim}) \;-\; \mathrm{MSE}\;\nabla\mathrm{CosSim}

Where the paper's printed Eq. 3 and Eq. 7 *add* the CosSim term, the derivative of the
objective subtracts it (the objective contains ``1 - CosSim``); we follow the objective.
Eq. 4 (the MSE gradient) agrees with ours. A row with a zero norm (``G_i = 0`` or
``\hat M_i = 0``) has cosine 0 and contributes nothing to the CosSim gradient.

The whole gradient costs two (m, n, r) matmul passes (``G P`` and ``G^T [A, a M]``) and a few
(m, r, r) ones; ``G P P^T``, ``\hat M`` and ``E`` are never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduction import LOCAL, Rows, Task, run_local
from .subspace import orthonormalize

__all__ = [
    "DEFAULT_CORRELATION_LR",
    "DEFAULT_CORRELATION_MAX_NORM",
    "coap_objective",
    "coap_objective_grad",
    "correlation_aware_step",
    "correlation_step_task",
    "objective_grad_task",
]

#: eta in Eq. 3 of the supplementary material.
DEFAULT_CORRELATION_LR = 0.1

#: Largest entry of ``|P^T P - I|`` an Eq. 2 step may leave before ``P`` is re-orthonormalized
#: (with the clip on). Far above float32 rounding (~1e-7), so realistic steps, which move ``P``
#: by ~1e-11, stay exactly the paper's; large ones (sum-reduced losses: up to ``lr`` per step)
#: would otherwise let ``P`` drift by ~1e-2 between two SVDs, scaling the restored update.
ORTHONORMALITY_TOLERANCE = 1e-3

#: Bound on the Frobenius norm of the Eq. 2 gradient before the step, as in the paper's release
#: (not in its text): it makes the step safe at any gradient scale and leaves it bitwise the
#: paper's below the bound (see :func:`correlation_aware_step`).
DEFAULT_CORRELATION_MAX_NORM = 1.0


def _safe_reciprocal(x: Tensor) -> Tensor:
    """``1 / x`` where that is finite and ``x > 0``, else 0 (a zero row has no direction)."""
    positive = x > 0
    inverse = 1.0 / torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive & torch.isfinite(inverse), inverse, torch.zeros_like(x))


def coap_objective(P: Tensor, grad: Tensor, exp_avg_proj: Tensor) -> Tensor:
    """Eq. 2 written literally with differentiable torch ops (a reference for tests and benchmarks).

    Args:
        P: (..., n, r). grad: ``G`` (..., m, n). exp_avg_proj: ``M`` (..., m, r).

    Returns:
        The objective, one value per matrix of the batch (shape ``grad.shape[:-2]``).
    """
    m, n = grad.shape[-2], grad.shape[-1]
    G_hat = grad @ P @ P.mT
    M_hat = exp_avg_proj @ P.mT
    mse = (G_hat - grad).square().sum(dim=(-2, -1)) / (m * n)
    norms = torch.linalg.vector_norm(M_hat, dim=-1) * torch.linalg.vector_norm(grad, dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = torch.where(norms > 0, (M_hat * grad).sum(dim=-1) / safe, torch.zeros_like(norms))
    return mse * (1 - cos.mean(dim=-1))


def coap_objective_grad(P: Tensor, grad: Tensor, exp_avg_proj: Tensor) -> tuple[Tensor, Tensor]:
    """The closed-form gradient of :func:`coap_objective` with respect to ``P``, and its value.

    No autograd: see the module docstring for the derivation. Shapes as in
    :func:`coap_objective`; returns ``(dL/dP (..., n, r), L (...))``.
    """
    grad_P, value, _ = run_local(objective_grad_task(P, grad, exp_avg_proj))
    return grad_P, value


def objective_grad_task(
    P: Tensor, grad: Tensor, exp_avg_proj: Tensor, rows: Rows = LOCAL
) -> Task[tuple[Tensor, Tensor, Tensor]]:
    """:func:`coap_objective_grad` of a gradient whose rows ``rows`` sums over; also ``||G||^2``.

    ``grad`` and ``exp_avg_proj`` hold this process's rows; ``P`` is the same everywhere. With
    ``A = G P``, the gradient is ``G^T (c1 A (P^T P - 2 I) - c2 a U) + P (c1 A^T A + c2 U^T (c U))``
    with ``c1 = 2 (1 - CosSim) / (m n)`` and ``c2 = MSE / m``: two rounds of sums (the
    scalars and two (r, r) matrices, then one (n, r) matrix), whatever the number of rows.
    """
    G, M = grad, exp_avg_proj
    m, n = rows.count(G), G.shape[-1]
    PtP = P.mT @ P
    A = G @ P  # (m, r)

    # Row cosines between M_hat = M P^T and G, from r-sized quantities only. The rows of M are
    # first scaled to unit ||M_hat_i||: the moment of a long-dead unit decays towards 1e-40,
    # where ||M_hat_i||^2 underflows and 1 / ||M_hat_i||^2 overflows float32.
    row_max = M.abs().amax(dim=-1, keepdim=True) if M.numel() else M.new_zeros((*M.shape[:-1], 1))
    M_scaled = M * _safe_reciprocal(row_max)
    m_hat_norm = ((M_scaled @ PtP) * M_scaled).sum(dim=-1, keepdim=True).clamp_min(0).sqrt()
    U = M_scaled * _safe_reciprocal(m_hat_norm)  # rows M_i / ||M_hat_i||, or 0
    g_norm = torch.linalg.vector_norm(G, dim=-1)  # (m,)
    inv_g = _safe_reciprocal(g_norm)
    cos = (U * A).sum(dim=-1) * inv_g  # <M_hat_i, G_i> / (||M_hat_i|| ||G_i||)
    AtA, UcU, cos_sum, g_sq = yield from rows.sum(
        A.mT @ A, U.mT @ (cos.unsqueeze(-1) * U), cos.sum(dim=-1), g_norm.square().sum(dim=-1)
    )
    cos_sim = cos_sum / m

    # ||E||^2 = <A^T A, P^T P> - 2 tr(A^T A) + ||G||^2, clamped against cancellation.
    sq_err = (AtA * PtP).sum(dim=(-2, -1)) - 2 * torch.diagonal(AtA, dim1=-2, dim2=-1).sum(-1)
    mse = (sq_err + g_sq).clamp_min(0) / (m * n)
    c1 = ((2.0 / (m * n)) * (1 - cos_sim))[..., None, None]
    c2 = (mse / m)[..., None, None]
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    (partial,) = yield from rows.sum(G.mT @ (c1 * (A @ (PtP - 2 * eye)) - c2 * (inv_g.unsqueeze(-1) * U)))
    grad_P = partial + P @ (c1 * AtA + c2 * UcU)
    return grad_P, mse * (1 - cos_sim), g_sq


def correlation_aware_step(
    P: Tensor,
    grad: Tensor,
    exp_avg_proj: Tensor,
    lr: float = DEFAULT_CORRELATION_LR,
    *,
    normalize: bool = False,
    max_norm: float | None = DEFAULT_CORRELATION_MAX_NORM,
) -> Tensor:
    r"""One gradient-descent step on the COAP objective (Eq. 2): ``P - lr * clip(dL/dP)``.

    Args:
        P: the current projection (..., n, r).
        grad: the gradient ``G`` (..., m, n) of the current step.
        exp_avg_proj: the low-rank first moment ``M^proj`` (..., m, r) of the previous step.
        lr: ``eta`` of Eq. 3 (0.1 in the paper).
        normalize: divide the objective by ``mean(G**2)`` (its MSE becomes the relative
            reconstruction error ``||G P P^T - G||^2 / ||G||^2``) and re-orthonormalize the
            result. Not in the paper: with the mean-reduced MSE the gradient scales like
            ``||G||^2 / (m n)``, so on real gradients of size ~1e-3 a step at ``lr=0.1`` barely
            moves ``P``. The normalized step is invariant to the scale of ``G`` and, followed by
            the QR retraction, stays on matrices with orthonormal columns.
        max_norm: the gradient ``dL/dP`` is rescaled to Frobenius norm at most ``max_norm`` (per
            matrix) before the step, and a matrix whose gradient was clipped is re-orthonormalized
            after it. ``None`` takes the printed step as it is. See the note.

    Returns:
        The updated ``P`` (..., n, r), not re-orthonormalized unless clipped or ``normalize``.

    Note:
        **Clipping** (default ``max_norm=1.0``) is not in the paper's text; its release clips the
        objective's gradient to norm 1.0 in the same place. The objective scales like ``|G|^2``,
        so the unclipped step is not scale-free: on a sum-reduced loss (gradients of RMS ~30 and
        more) one step at ``lr=0.1`` moves ``P`` far from orthonormal and training diverges. A
        gradient below the bound (every realistic mean-reduced loss: the printed step moves ``P``
        by ~1e-11 there) is multiplied by exactly 1, so the step is bitwise the paper's. A clipped
        step moves ``P`` by exactly ``lr * max_norm`` and is followed by the QR retraction of
        :func:`~coap_torch.functional.orthonormalize` (the identity on orthonormal columns), so
        ``P`` stays orthonormal whatever the gradient's scale.

        Eq. 3 and Eq. 7 print ``+`` before the CosSim term; the gradient of the objective has
        ``-`` (see :mod:`coap_torch.functional.correlation`). The objective wins.
    """
    check_step_options(lr, max_norm)
    return run_local(correlation_step_task(P, grad, exp_avg_proj, lr, normalize=normalize, max_norm=max_norm))


def correlation_step_task(
    P: Tensor,
    grad: Tensor,
    exp_avg_proj: Tensor,
    lr: float,
    *,
    normalize: bool = False,
    max_norm: float | None = DEFAULT_CORRELATION_MAX_NORM,
    rows: Rows = LOCAL,
) -> Task[Tensor]:
    """:func:`correlation_aware_step` of a gradient whose rows ``rows`` sums over."""
    grad_P, _, g_sq = yield from objective_grad_task(P, grad, exp_avg_proj, rows)
    if normalize:
        mean_sq = g_sq / (rows.count(grad) * grad.shape[-1])
        grad_P = grad_P * _safe_reciprocal(mean_sq)[..., None, None]
    return descend(P, grad_P, lr, normalize=normalize, max_norm=max_norm)


def check_step_options(lr: float, max_norm: float | None) -> None:
    if lr < 0:
        raise ValueError(f"correlation lr must be >= 0, got {lr}")
    if max_norm is not None and max_norm <= 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")


def descend(P: Tensor, grad_P: Tensor, lr: float, *, normalize: bool, max_norm: float | None) -> Tensor:
    """``P - lr * grad_P`` with ``grad_P`` clipped to ``max_norm`` per matrix; a matrix whose
    gradient was clipped, or whose columns the step moved more than
    :data:`ORTHONORMALITY_TOLERANCE` away from orthonormal, is re-orthonormalized (all of them
    with ``normalize``).

    The step of :func:`correlation_aware_step` once the gradient of Eq. 2 is known; the FSDP2 path
    computes that gradient from sums over ranks and finishes here too. A non-finite ``grad_P``
    gives a non-finite result (callers check it); it never raises.
    """
    step = lr * grad_P
    retract = None
    if max_norm is not None:
        norm = torch.linalg.vector_norm(grad_P, dim=(-2, -1), keepdim=True)
        step = step * (max_norm / norm).clamp_max(1.0)  # exactly 1 below the bound
        retract = norm > max_norm
    P_new = P - step
    if normalize:
        return orthonormalize(P_new)
    if max_norm is None:
        return P_new  # the printed step, as it is
    eye = torch.eye(P.shape[-1], dtype=P_new.dtype, device=P_new.device)
    defect = (P_new.mT @ P_new - eye).abs().amax(dim=(-2, -1), keepdim=True)
    retract = retract | (defect > ORTHONORMALITY_TOLERANCE)
    if bool(retract.any()):  # one host sync, at refresh steps only
        P_new = torch.where(retract, orthonormalize(P_new), P_new)
    return P_new
