"""The ControlNet run as a table, its plots, and the PNG grid of each run's control maps and samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..ddpm.report import DENOISING_CURVES
from ..images import save_sample_grid
from ..report import (
    _number,
    _pyplot,
    common_lr_text,
    failed_columns,
    job_table,
    lr_sweep_text,
    measurement_columns,
    measurement_header,
    peak_memory_kind,
    plot_job_curves,
    run_remarks,
    sample_grids,
    scale_text,
    schedule_text,
)
from ..training import FINAL_LOSS_WINDOW

__all__ = ["format_controlnet_table", "save_control_grid", "write_controlnet_plots"]


def save_control_grid(control: Tensor, samples: Tensor, path: str | Path, *, pairs_per_row: int = 8) -> Path | None:
    """A PNG grid of ``control`` maps (``{0, 1}``) each followed by its sample (``[-1, 1]``), ``pairs_per_row``
    pairs a row; ``None`` (nothing written) when matplotlib is not installed."""
    maps = control.float() * 2 - 1  # edge pixels white, as the samples' strokes
    pairs = torch.stack([maps, samples.float()], dim=1).flatten(0, 1)
    return save_sample_grid(pairs, path, columns=2 * pairs_per_row)


_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "(the frozen UNet's forward and backward included) / of optimizer.step() alone; refresh ms: mean time a "
    "projection refresh adds to its step; img/s: batch images / median iteration; final loss: mean of the last "
    "{window} batch losses; held-out loss: MSE of the predicted noise on the held-out images, each controlled by its "
    "own edge map, with fixed timesteps and noise (the same for every optimizer); edge F1: control fidelity, the F1 "
    "of the edge pixels of DDIM samples drawn from held-out edge maps against those maps, pooled over all samples "
    "(1 = every sample has exactly the edges asked for)."
)

_HEADER = [*measurement_header("img/s"), "edge F1"]


def _columns(result: dict[str, Any]) -> list[str]:
    if result.get("failed"):
        return failed_columns(result, len(_HEADER))
    return [*measurement_columns(result, "images_per_s"), _number(result.get("edge_f1"), ".3f")]


def _recipe_line(config: dict[str, Any]) -> str:
    low = config["low_rank"]
    return (
        f"recipe {config['recipe']}: every ControlNet parameter offered for projection; COAP rank ratio "
        f"{low['rank_ratio']:g} for matrices and 3x3 kernels (Tucker-2), T_u {low['update_interval']}, lambda "
        f"{low['reproject_factor']}"
        + (", state in bf16" if low.get("state_dtype", "float32") != "float32" else "")
        + "; "
        f"GaLore rank ratio {low['rank_ratio']:g} on 2-D weights only (conv kernels dense), update_proj_gap "
        f"{low['proj_gap']}; update scale {scale_text(low['scale'])}, weight decay {low['weight_decay']:g}; "
        f"{common_lr_text(config)}{lr_sweep_text(config)}"
    )


def _seed_line(result: dict[str, Any]) -> str | None:
    values = result.get("edge_f1_per_seed")
    if not values:
        return None
    return (
        f"{result['name']}: edge F1 over seeds: mean {result['edge_f1']:.3f}, std {result['edge_f1_std']:.3f} "
        f"(per seed: {', '.join(f'{value:.3f}' for value in values)})"
    )


def format_controlnet_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    unet, frozen, reference = config["unet"], config["frozen_unet"], config["reference"]
    title = (
        f"controlnet {config['preset']}: ControlNetModel.from_unet, {config['parameters']:,} trainable parameters, on "
        f"a frozen UNet2DConditionModel {tuple(unet['block_out_channels'])} ({config['unet_parameters']:,} "
        f"parameters, {frozen['steps']} pretraining steps, {frozen['source']}); {data['name']}: "
        f"{data['train_images']:,} train / {data['heldout_images']:,} held-out images at {unet['sample_size']}x"
        f"{unet['sample_size']}, control: Sobel edge maps (threshold {config['edge_threshold']:g}); "
        f"{schedule_text(config)}"
    )
    sampling = (
        f"edge F1 from {config['samples']} held-out edge maps, DDIM {config['sample_steps']} steps, same noise for "
        f"all; held-out loss on {config['heldout_evaluations']:,} fixed (image, t, noise) triples. The frozen UNet "
        f"alone (no ControlNet): held-out loss {reference['heldout_loss']:.4f}, edge F1 {reference['edge_f1']:.3f}."
    )
    rows = [_columns(r) for r in run["results"]]
    remarks = run_remarks(run, more=lambda result: [_seed_line(result)])
    peak = peak_memory_kind(run["results"])
    notes_text = _NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak) if notes else None
    return job_table([title, _recipe_line(config), sampling], _HEADER, rows, remarks, notes_text)


def write_controlnet_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``controlnet_loss.png``, ``controlnet_heldout_vs_state.png`` and ``controlnet_samples.png`` (every
    optimizer's grid of control maps and samples, one above the other); ``None`` if matplotlib is not installed.

    The per-run grids ``controlnet_samples_<optimizer>.png`` are written during the runs and listed too.
    """
    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    paths = plot_job_curves(plt, run, directory, "controlnet", **DENOISING_CURVES)
    grids = sample_grids(run["results"])
    if grids:
        paths += _stack_grids(plt, grids, directory / "controlnet_samples.png")
    return paths


def _stack_grids(plt: Any, grids: list[dict[str, Any]], path: Path) -> list[Path]:
    """The runs' grids of control maps and samples one above the other (wide grids read better stacked)."""
    images = [plt.imread(r["sample_grid"]) for r in grids]
    height = sum(8 * image.shape[0] / image.shape[1] + 0.5 for image in images)
    fig, axes = plt.subplots(len(grids), 1, figsize=(8, height), squeeze=False)
    for ax, result, image in zip(axes[:, 0], grids, images, strict=True):
        ax.imshow(image, cmap="gray")
        ax.set_title(f"{result['name']} lr={result['lr']:g}: edge map, sample; edge F1 {result['edge_f1']:.3f}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path, *(Path(r["sample_grid"]) for r in grids)]
