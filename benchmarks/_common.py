"""Helpers shared by the benchmark scripts in this folder (``bench_optimizer.py``,
``bench_quantization.py``): timing samples and round-robin order, shape parsing, table and number
formatting, the load average, the environment recorded in the JSON, and writing the JSON.

Not a script of its own; the scripts import it as ``_common`` after putting this folder on
``sys.path``, so that it is found both when a script is run directly and when it is loaded from
its file (as the tests do).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock samples of one operation, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    def to_json(self) -> dict[str, Any]:
        return {"median_ms": self.median, "min_ms": self.min, "samples_ms": self.samples_ms}


def round_robin(items: Sequence[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """``(index, order)`` for each of ``rounds`` rounds: every round visits all ``items`` once, in
    an order that rotates by one from round to round, so that background load on a shared machine
    hits all of them alike and their ratios stay meaningful."""
    items = list(items)
    for index in range(rounds):
        shift = index % len(items)
        yield index, items[shift:] + items[:shift]


def available_threads() -> int:
    """The number of CPUs available to this process (the default of ``--threads``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# shapes and formatting
# ------------------------------------------------------------------------------------------------
def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def parse_shape(text: str, example: str = "2048x5632") -> tuple[int, int]:
    """``"MxN"`` as ``(M, N)``, for argparse; ``example`` is the shape shown in the error message."""
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a shape like {example}, got {text!r}") from exc
    if m <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"shape sides must be positive, got {text!r}")
    return m, n


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> None:
    """Print a table; the first ``left`` columns are left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print(line)
    for index, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print(line)
    print(line)


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------
# environment, load average, JSON
# ------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """The first keys of a result's ``meta``: torch and Python versions, platform, processor."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def load_averages_line(before: float | None, after: float | None) -> str:
    """The line that closes a run: the 1-minute load average before and after it."""
    return f"load average (1 min): {fmt_load(before)} before, {fmt_load(after)} after ({os.cpu_count()} CPUs)"


def json_default(value: object) -> object:
    """``json.dumps`` fallback: non-finite floats as ``null``, paths as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: Path, results: dict[str, Any], elapsed: float) -> None:
    """Write ``results`` to ``path`` (parents created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    print(f"wrote {path} ({elapsed:.1f} s)")
