"""Presenting a benchmark run: text and Markdown tables, numbers and sizes, the JSON file, the loss-curve plot."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._quiet import import_note_lines

__all__ = [
    "common_lr_text",
    "failed_columns",
    "finished_results",
    "format_bytes",
    "format_ms",
    "format_table",
    "job_table",
    "jsonable",
    "lr_sweep_text",
    "markdown_table",
    "measurement_columns",
    "measurement_header",
    "nonfinite_losses",
    "peak_memory_kind",
    "percent",
    "plot_grids_side_by_side",
    "plot_heldout_vs_state",
    "plot_job_curves",
    "print_table",
    "projection_line",
    "result_remarks",
    "run_remarks",
    "sample_grids",
    "scale_text",
    "schedule_text",
    "seed_label",
    "shape_str",
    "sweep_edge_listing",
    "sweep_edge_note",
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


def jsonable(value: Any) -> Any:
    """``value`` with its tuples made lists, in nested dicts too: as it reads back from JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


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


# ------------------------------------------------------------------------------------------ a training job's table


def seed_label(config: dict[str, Any]) -> str:
    """``seed S``, or ``seeds S-T`` for a run of several seeds (its curves and timings are seed S's)."""
    seed, count = config["seed"], config.get("seeds", 1)
    return f"seed {seed}" if count == 1 else f"seeds {seed}-{seed + count - 1}"


def percent(value: float | None) -> str:
    """``value`` as a signed percentage (``-`` for ``None``)."""
    return "-" if value is None else f"{100 * value:+.2f}%"


def measurement_columns(result: dict[str, Any], throughput: str) -> list[str]:
    """The table cells every benchmark shows for a finished run, from the optimizer's name to its held-out
    loss relative to AdamW: lr, state, peak memory, iteration and step times, refresh, ``throughput``
    (the result's key of items per second), final and held-out loss."""
    refresh = result.get("refresh")
    return [
        result["name"],
        f"{result['lr']:g}",
        format_bytes(result["state_bytes"]),
        _number(result.get("state_ratio_to_adamw"), ".3f"),
        format_bytes(result["peak_memory_bytes"]),
        _number(result["iteration_ms"], ".1f"),
        _number(result.get("iteration_ratio_to_adamw"), ".3f"),
        _number(result["step_ms"], ".1f"),
        _number(refresh["mean_ms"] if refresh else None, ".1f"),
        _number(result[throughput], ".0f"),
        _number(result["final_loss"], ".4f"),
        _number(result["heldout_loss"], ".4f"),
        percent(result.get("heldout_loss_rel_to_adamw")),
    ]


def result_remarks(
    result: dict[str, Any], steps: int, *, sweep_edge: Callable[[dict[str, Any]], str], more: Sequence[str | None] = ()
) -> list[str]:
    """The lines below the table about one result: its failure (with the package to install), a
    non-finite loss, an unfinished run, ``sweep_edge(result)`` when its best lr is at the edge of the
    sweep, the lines of ``more`` that are not ``None``, its Eq. 2 steps and refreshes, workarounds and warnings."""
    name = result["name"]
    if result.get("failed"):
        hint = f" (pip install {result['package']})" if "not installed" in result["error"] else ""
        return [f"failed: {name}: {result['error']}{hint}"]
    remarks = []
    if nonfinite_losses(result):
        remarks.append(f"diverged: {name}: ended with a non-finite loss ({nonfinite_losses(result)})")
    if result.get("first_nonfinite_step") is not None:
        remarks.append(f"warning: {name}: the training loss became non-finite at step {result['first_nonfinite_step']}")
    if not result.get("completed", True):
        remarks.append(f"note: {name}: stopped after {result['steps_done']} of {steps} steps")
    if result.get("lr_at_sweep_edge"):
        remarks.append(sweep_edge(result))
    if result.get("heldout_loss_per_seed"):
        seeds = result["seeds"]
        line = (
            f"{name}: held-out loss over seeds {seeds[0]}-{seeds[-1]}: mean {result['heldout_loss']:.4f}, "
            f"std {result['heldout_loss_std']:.4f} (per seed: "
            f"{', '.join(f'{value:.4f}' for value in result['heldout_loss_per_seed'])})"
        )
        paired = next((value for key, value in result.items() if key.endswith("_per_seed") and "_rel_to_" in key), None)
        if paired and result["name"] != "adamw":
            line += f"; vs AdamW seed by seed: {', '.join(percent(value) for value in paired)}"
        remarks.append(line)
    remarks += [line for line in more if line is not None]
    if result.get("p_step_rel_change") is not None:
        remarks.append(
            f"{name}: median |dP|/|P| of an Eq. 2 step: {result['p_step_rel_change']:.3g} "
            f"({len(result['p_step_rel_changes'])} projection updates)"
        )
    if result.get("refresh"):
        refresh = result["refresh"]
        remarks.append(
            f"{name}: {refresh['count']} projection refresh{'es' if refresh['count'] > 1 else ''}, "
            f"{refresh['total_ms']:.0f} ms in all, {100 * refresh['share']:.1f}% of optimizer-step time"
        )
    remarks += [f"workaround: {name}: {w}" for w in result.get("workarounds", [])]
    remarks += [f"warning: {name}: {textwrap.shorten(w, 200)}" for w in result.get("warnings", [])]
    return remarks


def measurement_header(throughput: str) -> list[str]:
    """The headers of :func:`measurement_columns`, ``throughput`` naming its items-per-second column."""
    return [
        "optimizer",
        "lr",
        "state",
        "vs AdamW",
        "peak mem",
        "iter ms",
        "vs AdamW",
        "step ms",
        "refresh ms",
        throughput,
        "final loss",
        "held-out loss",
        "vs AdamW",
    ]


def failed_columns(result: dict[str, Any], width: int, *, skipped: int = 0) -> list[str]:
    """The table cells of a failed run, ``width`` in all: its name and lr, ``skipped`` blank cells, ``failed``,
    then blanks."""
    return [result["name"], f"{result['lr']:g}", *["-"] * skipped, "failed", *["-"] * (width - 3 - skipped)]


def schedule_text(config: dict[str, Any], batch: str | None = None) -> str:
    """The steps, ``batch`` (default the batch size), warm-up, lr decay, seeds, device and threads of a run."""
    batch = str(config["batch_size"]) if batch is None else batch
    return (
        f"{config['steps']} steps, batch {batch}, warm-up {config['warmup_steps']}, cosine to "
        f"{config['final_lr_fraction']:g} x lr, {seed_label(config)}, {config['device']} "
        f"({config['torch_threads']} threads)"
    )


def common_lr_text(config: dict[str, Any]) -> str:
    """``peak lr A, B for every optimizer``: the lrs of a job that gives every optimizer its preset's."""
    return f"peak lr {', '.join(f'{lr:g}' for lr in sorted(set(config['lrs'].values())))} for every optimizer"


def lr_sweep_text(config: dict[str, Any]) -> str:
    """``; lr sweep x[...], best held-out kept`` for a run with ``--lr-sweep``, else nothing."""
    return f"; lr sweep x{config['lr_sweep_factors']}, best held-out kept" if config.get("lr_sweep") else ""


def sweep_edge_note(result: dict[str, Any]) -> str:
    """The remark on a result whose best lr is at the edge of the sweep."""
    return f"note: {result['name']}: the best lr {result['lr']:g} is at the edge of the sweep"


def sweep_edge_listing(result: dict[str, Any], hint: str = "") -> str:
    """:func:`sweep_edge_note` with the held-out loss of every lr swept (and ``hint``, e.g. `` (try --lr)``)."""
    swept = ", ".join(f"{s['lr']:g}: {_number(s['heldout_loss'], '.4f')}" for s in result["lr_sweep"])
    return f"note: {result['name']}: its best lr is at the edge of the sweep ({swept}); the optimum may lie outside it{hint}"


_PROJECTED_KINDS = (
    ("tucker", "Tucker-2 kernels"),
    ("conv_input", "kernels on their input channels"),
    ("matrix", "matrices"),
)


def projection_line(result: dict[str, Any]) -> str | None:
    """What a result's optimizer projects (its ``projected`` summary) and what it keeps dense; ``None`` for
    an optimizer that projects nothing."""
    summary = result.get("projected") or {}
    parts = [
        f"{summary[kind]['tensors']} {label} ({summary[kind]['parameters']:,} parameters)"
        for kind, label in _PROJECTED_KINDS
        if kind in summary
    ]
    if not parts:
        return None
    dense = summary.get("dense", {"tensors": 0, "parameters": 0})
    return (
        f"{result['name']} projects {' and '.join(parts)}; {dense['tensors']} tensors "
        f"({dense['parameters']:,} parameters) dense"
    )


def run_remarks(
    run: dict[str, Any],
    *,
    sweep_edge: Callable[[dict[str, Any]], str] = sweep_edge_note,
    more: Callable[[dict[str, Any]], Sequence[str | None]] = lambda result: (),
) -> list[str]:
    """The :func:`result_remarks` of every result of ``run`` (with its ``more(result)``), then what peers
    printed while imported, said once."""
    steps = run["config"]["steps"]
    remarks = [
        line
        for result in run["results"]
        for line in result_remarks(result, steps, sweep_edge=sweep_edge, more=more(result))
    ]
    return remarks + import_note_lines(run)


def peak_memory_kind(results: list[dict[str, Any]]) -> str:
    """What ``peak mem`` measured in the finished results (empty if none finished)."""
    finished = finished_results(results)
    return finished[0]["peak_memory_kind"] if finished else ""


def job_table(
    above: Sequence[str], header: list[str], rows: list[list[str]], remarks: Sequence[str], notes: str | None
) -> str:
    """A job's run as text: the lines ``above`` (each wrapped at 120 columns), the Markdown table, the
    ``remarks``, and the wrapped ``notes`` (none with ``None``), a blank line between each part."""
    text = [*(line for part in above for line in textwrap.wrap(part, width=120)), ""]
    text += markdown_table(header, rows)
    if remarks:
        text += ["", *remarks]
    if notes:
        text += ["", *textwrap.wrap(notes, width=120)]
    return "\n".join(text)


# ------------------------------------------------------------------------------------------ a training job's plots


def finished_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that did not fail."""
    return [result for result in results if not result.get("failed")]


def plot_job_curves(
    plt: Any,
    run: dict[str, Any],
    directory: Path,
    job: str,
    *,
    heldout_label: str | None = None,
    log_scale: bool = False,
    ylabel: str = "training loss (batch cross-entropy)",
) -> list[Path]:
    """``<job>_loss.png``, the finished runs' training loss curves (each labelled with its lr), and with a
    ``heldout_label`` ``<job>_heldout_vs_state.png`` (:func:`plot_heldout_vs_state`)."""
    config = run["config"]
    finished = finished_results(run["results"])
    paths = [
        plot_loss_curves(
            plt,
            {**run, "results": finished},
            directory / f"{job}_loss.png",
            title=f"{job} {config['preset']}, {seed_label(config)}",
            label=lambda result: f"{result['name']} lr={result['lr']:g}",
            log_scale=log_scale,
            ylabel=ylabel,
        )
    ]
    if heldout_label is not None:
        paths.append(plot_heldout_vs_state(plt, finished, directory / f"{job}_heldout_vs_state.png", heldout_label))
    return paths


def sample_grids(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished results whose sample grid was written."""
    return [r for r in finished_results(results) if r.get("sample_grid") and Path(r["sample_grid"]).is_file()]


def plot_grids_side_by_side(plt: Any, grids: list[dict[str, Any]], path: Path, *, height: float) -> list[Path]:
    """The sample grids of ``grids`` (:func:`sample_grids`) side by side, each titled with its optimizer, lr
    and clf-FD, saved to ``path``; ``path`` and the grids (none without a grid)."""
    if not grids:
        return []
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), height), squeeze=False)
    for ax, result in zip(axes[0], grids, strict=True):
        ax.imshow(plt.imread(result["sample_grid"]), cmap="gray")
        ax.set_title(
            f"{result['name']} lr={result['lr']:g}\nclf-FD {result['classifier_frechet_distance']:.3f}", fontsize=9
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path, *(Path(r["sample_grid"]) for r in grids)]


def plot_heldout_vs_state(plt: Any, results: list[dict[str, Any]], path: Path, ylabel: str) -> Path:
    """A scatter of the finished ``results``' held-out loss against their optimizer-state MiB, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for result in results:
        ax.scatter([result["state_bytes"] / 2**20], [result["heldout_loss"]], label=result["name"])
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel(ylabel)
    ax.set_title("held-out loss vs optimizer state")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
