"""Section 3 of ``coap-bench step``: the cost of a refresh of ``P`` against a full SVD, and the closed-form
Eq. 2 step against autograd on the literal objective."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from coap_torch.functional import coap_objective, correlation_aware_step, low_cost_svd, orthonormalize

from ..timing import Case, Timer
from .settings import CLOSED_FORM_TARGET, CORRELATION_LR, REFRESH_TARGET, coap_layout, random_matrix


def autograd_correlation_step(P: Tensor, grad: Tensor, exp_avg_proj: Tensor, lr: float = CORRELATION_LR) -> Tensor:
    """The Eq. 2 step by autograd on the literal objective: a reference for the closed form."""
    with torch.enable_grad():
        P = P.detach().requires_grad_()
        coap_objective(P, grad, exp_avg_proj).backward()
    return (P - lr * P.grad).detach()


def bench_refresh(
    shape: tuple[int, int], args: argparse.Namespace, timer: Timer, device: torch.device, generator: torch.Generator
) -> dict[str, Any]:
    rank = args.refresh_rank
    # The orientation CoapAdamW gives this matrix (projection_side): (m, n) with P (n, r).
    transposed = coap_layout(shape, args, rank).transposed
    G = random_matrix(shape, generator, device)
    G_c = G.mT if transposed else G  # (m, n), the optimizer's orientation
    P = orthonormalize(random_matrix((G_c.shape[-1], rank), generator, device))
    M = (G_c @ P) * 0.1  # a plausible low-rank first moment (m, r)

    timings = timer.interleaved(
        {
            "full_svd": Case(
                lambda: torch.linalg.svd(G, full_matrices=False), repeats=args.full_svd_repeats, warmup=1, inner=1
            ),
            "correlation_aware_step": Case(lambda: correlation_aware_step(P, G_c, M, lr=CORRELATION_LR)),
            "low_cost_svd_warm": Case(lambda: low_cost_svd(G_c, rank, sketch=P)),
            "autograd_eq2_step": Case(lambda: autograd_correlation_step(P, G_c, M, CORRELATION_LR)),
        }
    )
    t_svd, t_cas = timings["full_svd"], timings["correlation_aware_step"]
    t_lcs, t_auto = timings["low_cost_svd_warm"], timings["autograd_eq2_step"]

    closed = correlation_aware_step(P, G_c, M, lr=CORRELATION_LR)
    reference = autograd_correlation_step(P, G_c, M, CORRELATION_LR)
    step_closed, step_reference = P - closed, P - reference
    rel_err = (torch.linalg.vector_norm(step_closed - step_reference) / torch.linalg.vector_norm(step_reference)).item()

    full = t_svd.median
    return {
        "shape": list(shape),
        "rank": rank,
        "transposed": transposed,
        "ms": {
            "full_svd": full,
            "correlation_aware_step": t_cas.median,
            "low_cost_svd_warm": t_lcs.median,
            "autograd_eq2_step": t_auto.median,
        },
        "ratios": {
            "correlation_aware_step_over_full_svd": t_cas.median / full,
            "low_cost_svd_over_full_svd": t_lcs.median / full,
            "correlation_aware_step_over_autograd": t_cas.median / t_auto.median,
        },
        "ratios_from_min": {
            "correlation_aware_step_over_full_svd": t_cas.min / t_svd.min,
            "low_cost_svd_over_full_svd": t_lcs.min / t_svd.min,
            "correlation_aware_step_over_autograd": t_cas.min / t_auto.min,
        },
        "closed_form_vs_autograd_step_rel_err": rel_err,
        "targets": {
            "correlation_aware_step_le_0.1x_full_svd": t_cas.median <= REFRESH_TARGET * full,
            "low_cost_svd_le_0.1x_full_svd": t_lcs.median <= REFRESH_TARGET * full,
            "closed_form_faster_than_autograd": t_cas.median < CLOSED_FORM_TARGET * t_auto.median,
        },
        "samples": {
            "full_svd": t_svd.to_json(),
            "correlation_aware_step": t_cas.to_json(),
            "low_cost_svd_warm": t_lcs.to_json(),
            "autograd_eq2_step": t_auto.to_json(),
        },
    }
