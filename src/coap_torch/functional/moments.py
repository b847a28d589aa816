"""Moment rules, as in-place updates of given tensors that return the update direction.

The same function serves dense parameters (full-size moments) and projected ones (moments in
the low-rank space): the caller decides what ``grad`` is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adam_direction_", "rotate_first_moment", "rotate_second_moment"]


def adam_direction_(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    max_exp_avg_sq: Tensor | None = None,
) -> Tensor:
    r"""Update Adam's moments in place and return the bias-corrected direction ``d``.

    The parameter update is then ``p <- p * (1 - lr * wd) - lr * d``, exactly the order and eps
    placement of :class:`torch.optim.AdamW`:

    .. math::
        d = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    (Algorithm 2 of the paper prints the eps inside the square root; we keep torch's placement so
    that an unprojected parameter is updated exactly as by ``torch.optim.AdamW``.) With
    ``max_exp_avg_sq`` (AMSGrad) the running maximum of ``v_t`` replaces ``v_t``.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / denom).div_(bias_correction1)


def rotate_first_moment(M: Tensor, R: Tensor) -> Tensor:
    r"""Express a low-rank first moment in a new basis: ``M R`` with ``R = P_old^T P_new``.

    ``M P_old^T`` is the moment in the full space; its coordinates in the new basis are
    ``M P_old^T P_new`` (exact when ``P_new`` has orthonormal columns).
    """
    return M @ R


def rotate_second_moment(V: Tensor, R: Tensor) -> Tensor:
    r"""Express a low-rank second moment in a new basis: ``V (R ∘ R)``.

    Adam's ``V`` holds per-coordinate variances. If the old coordinates are uncorrelated with
    variances ``v_j``, the new coordinate ``k = sum_j R_jk x_j`` has variance
    ``sum_j R_jk^2 v_j``. This keeps ``V`` non-negative and is the identity when ``P`` is unchanged.
    """
    return V @ R.square()
