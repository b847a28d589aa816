"""Moment rules, as in-place updates of given tensors that return the update direction.

The same function serves dense parameters (full-size moments) and projected ones (moments in
the low-rank space): the caller decides what ``grad`` is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .reduction import LOCAL, Rows, Task, run_local

__all__ = [
    "AdamDirection",
    "adafactor_direction_",
    "adafactor_direction_task",
    "adafactor_lr",
    "adam_direction_",
    "adam_moments_",
    "adamw_update_foreach_",
    "rotate_first_moment",
    "rotate_second_moment",
]


class AdamDirection(NamedTuple):
    """Adam's direction ``numerator / denominator / bias_correction1``, kept unformed so that each
    caller can apply it with the operations it needs: a dense parameter with torch's
    ``addcdiv_`` (bitwise ``torch.optim.AdamW``), a projected one as a formed low-rank tensor."""

    numerator: Tensor
    denominator: Tensor
    bias_correction1: float

    def tensor(self) -> Tensor:
        """The direction as one tensor (a new one; the moments are not changed)."""
        return (self.numerator / self.denominator).div_(self.bias_correction1)


def adam_moments_(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    max_exp_avg_sq: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    r"""Update Adam's moments in place and return ``(exp_avg, denom, bias_correction1)``.

    The bias-corrected direction is

    .. math::
        d = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
          = \frac{\mathrm{exp\_avg}}{\mathrm{denom}} \Big/ \mathrm{bias\_correction1},

    and ``p.mul_(1 - lr * wd).addcdiv_(exp_avg, denom, value=-lr / bias_correction1)`` is
    :class:`torch.optim.AdamW`'s step, operation for operation (so the result is bitwise its own).
    Algorithm 2 of the paper prints the eps inside the square root; we keep torch's placement so
    that an unprojected parameter is updated exactly as by ``torch.optim.AdamW``. With
    ``max_exp_avg_sq`` (AMSGrad) the running maximum of ``v_t`` replaces ``v_t``.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # torch's `** 0.5`, not math.sqrt: the same last bit
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg, denom, bias_correction1


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

    :func:`adam_moments_` with the quotient formed: the parameter update is then
    ``p <- p * (1 - lr * wd) - lr * d`` (equal to ``torch.optim.AdamW``'s to float rounding; use
    :func:`adam_moments_` and ``addcdiv_`` for its exact operations).
    """
    parts = adam_moments_(
        exp_avg, exp_avg_sq, grad, step=step, beta1=beta1, beta2=beta2, eps=eps, max_exp_avg_sq=max_exp_avg_sq
    )
    return AdamDirection(*parts).tensor()


def adamw_update_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    max_exp_avg_sqs: list[Tensor] | None = None,
) -> None:
    """One AdamW step of many dense tensors at once, in place, as ``torch._foreach_*`` calls.

    Element for element the operations of :func:`adam_moments_` followed by
    ``p.mul_(1 - lr * weight_decay).addcdiv_(exp_avg, denom, value=-lr / bias_correction1)``,
    which are those of :class:`torch.optim.AdamW` (for-loop and foreach alike), so the results
    are bitwise torch's; the gain is a handful of calls for all tensors instead of a dozen per
    tensor, which is what many small tensors (biases, norms) cost. All tensors share ``step``.
    """
    if not params:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    second = exp_avg_sqs
    if max_exp_avg_sqs is not None:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second = max_exp_avg_sqs
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denoms = torch._foreach_sqrt(second)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    decay = 1 - lr * weight_decay
    if decay != 1.0:
        torch._foreach_mul_(params, decay)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, -(lr / bias_correction1))


def adafactor_lr(
    lr: float | None,
    *,
    step: int,
    param_rms: Tensor | float,
    relative_step: bool,
    scale_parameter: bool,
    warmup_init: bool,
    eps2: float,
) -> Tensor | float:
    """Adafactor's step size: ``rho_t`` (relative step) or ``lr``, times ``max(eps2, RMS(W))``.

    The conventions of :class:`transformers.optimization.Adafactor`: with ``relative_step``,
    ``rho_t = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))``.
    """
    rho = lr
    if relative_step:
        rho = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    assert rho is not None
    if scale_parameter:
        return torch.clamp(torch.as_tensor(param_rms), min=eps2) * rho
    return rho


def adafactor_direction_(
    grad: Tensor,
    *,
    step: int,
    decay_rate: float,
    eps1: float,
    clip_threshold: float,
    exp_avg_sq: Tensor | None = None,
    exp_avg_sq_row: Tensor | None = None,
    exp_avg_sq_col: Tensor | None = None,
    rms_numel: int | None = None,
) -> Tensor:
    r"""Update Adafactor's second moment in place and return the clipped, unit-lr update.

    With ``beta2_t = 1 - t^{decay_rate}`` and ``U = G^2 + eps1``: a factored moment (``row``
    holds means over the last axis, ``col`` over the second-to-last, as in transformers) gives
    ``V = (row / mean(row)) col``; an unfactored one is the plain EMA of ``U``. The update
    ``G / sqrt(V)`` is divided by ``max(1, RMS(update) / clip_threshold)``.

    ``rms_numel`` is the number of entries the RMS is taken over (default: ``grad.numel()``).
    For a projected gradient pass the parameter's numel: the restored update has the same
    Frobenius norm (orthonormal ``P``), so the clip applies to the update of the weight itself.
    """
    update, _ = run_local(
        adafactor_direction_task(
            grad,
            step=step,
            decay_rate=decay_rate,
            eps1=eps1,
            clip_threshold=clip_threshold,
            exp_avg_sq=exp_avg_sq,
            exp_avg_sq_row=exp_avg_sq_row,
            exp_avg_sq_col=exp_avg_sq_col,
            numel=grad.numel() if rms_numel is None else rms_numel,
        )
    )
    return update


def adafactor_direction_task(
    grad: Tensor,
    *,
    step: int,
    decay_rate: float,
    eps1: float,
    clip_threshold: float,
    numel: float,
    exp_avg_sq: Tensor | None = None,
    exp_avg_sq_row: Tensor | None = None,
    exp_avg_sq_col: Tensor | None = None,
    param_sq: Tensor | None = None,
    rows: Rows = LOCAL,
) -> Task[tuple[Tensor, Tensor | None]]:
    """:func:`adafactor_direction_` of a gradient whose rows ``rows`` sums over.

    ``numel`` is the number of entries the clipping RMS is taken over (the whole parameter's);
    ``param_sq``, when given, is this process's part of the sum of squared weights (for
    ``scale_parameter``) and comes back summed next to the update. The column accumulator, the
    mean of the row accumulator and the update's RMS are sums over all rows: two rounds of
    sums for a factored moment, one otherwise (see :meth:`~coap_torch.functional.reduction.Rows.reduce`
    for which sum is which). In one process they are torch's own means and
    norm, so that results (and resumed checkpoints) keep the rounding they always had; sharded
    rows give the same values to the order of float sums.
    """
    beta2t = 1.0 - math.pow(step, decay_rate)
    update = grad.square().add_(eps1)
    # The weights' sum of squares joins the first round of sums.
    pending = [] if param_sq is None else [param_sq]
    if exp_avg_sq_row is not None and exp_avg_sq_col is not None:
        exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        if rows.local:  # torch's means, rounded as they always were in one process
            col_mean, row_mean = update.mean(dim=-2), exp_avg_sq_row.mean(dim=-1, keepdim=True)
        else:  # means over every rank's rows: sums, then one division
            m = rows.count(grad)
            partial = (update.sum(dim=-2), exp_avg_sq_row.sum(dim=-1, keepdim=True), *pending)
            del update  # full-size for a dense matrix: not kept while the sums are taken
            (col_sum, row_sum), _, summed = yield from rows.reduce(sums=partial[:2], weight=partial[2:])
            param_sq, pending = (summed[0] if summed else None), []
            col_mean, row_mean = col_sum / m, row_sum / m
        exp_avg_sq_col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
        row_factor = (exp_avg_sq_row / row_mean).rsqrt_().unsqueeze(-1)
        col_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()

        def direction() -> Tensor:
            return (row_factor * col_factor).mul_(grad)
    elif exp_avg_sq is not None:
        exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        del update

        def direction() -> Tensor:
            return exp_avg_sq.rsqrt().mul_(grad)
    else:
        raise ValueError("adafactor_direction_ needs exp_avg_sq or both exp_avg_sq_row and exp_avg_sq_col")
    # Where the sums wait for other ranks (FSDP2), the direction of a dense matrix is full-size:
    # it is computed again after them rather than held (the same operations, the same values).
    result = direction()
    if rows.local:
        rms = torch.linalg.vector_norm(result) / math.sqrt(numel)
    else:
        square_sum = result.square().sum()
        del result
        _, (update_sq,), summed = yield from rows.reduce(totals=(square_sum,), weight=tuple(pending))
        if summed:
            param_sq = summed[0]
        result = direction()
        rms = update_sq.sqrt() / math.sqrt(numel)
    return result.div_((rms / clip_threshold).clamp_(min=1.0)), param_sq


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
