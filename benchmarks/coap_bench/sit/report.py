"""The SiT run as a table (a training run, or the planned state of a GPU preset on a CPU), and its plots."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from .._quiet import import_note_lines
from ..report import (
    _number,
    _pyplot,
    common_lr_text,
    failed_columns,
    finished_results,
    format_bytes,
    job_table,
    lr_sweep_text,
    markdown_table,
    measurement_columns,
    measurement_header,
    peak_memory_kind,
    plot_grids_side_by_side,
    plot_job_curves,
    projection_line,
    run_remarks,
    sample_grids,
    scale_text,
    schedule_text,
)
from ..training import FINAL_LOSS_WINDOW

__all__ = ["format_sit_table", "write_sit_plots"]

_HEADER = [*measurement_header("img/s"), "clf-FD", "class acc"]

_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step; img/s: batch "
    "images / median iteration; final loss: mean of the last {window} batch losses; held-out loss: MSE of the "
    "predicted velocity on the held-out images with their labels and fixed times and noise (the same for every "
    "optimizer); clf-FD: Frechet distance between the features of the class-conditional samples and of the "
    "held-out images in a small classifier trained on the training images (NOT FID: compare it within this "
    "table only; real-vs-real floor {floor}); class acc: share of the samples that classifier puts in the class "
    "they were generated for ({accuracy})."
)


def _model_text(config: dict[str, Any]) -> str:
    model = config["model"]
    size = model["input_size"]
    return (
        f"SiT (depth {model['depth']}, hidden {model['hidden']}, {model['heads']} heads, patch {model['patch']}, "
        f"{model['num_classes']} classes), {config['parameters']:,} parameters, {size}x{size}x{model['in_channels']}"
    )


def _schedule_text(name: str, low: dict[str, Any]) -> str:
    rank = f"rank {low['rank']}" if low.get("rank") else f"rank ratio {low['rank_ratio']:g}"
    if name.startswith("coap_"):
        return f"{name} {rank}, T_u {low['update_interval']}, lambda {low['reproject_factor']}"
    return f"{name} {rank}, update_proj_gap {low['proj_gap']}"


def _recipe_line(config: dict[str, Any]) -> str:
    lows = {name: low for name, low in config["low_rank"].items() if not name.startswith(("adamw", "adafactor"))}
    any_low = next(iter(config["low_rank"].values()))
    return (
        f"recipe {config['recipe']}: every parameter offered for projection"
        + ("".join(f"; {_schedule_text(name, low)}" for name, low in lows.items() if not name.startswith("apollo")))
        + (f"; P on the {any_low['projection_side']} side" if any_low.get("projection_side") else "")
        + ("; COAP state in bf16" if any_low.get("state_dtype", "float32") != "float32" else "")
        + f"; update scale {scale_text(any_low['scale'])}, weight decay {any_low['weight_decay']:g}; "
        f"{common_lr_text(config)}{lr_sweep_text(config)}"
    )


def _columns(result: dict[str, Any]) -> list[str]:
    if result.get("failed"):
        return failed_columns(result, len(_HEADER))
    accuracy = result.get("sample_class_accuracy")
    return [
        *measurement_columns(result, "images_per_s"),
        _number(result["classifier_frechet_distance"], ".3f"),
        "-" if accuracy is None else _number(100 * accuracy, ".1f") + "%",
    ]


def format_sit_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config = run["config"]
    if config.get("memory_only"):
        return _format_memory_table(run)
    data = run["data"]
    title = (
        f"sit {config['preset']}: {_model_text(config)}; {data['name']}: {data['train_images']:,} train / "
        f"{data['heldout_images']:,} held-out images, {data['num_classes']} classes; {schedule_text(config)}"
    )
    frechet = config["frechet"]
    calls = config["sample_steps"] * (2 if config["sampler"] == "heun" else 1)
    sampling = (
        f"objective: {config['objective']}; samples: {config['samples']} per optimizer, balanced classes, "
        f"{config['sampler']} {config['sample_steps']} steps ({calls} model calls)"
        + (f", guidance scale {config['cfg_scale']:g}" if config["cfg_scale"] > 1 else "")
        + f", same noise for all; held-out loss on {config['heldout_evaluations']:,} fixed (image, label, t, noise); "
        "clf-FD feature classifier: held-out accuracy "
        + (f"{100 * frechet['heldout_accuracy']:.1f}%" if frechet.get("heldout_accuracy") is not None else "-")
    )
    rows = [_columns(r) for r in run["results"]]
    remarks = run_remarks(run, more=lambda result: [projection_line(result)])
    return job_table([title, _recipe_line(config), sampling], _HEADER, rows, remarks, _notes(run) if notes else None)


def _notes(run: dict[str, Any]) -> str:
    config, data = run["config"], run["data"]
    finished = finished_results(run["results"])
    first_only = config.get("seeds", 1) > 1 and not any("sample_class_accuracy_per_seed" in r for r in finished)
    accuracy = f"chance {100 / data['num_classes']:.0f}%" + (
        f"; seed {config['seed']}'s run only" if first_only else ""
    )
    floor = f"{config['frechet']['real_train_vs_heldout']:.3f}"
    peak = peak_memory_kind(run["results"])
    return _NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak, floor=floor, accuracy=accuracy)


def _format_memory_table(run: dict[str, Any]) -> str:
    config = run["config"]
    title = (
        f"sit {config['preset']}: {_model_text(config)}; the optimizer state each optimizer will hold, planned "
        "on the meta device (nothing trained: add --device cuda to train it)"
    )
    rows = []
    for result in run["results"]:
        if result.get("failed"):
            rows.append([result["name"], "-", "failed", "-"])
            continue
        low = result.get("low_rank")
        setting = _schedule_text(result["name"], low).split(" ", 1)[1] if low else "-"
        rows.append(
            [
                result["name"],
                setting,
                format_bytes(result["state_bytes"]),
                _number(result.get("state_ratio_to_adamw"), ".3f"),
            ]
        )
    text = [*textwrap.wrap(title, width=120), "", *markdown_table(["optimizer", "setting", "state", "vs AdamW"], rows)]
    remarks = [f"failed: {r['name']}: {r['error']}" for r in run["results"] if r.get("failed")]
    if config.get("memory_job_layout") is not None:
        same = "the same" if config["memory_job_layout"] else "NOT the same"
        remarks.append(f"parameter layout: {same} names and shapes as `coap-bench memory`'s SiT-XL/2")
    remarks += import_note_lines(run)
    return "\n".join([*text, *([""] + remarks if remarks else [])])


def write_sit_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``sit_loss.png``, ``sit_heldout_vs_state.png`` and ``sit_samples.png`` (every optimizer's sample
    grid side by side); ``None`` if matplotlib is not installed. The per-run grids ``sit_samples_<optimizer>.png``
    are written during the runs and listed too. A memory-only run has nothing to plot (an empty list)."""
    plt = _pyplot()
    if plt is None:
        return None
    if run["config"].get("memory_only"):
        return []
    directory = Path(directory)
    paths = plot_job_curves(
        plt,
        run,
        directory,
        "sit",
        heldout_label="held-out velocity loss",
        log_scale=True,
        ylabel="training loss (batch MSE of the predicted velocity)",
    )
    grids = sample_grids(run["results"])
    return paths + plot_grids_side_by_side(plt, grids, directory / "sit_samples.png", height=3.8)
