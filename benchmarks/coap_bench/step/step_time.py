"""Sections 1 and 2 of ``coap-bench step``, per shape: the state bytes of the four optimizers and of
torch's AdamW, and the time of each kind of step against AdamW and the matmul floor."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch import optimizer_state_nbytes

from ..timing import Case, Timer, Timing
from .formulas import adamw_bytes, measure_state_bytes
from .profile import profile_steady_step
from .settings import (
    AMORTISED_TARGET,
    BETAS,
    COAP_OPTIMIZERS,
    EIGHT_BIT_PAIRS,
    EIGHT_BIT_TARGET,
    EPS,
    LR,
    OPT_KEYS,
    STATE_BYTES_TOLERANCE,
    STEADY_TARGET,
    WEIGHT_DECAY,
    eight_bit_target_key,
    fresh_param,
    optimizer_layout,
    random_matrix,
    state_element_size,
)


def amortised(steady: float, eq2: float, svd: float, update_interval: int, reproject_factor: int) -> float:
    """Mean step time over one cycle of ``T_u * lambda`` steps (step 1's initialisation excluded):
    ``T_u * lambda - lambda`` steady steps, ``lambda - 1`` Eq. 2 refreshes and one SVD refresh."""
    cycle = update_interval * reproject_factor
    n_eq2 = reproject_factor - 1
    n_steady = cycle - reproject_factor
    return (n_steady * steady + n_eq2 * eq2 + svd) / cycle


def optimizer_step_rows(
    timings: dict[str, Timing],
    cycles: dict[str, Timing],
    args: argparse.Namespace,
    t_floor: Timing,
    t_floor_mm: Timing,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per-optimizer step times, amortised step and ratios to the floors; and 8-bit / 32-bit."""
    T_u, lam = args.update_interval, args.reproject_factor
    rows: dict[str, dict[str, Any]] = {}
    for name in COAP_OPTIMIZERS:
        key = OPT_KEYS[name]
        steady, svd = timings[f"{key}_steady"], timings[f"{key}_svd_refresh"]
        eq2 = timings.get(f"{key}_eq2_refresh")
        amort = amortised(steady.median, eq2.median if eq2 is not None else 0.0, svd.median, T_u, lam)
        amort_min = amortised(steady.min, eq2.min if eq2 is not None else 0.0, svd.min, T_u, lam)
        cycle = cycles.get(name)
        rows[name] = {
            "ms": {
                "steady": steady.median,
                "eq2_refresh": eq2.median if eq2 is not None else None,
                "svd_refresh": svd.median,
                "amortised": amort,
                "amortised_from_min": amort_min,
                "full_cycle_mean": cycle.median / (T_u * lam) if cycle is not None else None,
            },
            "ratios": {
                "steady_over_floor_matmuls": steady.median / t_floor_mm.median,
                "amortised_over_floor_matmuls": amort / t_floor_mm.median,
                "steady_over_floor": steady.median / t_floor.median,
                "amortised_over_floor": amort / t_floor.median,
            },
            "ratios_from_min": {
                "steady_over_floor_matmuls": steady.min / t_floor_mm.min,
                "amortised_over_floor_matmuls": amort_min / t_floor_mm.min,
                "steady_over_floor": steady.min / t_floor.min,
                "amortised_over_floor": amort_min / t_floor.min,
            },
            "samples": {
                "steady": steady.to_json(),
                "eq2_refresh": eq2.to_json() if eq2 is not None else None,
                "svd_refresh": svd.to_json(),
                "full_cycle": cycle.to_json() if cycle is not None else None,
            },
        }
    eight_bit: dict[str, dict[str, Any]] = {}
    for name, twin in EIGHT_BIT_PAIRS.items():
        q, f = rows[name]["ms"], rows[twin]["ms"]
        amort_ratio = q["amortised"] / f["amortised"]
        eight_bit[name] = {
            "over": twin,
            "steady": q["steady"] / f["steady"],
            "amortised": amort_ratio,
            "amortised_from_min": q["amortised_from_min"] / f["amortised_from_min"],
            "target": amort_ratio <= EIGHT_BIT_TARGET,
        }
    return rows, eight_bit


# ------------------------------------------------------------------------------------------------
# sections 1 + 2: state bytes and step time, per shape
# ------------------------------------------------------------------------------------------------
def bench_shape(
    shape: tuple[int, int], args: argparse.Namespace, timer: Timer, device: torch.device, generator: torch.Generator
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    rank = args.rank
    T_u, lam = args.update_interval, args.reproject_factor
    weight = random_matrix(shape, generator, device) * 0.02
    grad = random_matrix(shape, generator, device)

    # -- the four COAP optimizers: one step initialises P and the moments ------------------------
    coaps: dict[str, tuple[nn.Parameter, torch.optim.Optimizer]] = {}
    coap_rows: dict[str, dict[str, Any]] = {}
    for name in COAP_OPTIMIZERS:
        param, opt, row = measure_state_bytes(name, shape, args, weight, grad)
        coaps[name] = (param, opt)
        coap_rows[name] = row
    coap_param, coap = coaps["CoapAdamW"]
    state = coap.state[coap_param]
    measured = coap_rows["CoapAdamW"]["measured_bytes"]
    formula = coap_rows["CoapAdamW"]["formula_bytes"]
    # Where CoapAdamW puts P on this matrix (projection_side): the floor below follows it.
    layout = optimizer_layout(coap_param, coap)
    transposed = layout.transposed
    proj_shape = tuple(state["proj"].shape)
    moment_shape = tuple(state["exp_avg"].shape)

    # -- torch.optim.AdamW, both implementations -------------------------------------------------
    adamw = {}
    for foreach in (False, True):
        p = fresh_param(weight, grad)
        opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=foreach)
        opt.step()
        adamw[foreach] = (p, opt)
    adamw_measured = optimizer_state_nbytes(adamw[False][1])
    adamw_formula = adamw_bytes(shape)
    for name, row in coap_rows.items():
        row["over_adamw"] = row["measured_bytes"] / adamw_measured
        twin = EIGHT_BIT_PAIRS.get(name)
        row["over_32bit"] = row["measured_bytes"] / coap_rows[twin]["measured_bytes"] if twin else None

    state_row = {
        "shape": list(shape),
        "rank": rank,
        "projection_side": getattr(args, "projection_side", None),
        "state_dtype": getattr(args, "state_dtype", "float32"),
        "state_element_size": state_element_size(args),
        "transposed": transposed,
        "proj_shape": list(proj_shape),
        "moment_shape": list(moment_shape),
        "coap_measured_bytes": measured,
        "coap_measured_bytes_incl_step": coap_rows["CoapAdamW"]["measured_bytes_incl_step"],
        "coap_formula_bytes": formula,
        "coap_minus_formula_bytes": measured - formula,
        "adamw_measured_bytes": adamw_measured,
        "adamw_formula_bytes": adamw_formula,
        "coap_over_adamw": measured / adamw_measured,
        "formula_over_adamw_formula": formula / adamw_formula,
        # every optimizer: measured / formula bytes, ratios to AdamW and to the 32-bit twin
        "optimizers": coap_rows,
        "target_state_bytes_equal_formula": all(
            abs(r["minus_formula_bytes"]) <= STATE_BYTES_TOLERANCE for r in coap_rows.values()
        )
        and adamw_measured == adamw_formula,
    }

    # -- step kinds, chosen through each optimizer's step counter (reset outside the timed region) --
    counters = {name: opt.state[param]["step"] for name, (param, opt) in coaps.items()}

    def at_step(k: int, name: str = "CoapAdamW") -> Callable[[], None]:
        c = counters[name]
        return lambda: c.fill_(float(k - 1))  # the next step() runs step k

    steady_step = 2 if T_u > 2 else None
    if steady_step is None:
        raise ValueError("--update-interval must be > 2 for a steady (refresh-free) step to exist")
    eq2_step = T_u if lam > 1 else None
    svd_step = T_u * lam
    # -- the floor: G P, Adam's elementwise update on (m, r), U P^T in the parameter's layout ----
    # (m, n) is the matrix the optimizer works on: the weight, or its transpose when P is on dim 0.
    P = state["proj"].to(torch.float32, copy=True)  # (n, r); float32 as the matmuls (bf16 state is widened)
    G_c = grad.mT if transposed else grad  # (m, n), the optimizer's orientation
    exp_avg = torch.zeros(moment_shape, device=device)
    exp_avg_sq = torch.zeros(moment_shape, device=device)
    beta1, beta2 = BETAS
    R = G_c @ P

    def floor_project() -> Tensor:
        return G_c @ P

    def floor_adam(R: Tensor = R) -> Tensor:
        # Bias corrections are scalars, foldable into eps and the matmul's alpha: left out.
        exp_avg.lerp_(R, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        return exp_avg / exp_avg_sq.sqrt().add_(EPS)

    U = floor_adam()

    def floor_restore(U: Tensor = U) -> Tensor:
        return P @ U.mT if transposed else U @ P.mT  # in the parameter's shape, contiguous

    def floor() -> Tensor:
        return floor_restore(floor_adam(floor_project()))

    # All step kinds of the four optimizers and the references of this shape are timed
    # round-robin (see Timer.interleaved), so their ratios share the machine's load.
    cases = {}
    for name, (_, opt) in coaps.items():
        key = OPT_KEYS[name]
        cases[f"{key}_steady"] = Case(opt.step, setup=at_step(steady_step, name))
        cases[f"{key}_svd_refresh"] = Case(opt.step, setup=at_step(svd_step, name), repeats=args.svd_step_repeats)
        if eq2_step is not None:
            cases[f"{key}_eq2_refresh"] = Case(opt.step, setup=at_step(eq2_step, name))
    cases.update(
        {
            "adamw_foreach_false": Case(adamw[False][1].step),
            "adamw_foreach_true": Case(adamw[True][1].step),
            "floor": Case(floor),
            "floor_matmuls": Case(lambda: floor_restore(floor_project())),
            "floor_adam_elementwise": Case(floor_adam),
        }
    )
    timings = timer.interleaved(cases)
    t_steady, t_svd, t_floor = timings["coap_steady"], timings["coap_svd_refresh"], timings["floor"]
    t_eq2 = timings.get("coap_eq2_refresh")
    t_adamw = {False: timings["adamw_foreach_false"], True: timings["adamw_foreach_true"]}
    t_floor_mm, t_floor_adam = timings["floor_matmuls"], timings["floor_adam_elementwise"]

    t_amortised = amortised(t_steady.median, t_eq2.median if t_eq2 is not None else 0.0, t_svd.median, T_u, lam)
    amortised_min = amortised(t_steady.min, t_eq2.min if t_eq2 is not None else 0.0, t_svd.min, T_u, lam)
    t_cycles: dict[str, Timing] = {}
    if args.full_cycle:
        # The real schedule: T_u * lambda consecutive steps (steps 1..cycle on initialised state).
        for name, (_, opt) in coaps.items():

            def cycle(opt: torch.optim.Optimizer = opt, c: Tensor = counters[name]) -> None:
                c.fill_(0.0)
                for _ in range(T_u * lam):
                    opt.step()

            t_cycles[name] = timer(cycle, repeats=max(1, args.repeats // 2), warmup=0, inner=1)
    t_cycle = t_cycles.get("CoapAdamW")

    per_optimizer, eight_bit = optimizer_step_rows(timings, t_cycles, args, t_floor, t_floor_mm)

    floor_ms = t_floor.median
    a_false, a_true = t_adamw[False].median, t_adamw[True].median
    step_row: dict[str, Any] = {
        "shape": list(shape),
        "rank": rank,
        "transposed": transposed,
        "ms": {
            "coap_steady": t_steady.median,
            "coap_eq2_refresh": t_eq2.median if t_eq2 is not None else None,
            "coap_svd_refresh": t_svd.median,
            "coap_amortised": t_amortised,
            "coap_amortised_from_min": amortised_min,
            "coap_full_cycle_mean": (t_cycle.median / (T_u * lam)) if t_cycle is not None else None,
            "adamw_foreach_false": a_false,
            "adamw_foreach_true": a_true,
            "floor": floor_ms,
            "floor_matmuls": t_floor_mm.median,
            "floor_adam_elementwise": t_floor_adam.median,
        },
        "ratios": {
            "steady_over_floor": t_steady.median / floor_ms,
            "amortised_over_floor": t_amortised / floor_ms,
            "steady_over_adamw_foreach_false": t_steady.median / a_false,
            "steady_over_adamw_foreach_true": t_steady.median / a_true,
            "amortised_over_adamw_foreach_false": t_amortised / a_false,
            "amortised_over_adamw_foreach_true": t_amortised / a_true,
            "eq2_refresh_over_steady": (t_eq2.median / t_steady.median) if t_eq2 is not None else None,
            "svd_refresh_over_steady": t_svd.median / t_steady.median,
        },
        # The same ratios from the fastest sample of each operation: interference from other
        # processes only ever adds time, so on a shared machine these are the cleaner estimate.
        "ratios_from_min": {
            "steady_over_floor": t_steady.min / t_floor.min,
            "amortised_over_floor": amortised_min / t_floor.min,
            "steady_over_adamw_foreach_false": t_steady.min / t_adamw[False].min,
            "steady_over_adamw_foreach_true": t_steady.min / t_adamw[True].min,
            "amortised_over_adamw_foreach_false": amortised_min / t_adamw[False].min,
            "amortised_over_adamw_foreach_true": amortised_min / t_adamw[True].min,
        },
        "targets": {
            "steady_le_1.25x_floor": t_steady.median <= STEADY_TARGET * floor_ms,
            "amortised_le_1.5x_floor": t_amortised <= AMORTISED_TARGET * floor_ms,
            **{eight_bit_target_key(name): row["target"] for name, row in eight_bit.items()},
        },
        # all four COAP optimizers: step kinds, amortised step, ratios to the floors
        "optimizers": per_optimizer,
        # 8-bit / 32-bit of the same optimizer (steady, amortised), with the target
        "eight_bit_over_32bit": eight_bit,
        "samples": {
            "coap_steady": t_steady.to_json(),
            "coap_eq2_refresh": t_eq2.to_json() if t_eq2 is not None else None,
            "coap_svd_refresh": t_svd.to_json(),
            "coap_full_cycle": t_cycle.to_json() if t_cycle is not None else None,
            "adamw_foreach_false": t_adamw[False].to_json(),
            "adamw_foreach_true": t_adamw[True].to_json(),
            "floor": t_floor.to_json(),
            "floor_matmuls": t_floor_mm.to_json(),
            "floor_adam_elementwise": t_floor_adam.to_json(),
        },
    }

    profile = None
    if args.profile:
        resets = {"steady": at_step(steady_step), "svd_refresh": at_step(svd_step)}
        if eq2_step is not None:
            resets["eq2_refresh"] = at_step(eq2_step)
        profile = profile_steady_step(coap, coap_param, state, resets, timer, transposed, t_steady)
        profile["shape"] = list(shape)
    return state_row, step_row, profile
