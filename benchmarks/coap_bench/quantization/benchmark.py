"""Running ``coap-bench quantization``: each backend called once, then timed round-robin with the others, its
round-trip error and its dependencies measured; the tables printed and the JSON written."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
from torch import Tensor

from ..environment import load_average, load_averages_line, platform_summary, torch_threads, usable_cpus
from ..report import shape_str, write_json
from ..timing import Timing, round_robin
from .backends import (
    BLOCK_SIZE,
    KINDS,
    Backend,
    backend_bitsandbytes,
    backend_ours,
    backend_ours_sqrt,
    backend_torchao_compiled,
    backend_torchao_eager,
    short_error,
)
from .dependencies import dependency_report
from .roundtrip import roundtrip_errors
from .tables import print_results

__all__ = ["resolve", "run_quantization"]

FULL_SHAPE = (5632, 512)
QUICK_SHAPE = (512, 128)


def make_data(shape: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "signed": torch.randn(shape, generator=generator),  # first moments: either sign
        "unsigned": torch.randn(shape, generator=generator).square_(),  # second moments: >= 0
    }


def first_call(backend: Backend, data: dict[str, Tensor]) -> dict[str, Any]:
    """Run each kind once (compiling where needed) and return the states; a failure marks the backend."""
    states = {}
    for kind in backend.kinds:
        started = time.perf_counter()
        try:
            state = backend.quantize(data[kind], kind)
            out = backend.dequantize(state, kind)
            if tuple(out.shape) != tuple(data[kind].shape):
                raise RuntimeError(f"dequantized shape {tuple(out.shape)} != {tuple(data[kind].shape)}")
        except Exception as exc:  # noqa: BLE001 - a backend that fails here is reported, not fatal
            backend.error = f"failed on {data[kind].device.type} ({kind} data): {short_error(exc)}"
            return {}
        backend.extra.setdefault("first_call_s", {})[kind] = time.perf_counter() - started
        states[kind] = state
    return states


def time_backends(
    backends: list[Backend], data: dict[str, Tensor], states: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[tuple[str, str], dict[str, Timing]]:
    """Round-robin timing: every round takes one quantize and one dequantize sample of every
    (backend, kind), in an order that rotates from round to round."""
    cases = [(b, kind) for kind in KINDS for b in backends if kind in b.kinds]
    timings = {
        (b.name, kind): {"quantize": Timing(), "dequantize": Timing(), "roundtrip": Timing()} for b, kind in cases
    }
    for b, kind in cases:
        for _ in range(args.warmup):
            b.dequantize(b.quantize(data[kind], kind), kind)
    for _, order in round_robin(cases, args.repeats):
        for b, kind in order:
            x, state = data[kind], states[b.name][kind]
            start = time.perf_counter()
            b.quantize(x, kind)
            mid = time.perf_counter()
            b.dequantize(state, kind)
            end = time.perf_counter()
            t = timings[(b.name, kind)]
            t["quantize"].samples_ms.append((mid - start) * 1e3)
            t["dequantize"].samples_ms.append((end - mid) * 1e3)
            t["roundtrip"].samples_ms.append((end - start) * 1e3)
    return timings


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.shape = args.shape or QUICK_SHAPE
        args.repeats = args.repeats or 3
        args.warmup = 1 if args.warmup is None else args.warmup
        args.no_compile = True
    args.shape = args.shape or FULL_SHAPE
    args.repeats = args.repeats or 15
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.threads is None:
        args.threads = usable_cpus()
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        raise ValueError("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def run_quantization(args: argparse.Namespace) -> int:
    """Resolve the options, compare the backends on ``args.threads`` torch threads (restored afterwards), print
    the tables and write the JSON; the exit status."""
    args = resolve(args)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_before = load_average()
    shape = args.shape
    numel = shape[0] * shape[1]
    print(
        f"coap-bench quantization: torch {torch.__version__} on cpu, {torch.get_num_threads()} threads, "
        f"{shape_str(shape)} float32 ({numel:,} values), blocks of {BLOCK_SIZE}, "
        f"median of {args.repeats} (warm-up {args.warmup}), backends timed round-robin"
    )
    if load_before is not None:
        print(f"load average (1 min) before: {load_before:.2f} on {os.cpu_count()} CPUs")

    factories = [backend_ours, backend_ours_sqrt, backend_bitsandbytes, backend_torchao_eager]
    if not args.no_compile:
        factories.append(backend_torchao_compiled)
    backends = []
    for factory in factories:
        try:
            backends.append(factory())
        except Exception as exc:  # noqa: BLE001 - a factory must never stop the comparison
            backends.append(
                Backend(name=factory.__name__.removeprefix("backend_"), description="", error=short_error(exc))
            )

    generator = torch.Generator().manual_seed(args.seed)
    data = make_data(shape, generator)
    states: dict[str, dict[str, Any]] = {}
    for b in backends:
        if b.available:
            print(f"  first call: {b.name} ...", flush=True)
            states[b.name] = first_call(b, data)
    usable = [b for b in backends if b.available]
    for b in backends:
        if not b.available:
            print(f"  skipped: {b.name}: {b.error}")
    if not any(b.name == "ours" for b in usable):
        print("coap-bench: error: our codec failed: nothing to compare against", file=sys.stderr)
        return 1

    print("  timing ...", flush=True)
    timings = time_backends(usable, data, states, args)
    errors = {
        (b.name, kind): roundtrip_errors(
            data[kind], b.dequantize(states[b.name][kind], kind), b.code_map(kind) if b.code_map else None
        )
        for b in usable
        for kind in b.kinds
    }

    results_backends: dict[str, Any] = {}
    for b in backends:
        entry: dict[str, Any] = {
            "available": b.available,
            "error": b.error,
            "description": b.description,
            "version": b.version,
            "notes": b.notes,
            **b.extra,
        }
        if b.dists:
            entry["dependency"] = dependency_report(b.dists)
        if b.available:
            entry["timing"], entry["errors"] = {}, {}
            for kind in b.kinds:
                t, ref = timings[(b.name, kind)], timings[("ours", kind)]
                entry["timing"][kind] = {
                    "quantize_ms": t["quantize"].median,
                    "dequantize_ms": t["dequantize"].median,
                    "roundtrip_ms": t["roundtrip"].median,
                    "roundtrip_over_ours": t["roundtrip"].median / ref["roundtrip"].median,
                    "quantize_over_ours": t["quantize"].median / ref["quantize"].median,
                    "dequantize_over_ours": t["dequantize"].median / ref["dequantize"].median,
                    "roundtrip_over_ours_from_min": t["roundtrip"].min / ref["roundtrip"].min,
                    "samples": {k: v.to_json() for k, v in t.items()},
                }
                entry["errors"][kind] = errors[(b.name, kind)]
        results_backends[b.name] = entry

    print_results(results_backends, args)
    elapsed = time.perf_counter() - started
    load_after = load_average()
    meta = {
        **platform_summary(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "shape": list(shape),
        "numel": numel,
        "dtype": "float32",
        "block_size": BLOCK_SIZE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "quick": args.quick,
        "statistic": "median; backends timed round-robin (rotating order), ratios against ours in the same run",
        "data": {"signed": "torch.randn(shape)", "unsigned": "torch.randn(shape) ** 2"},
        "size_unit": "MiB of disk usage (du) of the site-packages entries of each distribution",
        "load_average_1min_before": load_before,
        "load_average_1min_after": load_after,
        "elapsed_s": elapsed,
    }
    print("\n" + load_averages_line(load_before, load_after))
    write_json({"meta": meta, "backends": results_backends}, args.json)
    print(f"wrote {args.json} ({elapsed:.1f} s)")
    return 0
