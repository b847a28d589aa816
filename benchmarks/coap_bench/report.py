"""Presenting a benchmark run: text and Markdown tables, numbers and sizes, the JSON file, the loss-curve plot."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._quiet import import_note_lines

__all__ = [
    "format_bytes",
    "format_ms",
    "format_table",
    "markdown_table",
    "nonfinite_losses",
    "print_table",
    "scale_text",
    "shape_str",
    "text_table",
    "write_json",
    "write_plots",
]

_NOTES = (
    "state: optimizer-state bytes after training (step counters excluded); iter / step ms: median over "
    "all steps of forward+backward+step / of optimizer.step() alone; final loss: cross-entropy on the "
    "whole training split after the last step; P Eq.2 change: median |P_new - P_old|_F / |P_old|_F over "
    "the Eq. 2 refresh steps (multiples of update_interval that are not multiples of "
    "update_interval * reproject_factor)."
)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def format_ms(value: float) -> str:
    """Milliseconds with three decimals below 10, one above."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def scale_text(scale: float | str) -> str:
    """An update scale as the run shows it: ``auto`` or the number."""
    return scale if isinstance(scale, str) else f"{scale:g}"


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


_LOSS_NAMES = {"final_loss": "final loss", "heldout_loss": "held-out loss"}


def nonfinite_losses(result: dict[str, Any]) -> str:
    """The final losses of a finished result that are not finite, e.g. ``final loss nan, held-out loss inf``
    (empty when both are finite, or the run failed)."""
    if result.get("failed"):
        return ""
    values = {name: result.get(key) for key, name in _LOSS_NAMES.items()}
    return ", ".join(
        f"{name} {value}" for name, value in values.items() if isinstance(value, float) and not math.isfinite(value)
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, first column left-aligned, the others right-aligned, padded to line up."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return [line(header), rule, *(line(row) for row in rows)]


def text_table(header: Sequence[object], rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """A plain-text table: the header, a rule of dashes, the rows; the first ``left`` columns left-aligned,
    the others right-aligned, columns two spaces apart."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def print_table(title: str, header: Sequence[object], rows: Sequence[Sequence[object]], left: int = 1) -> None:
    """Print a :func:`text_table` after a blank line and ``title``, between rules."""
    header_line, rule, *lines = text_table(header, rows, left)
    print(f"\n{title}")
    print(rule)
    print(header_line)
    print(rule)
    for line in lines:
        print(line)
    print(rule)


def _columns(result: dict[str, Any]) -> list[str]:
    return [
        result["name"],
        f"{result['lr']:g}",
        format_bytes(result["state_bytes"]),
        _number(result.get("state_ratio_to_adamw"), ".3f"),
        _number(result["iteration_ms"], ".2f"),
        _number(result["step_ms"], ".2f"),
        _number(result["final_loss"], ".4f"),
        _number(result["heldout_loss"], ".4f"),
        _number(100 * result["heldout_accuracy"], ".2f") + "%",
        _number(result["p_step_rel_change"], ".3e"),
    ]


_HEADER = [
    "optimizer",
    "lr",
    "state",
    "vs AdamW",
    "iter ms",
    "step ms",
    "final loss",
    "held-out loss",
    "held-out acc",
    "P Eq.2 change",
]


def format_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a text table, one row per optimizer, preceded by a line describing the setup."""
    config = run["config"]
    title = (
        f"digits: {config['train_samples']} train / {config['heldout_samples']} held-out images "
        f"({config['image_size']}x{config['image_size']}), {config['parameters']:,} parameters; "
        f"{config['steps']} steps, batch {config['batch_size']}, seed {config['seed']}, "
        f"{config['device']} ({config['torch_threads']} threads); COAP rank ratio {config['rank_ratio']:g}, "
        f"update interval {config['update_interval']}, reproject factor {config['reproject_factor']}"
        + (", correlation-normalize" if config["correlation_normalize"] else "")
    )
    text = [title, "", *text_table(_HEADER, [_columns(r) for r in run["results"]])]
    remarks = []
    for result in run["results"]:
        if nonfinite_losses(result):
            remarks.append(f"diverged: {result['name']}: ended with a non-finite loss ({nonfinite_losses(result)})")
        if result.get("first_nonfinite_step") is not None:
            remarks.append(
                f"warning: {result['name']}: the training loss became non-finite at step "
                f"{result['first_nonfinite_step']}"
            )
    remarks += import_note_lines(run)  # what peers printed while imported, said once
    if remarks:
        text += ["", *remarks]
    if notes:
        text += ["", *textwrap.wrap(_NOTES, width=100)]
    return "\n".join(text)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(run: dict[str, Any], path: str | Path) -> Path:
    """Write ``run`` to ``path`` (parents created, paths as strings); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=2, default=_json_default) + "\n")
    return path


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_loss_curves(
    plt,
    run: dict[str, Any],
    path: Path,
    *,
    title: str,
    label,
    log_scale: bool = False,
    ylabel: str = "training loss (batch cross-entropy)",
) -> Path:
    """Training loss per step of every optimizer in ``run``, raw and as a 10-step mean."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in run["results"]:
        curve = result["loss_curve"]
        steps = range(1, len(curve) + 1)
        (handle,) = ax.plot(steps, _smooth(curve, 10), label=f"{label(result)} (10-step mean)")
        ax.plot(steps, curve, color=handle.get_color(), alpha=0.25, linewidth=0.8)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(run: dict[str, Any], directory: str | Path) -> Path | None:
    """Write ``digits_loss.png`` (training loss per step, raw and smoothed) to ``directory``.

    Returns ``None`` without writing anything when matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None:
        return None
    return plot_loss_curves(
        plt,
        run,
        Path(directory) / "digits_loss.png",
        title=f"digits, seed {run['config']['seed']}",
        label=lambda result: result["name"],
        log_scale=True,
    )
