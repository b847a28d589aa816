"""The tables ``coap-bench quantization`` prints."""

from __future__ import annotations

import argparse
from typing import Any

from ..report import format_ms, print_table, shape_str
from .backends import KINDS

__all__ = ["KIND_DATA", "print_results"]

KIND_DATA = {"signed": "normal", "unsigned": "squared normal"}


def print_results(backends: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for kind in KINDS:
        for name, b in backends.items():
            if not b["available"] or kind not in b["timing"]:
                continue
            t = b["timing"][kind]
            rows.append(
                [
                    name,
                    f"{kind} ({KIND_DATA[kind]})",
                    format_ms(t["quantize_ms"]),
                    format_ms(t["dequantize_ms"]),
                    format_ms(t["roundtrip_ms"]),
                    f"{t['roundtrip_over_ours']:.3f}x",
                    f"{t['roundtrip_over_ours_from_min']:.3f}x",
                ]
            )
    print_table(
        f"1. Time of quantize + dequantize, {shape_str(args.shape)} float32, ms (median of {args.repeats})",
        ["backend", "data", "quantize", "dequantize", "q + dq", "q+dq / ours", "(from fastest)"],
        rows,
        left=2,
    )

    rows = []
    for kind in KINDS:
        for name, b in backends.items():
            if not b["available"] or kind not in b["errors"]:
                continue
            e = b["errors"][kind]
            rows.append(
                [
                    name,
                    f"{kind} ({KIND_DATA[kind]})",
                    f"{e['max_abs_err_over_absmax']:.3e}",
                    f"{e['max_block_err_over_block_absmax']:.3e}",
                    f"{e['mean_rel_err']:.3e}",
                    f"{e['rel_rms_err']:.3e}",
                    f"{e['zeroed_fraction']:.2e}",
                    f"{e['not_nearest_code_fraction']:.2e}" if e["not_nearest_code_fraction"] is not None else "-",
                ]
            )
    print_table(
        "2. Round-trip error deq(q(x)) vs x",
        [
            "backend",
            "data",
            "max|err|/absmax",
            "max block err/block absmax",
            "mean rel err",
            "rel RMS err",
            "nonzero -> 0",
            "not nearest code",
        ],
        rows,
        left=2,
    )
    print(
        "  max|err|/absmax: over the whole tensor; block: the largest error in a block of 256 over that "
        "block's absmax; mean rel err: mean |err|/|x| over x != 0; rel RMS err: ||err|| / ||x||;"
    )
    print(
        "  nonzero -> 0: fraction of x != 0 decoded as 0; not nearest code: fraction of values whose error exceeds "
        "that of the nearest value of the backend's own code map (beyond 1e-6 of the block's absmax)"
    )

    rows = []
    for name, b in backends.items():
        dep = b.get("dependency")
        if dep is None:
            size, pkgs, reqs = "0 (none)", "coap-torch", "-"
        else:
            pkgs = ", ".join(f"{p['name']} {p.get('version', '(not installed)')}" for p in dep["packages"])
            size = f"{dep['size_mib']:.1f}" if any(p.get("installed") for p in dep["packages"]) else "-"
            req = dep["requirements_besides_torch"]
            reqs = (
                ", ".join(
                    f"{k} ({v['size_mib']:.1f} MiB)" if v.get("installed") else f"{k} (not installed)"
                    for k, v in req.items()
                )
                or "none"
            )
        rows.append([name, "yes" if b["available"] else "no", pkgs, size, reqs])
    print_table(
        "3. Dependency: installed size (du of the site-packages entries), MiB",
        ["backend", "usable", "package", "MiB", "requires besides torch"],
        rows,
        left=3,
    )
    for name, b in backends.items():
        for note in b["notes"]:
            print(f"  {name}: {note}")
        if b.get("first_call_s"):
            first = ", ".join(f"{k} {v:.2f} s" for k, v in b["first_call_s"].items())
            compiled = (
                ", compilation included (less on a re-run: torch.compile caches on disk)" if "compiled" in name else ""
            )
            print(f"  {name}: first call (quantize + dequantize{compiled}): {first}")
        if not b["available"]:
            print(f"  {name}: skipped: {b['error']}")
