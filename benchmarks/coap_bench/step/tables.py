"""The tables ``coap-bench step`` prints."""

from __future__ import annotations

import argparse
from typing import Any

from ..report import format_ms, print_table, shape_str
from .formulas import formula_texts
from .settings import (
    ADAFACTOR_BETA1,
    ADAFACTOR_LR,
    AMORTISED_TARGET,
    BLOCK_SIZE,
    EIGHT_BIT_TARGET,
    MIN_8BIT_SIZE,
    REFRESH_TARGET,
    STEADY_TARGET,
    fmt_ratio,
    mark,
)


def print_state_bytes(rows: list[dict[str, Any]]) -> None:
    mib = 2.0**20
    table = []
    for r in rows:
        for name, o in r["optimizers"].items():
            table.append(
                [
                    shape_str(r["shape"]),
                    r["rank"],
                    name,
                    f"{o['measured_bytes']:,} ({o['measured_bytes'] / mib:.2f} MiB)",
                    f"{o['formula_bytes']:,}",
                    o["minus_formula_bytes"],
                    f"{o['over_adamw']:.4f}",
                    f"{o['over_32bit']:.4f}" if o["over_32bit"] is not None else "-",
                    f"{mark(o['equal_formula'])} (==formula)",
                ]
            )
        adamw_ok = r["adamw_measured_bytes"] == r["adamw_formula_bytes"]
        table.append(
            [
                shape_str(r["shape"]),
                "-",
                "torch AdamW",
                f"{r['adamw_measured_bytes']:,} ({r['adamw_measured_bytes'] / mib:.2f} MiB)",
                f"{r['adamw_formula_bytes']:,}",
                r["adamw_measured_bytes"] - r["adamw_formula_bytes"],
                "1.0000",
                "-",
                f"{mark(adamw_ok)} (==formula)",
            ]
        )
    print_table(
        "1. Optimizer-state bytes after one step ('step' counters excluded)",
        ["shape", "rank", "optimizer", "measured", "formula", "diff B", "/AdamW", "8-bit/32-bit", "target"],
        table,
        left=3,
    )
    texts, note = formula_texts(rows[0].get("state_element_size", 4) if rows else 4)
    print("  formulas (bytes): " + "; ".join(f"{name} {text}" for name, text in texts.items()) + "; torch AdamW 8*m*n")
    print(f"  {note}")
    side = rows[0].get("projection_side") if rows else None
    print(
        f"  P on the {side or 'smaller'} side{'' if side else ' (the library default)'}: "
        + "; ".join(
            f"{shape_str(r['shape'])} P {shape_str(r['proj_shape'])}, moments {shape_str(r['moment_shape'])}"
            for r in rows
        )
    )
    print(
        f"  CoapAdafactor*: beta1={ADAFACTOR_BETA1} (first moment kept); 8-bit: block_size={BLOCK_SIZE}, "
        f"min_8bit_size={MIN_8BIT_SIZE}"
    )


def print_step_times(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    T_u, lam = args.update_interval, args.reproject_factor
    cycle = T_u * lam
    print_table(
        "2a. Step time, ms (median)",
        [
            "shape",
            "COAP steady",
            "COAP Eq.2",
            "COAP SVD",
            "COAP amortised",
            "full cycle",
            "AdamW fe=F",
            "AdamW fe=T",
            "floor",
            "floor mm",
            "floor adam",
        ],
        [
            [
                shape_str(r["shape"]),
                format_ms(r["ms"]["coap_steady"]),
                format_ms(r["ms"]["coap_eq2_refresh"]) if r["ms"]["coap_eq2_refresh"] is not None else "-",
                format_ms(r["ms"]["coap_svd_refresh"]),
                format_ms(r["ms"]["coap_amortised"]),
                format_ms(r["ms"]["coap_full_cycle_mean"]) if r["ms"]["coap_full_cycle_mean"] is not None else "-",
                format_ms(r["ms"]["adamw_foreach_false"]),
                format_ms(r["ms"]["adamw_foreach_true"]),
                format_ms(r["ms"]["floor"]),
                format_ms(r["ms"]["floor_matmuls"]),
                format_ms(r["ms"]["floor_adam_elementwise"]),
            ]
            for r in rows
        ],
    )
    print_table(
        "2b. Step time ratios",
        [
            "shape",
            "steady/floor",
            "amort./floor",
            "steady/AdamW F",
            "steady/AdamW T",
            "amort./AdamW F",
            "amort./AdamW T",
            "Eq.2/steady",
            "SVD/steady",
        ],
        [
            [
                shape_str(r["shape"]),
                f"{fmt_ratio(r['ratios']['steady_over_floor'])} {mark(r['targets']['steady_le_1.25x_floor'])}",
                f"{fmt_ratio(r['ratios']['amortised_over_floor'])} {mark(r['targets']['amortised_le_1.5x_floor'])}",
                fmt_ratio(r["ratios"]["steady_over_adamw_foreach_false"]),
                fmt_ratio(r["ratios"]["steady_over_adamw_foreach_true"]),
                fmt_ratio(r["ratios"]["amortised_over_adamw_foreach_false"]),
                fmt_ratio(r["ratios"]["amortised_over_adamw_foreach_true"]),
                fmt_ratio(r["ratios"]["eq2_refresh_over_steady"]) if r["ratios"]["eq2_refresh_over_steady"] else "-",
                fmt_ratio(r["ratios"]["svd_refresh_over_steady"]),
            ]
            for r in rows
        ],
    )
    print(f"  targets: steady <= {STEADY_TARGET}x floor, amortised <= {AMORTISED_TARGET}x floor")
    for r in rows:
        q = r["ratios_from_min"]
        print(
            f"  from the fastest samples, {shape_str(r['shape'])}: steady/floor {fmt_ratio(q['steady_over_floor'])}, "
            f"amortised/floor {fmt_ratio(q['amortised_over_floor'])}, steady/AdamW F "
            f"{fmt_ratio(q['steady_over_adamw_foreach_false'])}, "
            f"steady/AdamW T {fmt_ratio(q['steady_over_adamw_foreach_true'])}"
        )
    print(
        f"  amortised = (({cycle} - {lam}) * steady + ({lam} - 1) * Eq.2 + 1 * SVD) / {cycle}"
        f"  (T_u={T_u}, lambda={lam}; each step kind timed separately by setting the step counter)"
    )
    print(
        "  floor = G_c @ P + Adam elementwise moment update on the (m, r) moments + U @ P^T (in the parameter's layout)"
    )
    print("  AdamW fe=F / fe=T: torch.optim.AdamW(foreach=False) / (foreach=True)")
    if any(r["ms"]["coap_full_cycle_mean"] is not None for r in rows):
        print(f"  full cycle: mean step time over {cycle} consecutive real steps (--full-cycle)")


def print_coap_step_times(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    T_u, lam = args.update_interval, args.reproject_factor
    table = []
    for r in rows:
        for name, o in r["optimizers"].items():
            ms, ratios = o["ms"], o["ratios"]
            adam = name.startswith("CoapAdamW")
            eight = r["eight_bit_over_32bit"].get(name)
            table.append(
                [
                    shape_str(r["shape"]),
                    name,
                    format_ms(ms["steady"]),
                    format_ms(ms["eq2_refresh"]) if ms["eq2_refresh"] is not None else "-",
                    format_ms(ms["svd_refresh"]),
                    format_ms(ms["amortised"]),
                    format_ms(ms["full_cycle_mean"]) if ms["full_cycle_mean"] is not None else "-",
                    fmt_ratio(ratios["steady_over_floor_matmuls"]),
                    fmt_ratio(ratios["amortised_over_floor_matmuls"]),
                    fmt_ratio(ratios["amortised_over_floor"]) if adam else "-",
                    f"{fmt_ratio(eight['steady'])}" if eight else "-",
                    f"{fmt_ratio(eight['amortised'])} {mark(eight['target'])}" if eight else "-",
                ]
            )
    print_table(
        "2c. Step time of the four COAP optimizers, ms (median), and ratios",
        [
            "shape",
            "optimizer",
            "steady",
            "Eq.2",
            "SVD",
            "amortised",
            "full cycle",
            "steady/floor mm",
            "amort./floor mm",
            "amort./floor",
            "8-bit/32-bit steady",
            "8-bit/32-bit amort.",
        ],
        table,
        left=2,
    )
    print(
        f"  target: amortised step of an 8-bit optimizer <= {EIGHT_BIT_TARGET}x that of its 32-bit twin "
        f"(CoapAdamW8bit/CoapAdamW, CoapAdafactor8bit/CoapAdafactor)"
    )
    for r in rows:
        parts = []
        for name, o in r["optimizers"].items():
            parts.append(f"{name} amort./floor mm {fmt_ratio(o['ratios_from_min']['amortised_over_floor_matmuls'])}")
        for name, e in r["eight_bit_over_32bit"].items():
            parts.append(f"{name}/{e['over']} amort. {fmt_ratio(e['amortised_from_min'])}")
        print(f"  from the fastest samples, {shape_str(r['shape'])}: " + ", ".join(parts))
    print(
        "  floor mm = G_c @ P + U @ P^T (the two (m, n, r) matmuls every optimizer here performs); "
        "floor = floor mm + Adam's elementwise update (AdamW variants only)"
    )
    print(
        f"  amortised over T_u*lambda = {T_u}*{lam} steps, as in 2a; CoapAdafactor*: lr={ADAFACTOR_LR}, "
        f"beta1={ADAFACTOR_BETA1}, relative_step=False, scale_parameter=False"
    )


def print_profile(profiles: list[dict[str, Any]], show_ops: bool) -> None:
    for prof in profiles:
        steady = prof["steady_ms"]
        rows = [[name, format_ms(ms), f"{ms / steady:.1%}"] for name, ms in prof["parts_ms"].items()]
        rows.append(
            [
                "steady: sum of its parts",
                format_ms(prof["steady_parts_sum_ms"]),
                f"{prof['steady_parts_sum_ms'] / steady:.1%}",
            ]
        )
        rows.append(
            [
                "steady: rest (python, step counter, ...)",
                format_ms(prof["steady_unaccounted_ms"]),
                f"{prof['steady_unaccounted_ms'] / steady:.1%}",
            ]
        )
        rows.append(["steady step (measured above)", format_ms(steady), "100.0%"])
        print_table(
            f"Profile, {shape_str(prof['shape'])}: pieces timed in isolation (median, round-robin)",
            ["piece", "ms", "of steady step"],
            rows,
        )
        if show_ops:
            for kind, table in prof["op_tables"].items():
                print(f"\ntorch.profiler, one {kind} step of CoapAdamW, {shape_str(prof['shape'])}:")
                print(table)


def print_refresh(row: dict[str, Any]) -> None:
    ms, ratios, targets = row["ms"], row["ratios"], row["targets"]
    print_table(
        f"3. Refresh cost at {shape_str(row['shape'])}, rank {row['rank']} (median)",
        ["operation", "ms", "ratio", "target"],
        [
            ["torch.linalg.svd(G, full_matrices=False)", format_ms(ms["full_svd"]), "1.000x (reference)", ""],
            [
                "correlation_aware_step (closed form)",
                format_ms(ms["correlation_aware_step"]),
                f"{fmt_ratio(ratios['correlation_aware_step_over_full_svd'])} of full SVD",
                f"{mark(targets['correlation_aware_step_le_0.1x_full_svd'])} (<= {REFRESH_TARGET}x)",
            ],
            [
                "low_cost_svd (warm-start sketch = P)",
                format_ms(ms["low_cost_svd_warm"]),
                f"{fmt_ratio(ratios['low_cost_svd_over_full_svd'])} of full SVD",
                f"{mark(targets['low_cost_svd_le_0.1x_full_svd'])} (<= {REFRESH_TARGET}x)",
            ],
            ["autograd Eq.2 step (coap_objective.backward)", format_ms(ms["autograd_eq2_step"]), "", ""],
            [
                "correlation_aware_step / autograd",
                "",
                fmt_ratio(ratios["correlation_aware_step_over_autograd"]),
                f"{mark(targets['closed_form_faster_than_autograd'])} (< 1x)",
            ],
        ],
    )
    q = row["ratios_from_min"]
    print(
        "  from the fastest samples: correlation_aware_step/full SVD "
        f"{fmt_ratio(q['correlation_aware_step_over_full_svd'])}, "
        f"low_cost_svd/full SVD {fmt_ratio(q['low_cost_svd_over_full_svd'])}, "
        f"closed form/autograd {fmt_ratio(q['correlation_aware_step_over_autograd'])}"
    )
    print(f"  closed-form vs autograd step, relative difference: {row['closed_form_vs_autograd_step_rel_err']:.2e}")
