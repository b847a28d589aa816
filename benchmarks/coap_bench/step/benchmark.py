"""Running ``coap-bench step``: the options resolved, every section timed, the tables printed, the JSON written."""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from ..environment import load_average, load_averages_line, platform_summary, torch_threads, usable_cpus
from ..report import shape_str, write_json
from ..timing import Timer
from .formulas import formula_texts
from .refresh import bench_refresh
from .settings import (
    ADAFACTOR_BETA1,
    ADAFACTOR_LR,
    AMORTISED_TARGET,
    BETAS,
    BLOCK_SIZE,
    CLOSED_FORM_TARGET,
    COAP_OPTIMIZERS,
    CORRELATION_LR,
    EIGHT_BIT_PAIRS,
    EIGHT_BIT_TARGET,
    EPS,
    FULL_RANK,
    FULL_REFRESH_SHAPE,
    FULL_SHAPES,
    LR,
    MIN_8BIT_SIZE,
    QUICK_RANK,
    QUICK_REFRESH_SHAPE,
    QUICK_SHAPES,
    REFRESH_TARGET,
    STATE_BYTES_TOLERANCE,
    STEADY_TARGET,
    WEIGHT_DECAY,
    eight_bit_target_key,
    mark,
    state_element_size,
)
from .step_time import bench_shape
from .tables import print_coap_step_times, print_profile, print_refresh, print_state_bytes, print_step_times

__all__ = ["resolve", "run_step"]


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.rank = args.rank or QUICK_RANK
        args.refresh_shape = args.refresh_shape or QUICK_REFRESH_SHAPE
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        # One thread: a smoke test should not depend on (or suffer from) other load on the machine;
        # BLAS threads oversubscribed by a concurrent process can make it 10x slower.
        args.threads = args.threads or 1
    args.projection_side = getattr(args, "projection_side", None)
    args.state_dtype = getattr(args, "state_dtype", None) or "float32"
    args.shapes = args.shapes or FULL_SHAPES
    args.rank = args.rank or FULL_RANK
    args.refresh_shape = args.refresh_shape or FULL_REFRESH_SHAPE
    args.refresh_rank = args.refresh_rank or args.rank
    args.repeats = args.repeats or (20 if cuda else 5)
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.inner = args.inner or (10 if cuda else 1)
    args.svd_step_repeats = args.svd_step_repeats or args.repeats
    args.full_svd_repeats = args.full_svd_repeats or args.repeats
    if args.threads is None:
        args.threads = usable_cpus()
    for name in (
        "repeats",
        "inner",
        "svd_step_repeats",
        "full_svd_repeats",
        "threads",
        "rank",
        "refresh_rank",
        "update_interval",
        "reproject_factor",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    for shape in (*args.shapes, args.refresh_shape):
        if min(shape) <= max(args.rank, args.refresh_rank if shape == args.refresh_shape else args.rank):
            raise ValueError(f"rank must be below min(m, n) for shape {shape_str(shape)} to be projected")
    return args


def run_step(args: argparse.Namespace) -> int:
    """Resolve the options, time every section on ``args.threads`` torch threads (restored afterwards), print the
    tables and write the JSON; the exit status."""
    args = resolve(args)
    with torch_threads(args.threads):
        return _run(args, torch.device(args.device))


def _run(args: argparse.Namespace, device: torch.device) -> int:
    started = time.perf_counter()
    load_before = load_average()
    timer = Timer(device, repeats=args.repeats, warmup=args.warmup, inner=args.inner)
    generator = torch.Generator().manual_seed(args.seed)
    texts, note = formula_texts(state_element_size(args))
    meta = {
        **platform_summary(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "inner": args.inner,
        "svd_step_repeats": args.svd_step_repeats,
        "full_svd_repeats": args.full_svd_repeats,
        "shapes": [list(s) for s in args.shapes],
        "rank": args.rank,
        "projection_side": args.projection_side,
        "state_dtype": args.state_dtype,
        "update_interval": args.update_interval,
        "reproject_factor": args.reproject_factor,
        "lr": LR,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "correlation_lr": CORRELATION_LR,
        "statistic": "median",
        "amortisation": "((T_u*lambda - lambda) * steady + (lambda - 1) * eq2 + 1 * svd) / (T_u*lambda)",
        "floor": "G_c @ P + Adam elementwise moment update on the (m, r) moments + U @ P^T in the parameter's layout",
        "floor_matmuls": "G_c @ P + U @ P^T in the parameter's layout",
        "optimizers": list(COAP_OPTIMIZERS),
        "adafactor": {"lr": ADAFACTOR_LR, "beta1": ADAFACTOR_BETA1, "relative_step": False, "scale_parameter": False},
        "eight_bit": {"block_size": BLOCK_SIZE, "min_8bit_size": MIN_8BIT_SIZE},
        "formulas": {**texts, "torch AdamW": "8*m*n", "note": note},
        "targets": {
            "state_bytes_tolerance_bytes": STATE_BYTES_TOLERANCE,
            "steady_over_floor_max": STEADY_TARGET,
            "amortised_over_floor_max": AMORTISED_TARGET,
            "refresh_over_full_svd_max": REFRESH_TARGET,
            "closed_form_over_autograd_max": CLOSED_FORM_TARGET,
            "eight_bit_amortised_over_32bit_max": EIGHT_BIT_TARGET,
        },
    }
    if load_before is not None and load_before > 0.25 * (os.cpu_count() or 1):
        print(
            f"note: load average {load_before:.2f} on {os.cpu_count()} CPUs before the run; other processes "
            "compete for the CPU (operations are timed round-robin so ratios stay comparable, absolute ms inflate)"
        )
    print(
        f"coap-bench step: torch {meta['torch']} on {meta['device']}"
        f"{' (' + meta['device_name'] + ')' if meta['device_name'] else ''}, {meta['threads']} threads, "
        f"median of {args.repeats} (warm-up {args.warmup}, {args.inner} call(s) per sample), rank {args.rank}, "
        f"T_u={args.update_interval}, lambda={args.reproject_factor}"
        + (", COAP state in bf16 (--state-dtype bf16)" if args.state_dtype == "bf16" else "")
    )

    state_rows, step_rows, profiles = [], [], []
    for shape in args.shapes:
        print(f"  timing {shape_str(shape)} ...", flush=True)
        state_row, step_row, profile = bench_shape(shape, args, timer, device, generator)
        state_rows.append(state_row)
        step_rows.append(step_row)
        if profile is not None:
            profiles.append(profile)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    refresh = None
    if not args.skip_refresh:
        print(f"  timing refresh at {shape_str(args.refresh_shape)} ...", flush=True)
        refresh = bench_refresh(args.refresh_shape, args, timer, device, generator)

    print_state_bytes(state_rows)
    print_step_times(step_rows, args)
    print_coap_step_times(step_rows, args)
    if refresh is not None:
        print_refresh(refresh)
    if profiles:
        print_profile(profiles, show_ops=True)

    summary = {
        "state_bytes_equal_formula": all(r["target_state_bytes_equal_formula"] for r in state_rows),
        "steady_le_1.25x_floor": all(r["targets"]["steady_le_1.25x_floor"] for r in step_rows),
        "amortised_le_1.5x_floor": all(r["targets"]["amortised_le_1.5x_floor"] for r in step_rows),
        **{
            eight_bit_target_key(name): all(r["eight_bit_over_32bit"][name]["target"] for r in step_rows)
            for name in EIGHT_BIT_PAIRS
        },
    }
    if refresh is not None:
        summary.update(refresh["targets"])
    elapsed = time.perf_counter() - started
    meta["elapsed_s"] = elapsed
    meta["load_average_1min_before"] = load_before
    meta["load_average_1min_after"] = load_average()
    results = {
        "meta": meta,
        "state_bytes": state_rows,
        "step_time": step_rows,
        "refresh": refresh,
        "profile": profiles or None,
        "summary": summary,
    }
    print("\nSummary: " + ", ".join(f"{k} {mark(v)}" for k, v in summary.items()))
    print(load_averages_line(load_before, meta["load_average_1min_after"]))
    write_json(results, args.json)
    print(f"wrote {args.json} ({elapsed:.1f} s)")
    return 0
