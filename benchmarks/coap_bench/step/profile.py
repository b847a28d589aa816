"""Where a CoapAdamW step spends its time (``coap-bench step --profile``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from coap_torch import CoapAdamW
from coap_torch.functional import adam_direction_, correlation_aware_step, low_cost_svd, orthonormalize

from ..timing import Case, Timer, Timing
from .settings import BETAS, CORRELATION_LR, EPS, LR, WEIGHT_DECAY


def profile_steady_step(
    coap: CoapAdamW,
    param: nn.Parameter,
    state: dict[str, Any],
    resets: dict[str, Callable[[], None]],
    timer: Timer,
    transposed: bool,
    t_steady: Timing,
) -> dict[str, Any]:
    """Where a CoapAdamW step spends its time.

    The pieces of a steady step and of the two refreshes are re-run one by one on the same
    tensors with the public functional API (so the breakdown does not depend on private code),
    and torch.profiler's op table of one real step of each kind is kept as the ground truth.
    ``transposed`` is the optimizer's layout of ``param`` (``P`` on dim 0): the pieces then work
    on ``G^T`` as the optimizer does, so (m, n) below is the matrix it works on, ``P`` (n, r).
    """
    grad = param.grad
    # float32 copies (bf16 state, --state-dtype bf16, is widened to float32 for the update as well)
    P = state["proj"].to(torch.float32, copy=True)
    exp_avg, exp_avg_sq = (state[key].to(torch.float32, copy=True) for key in ("exp_avg", "exp_avg_sq"))
    G_c = grad.mT if transposed else grad
    weight = param.detach().clone()
    decay, lr = 1 - LR * WEIGHT_DECAY, LR
    rank = P.shape[-1]

    R = G_c @ P
    U = adam_direction_(exp_avg, exp_avg_sq, R, step=2, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def fused_restore_apply() -> None:
        # W <- decay * W - lr * restore(U) as one GEMM with accumulation, in W's own layout.
        if transposed:
            weight.addmm_(P, U.mT, beta=decay, alpha=-lr)
        else:
            weight.addmm_(U, P.mT, beta=decay, alpha=-lr)

    def unfused_restore_apply() -> None:
        full = U @ P.mT
        weight.mul_(decay)
        weight.add_(full.mT if transposed else full, alpha=-lr)

    P_new = correlation_aware_step(P, G_c, exp_avg, lr=CORRELATION_LR)
    Rot = P.mT @ P_new
    Q = torch.linalg.qr(G_c @ P)[0]
    B = Q.mT @ G_c
    Vh = torch.linalg.svd(B, full_matrices=False)[2]

    cases = {
        # steady step
        "steady: project G_c @ P": Case(lambda: G_c @ P),
        "steady: adam_direction_ on (m, r)": Case(
            lambda: adam_direction_(exp_avg, exp_avg_sq, R, step=2, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
        ),
        "steady: restore + decay + update, one addmm_": Case(fused_restore_apply),
        "alt: restore U @ P^T, then mul_ + add_": Case(unfused_restore_apply),
        # Eq. 2 refresh = steady + these
        "eq2: correlation_aware_step": Case(lambda: correlation_aware_step(P, G_c, exp_avg, lr=CORRELATION_LR)),
        "eq2: rotations P^T P', M R, V (R*R)": Case(lambda: (P.mT @ P_new, exp_avg @ Rot, exp_avg_sq @ Rot.square())),
        # SVD refresh = steady + low_cost_svd + rotations; low_cost_svd's pieces:
        "svd: low_cost_svd (warm)": Case(lambda: low_cost_svd(G_c, rank, sketch=P)),
        "svd:   G_c @ P": Case(lambda: G_c @ P),
        "svd:   qr (m, r)": Case(lambda: torch.linalg.qr(R)),
        "svd:   Q^T G_c": Case(lambda: Q.mT @ G_c),
        "svd:   svd (r, n)": Case(lambda: torch.linalg.svd(B, full_matrices=False)),
        "svd:   orthonormalize (n, r)": Case(lambda: orthonormalize(Vh.mT)),
    }
    parts = timer.interleaved(cases)
    steady_parts = [k for k in parts if k.startswith("steady:")]
    steady_sum = sum(parts[k].median for k in steady_parts)

    op_tables: dict[str, str] = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if param.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total" if param.device.type == "cuda" else "self_cpu_time_total"
        for kind, reset in resets.items():
            reset()
            coap.step()
            timer.sync()
            reset()
            with profile(activities=activities) as prof:
                coap.step()
                timer.sync()
            op_tables[kind] = prof.key_averages().table(sort_by=sort_by, row_limit=12)
    except Exception as exc:  # noqa: BLE001 - the profiler is optional
        op_tables["error"] = f"(torch.profiler unavailable: {exc})"

    return {
        "steady_ms": t_steady.median,
        "parts_ms": {k: v.median for k, v in parts.items()},
        "steady_parts_sum_ms": steady_sum,
        "steady_unaccounted_ms": t_steady.median - steady_sum,
        "op_tables": op_tables,
    }
