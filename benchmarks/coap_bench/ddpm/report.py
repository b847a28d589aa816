"""The DDPM run as a table and its plots (the PNG grid of each run's samples is :func:`save_sample_grid`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    plot_grids_side_by_side,
    plot_job_curves,
    projection_line,
    run_remarks,
    sample_grids,
    scale_text,
    schedule_text,
)
from ..training import FINAL_LOSS_WINDOW

__all__ = ["format_ddpm_table", "save_sample_grid", "write_ddpm_plots"]


_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step; img/s: batch "
    "images / median iteration; final loss: mean of the last {window} batch losses; held-out loss: MSE of the "
    "predicted noise on the held-out images with fixed timesteps and noise (the same for every optimizer); "
    "clf-FD: Frechet distance between the features of the generated samples and of the held-out images in a "
    "small classifier trained on the training images (NOT FID: compare it within this table only; real-vs-real "
    "floor {floor}){fid}."
)

_HEADER = [*measurement_header("img/s"), "clf-FD"]

#: How :func:`~coap_bench.report.plot_job_curves` draws the curves of a job trained on the DDPM objective.
DENOISING_CURVES = {
    "heldout_label": "held-out denoising loss",
    "log_scale": True,
    "ylabel": "training loss (batch MSE of the predicted noise)",
}


def _columns(result: dict[str, Any], with_fid: bool) -> list[str]:
    width = len(_HEADER) + with_fid
    if result.get("failed"):
        return failed_columns(result, width)
    row = [*measurement_columns(result, "images_per_s"), _number(result["classifier_frechet_distance"], ".3f")]
    return [*row, _number(result.get("fid"), ".2f")] if with_fid else row


def _recipe_line(config: dict[str, Any]) -> str:
    low = config["low_rank"]
    return (
        f"recipe {config['recipe']}: every parameter offered for projection; COAP rank ratio {low['rank_ratio']:g} "
        f"for matrices and 3x3 kernels (Tucker-2), T_u {low['update_interval']}, lambda {low['reproject_factor']}"
        + (f", P of matrices on the {low['projection_side']} side" if low.get("projection_side") else "")
        + (
            f", conv kernels projected on the {low['conv_projection']} mode"
            if low.get("conv_projection") == "input"
            else ""
        )
        + (", state in bf16" if low.get("state_dtype", "float32") != "float32" else "")
        + "; "
        f"GaLore/APOLLO rank ratio {low['rank_ratio']:g} on 2-D weights only (conv kernels dense), "
        f"update_proj_gap {low['proj_gap']}; update scale {scale_text(low['scale'])}, weight decay {low['weight_decay']:g}; "
        f"{common_lr_text(config)}{lr_sweep_text(config)}"
    )


def format_ddpm_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    unet = config["unet"]
    title = (
        f"ddpm {config['preset']}: UNet2DModel {tuple(unet['block_out_channels'])}, {config['parameters']:,} "
        f"parameters, {unet['sample_size']}x{unet['sample_size']}x{unet['in_channels']}; {data['name']}: "
        f"{data['train_images']:,} train / {data['heldout_images']:,} held-out images; {schedule_text(config)}"
    )
    frechet = config["frechet"]
    sampling = (
        f"samples: {config['samples']} per optimizer, {config['sampler'].upper()} {config['sample_steps']} steps, "
        f"same noise for all; held-out loss on {config['heldout_evaluations']:,} fixed (image, t, noise) triples; "
        f"clf-FD feature classifier: held-out accuracy "
        + (f"{100 * frechet['heldout_accuracy']:.1f}%" if frechet.get("heldout_accuracy") is not None else "-")
        + (f" (labels: {frechet['label_source']})" if frechet.get("label_source") != "classes" else "")
    )
    with_fid = bool(config.get("fid"))
    header = [*_HEADER, "FID"] if with_fid else _HEADER
    rows = [_columns(r, with_fid) for r in run["results"]]
    remarks = run_remarks(run, more=lambda result: [projection_line(result)])
    return job_table(
        [title, _recipe_line(config), sampling], header, rows, remarks, _notes(run, with_fid) if notes else None
    )


def _notes(run: dict[str, Any], with_fid: bool) -> str:
    config = run["config"]
    fid = (
        f"; FID: Frechet Inception Distance ({config['fid']['backend']}) of the samples against "
        f"{config['fid']['reference']}"
        if with_fid
        else ""
    )
    floor = f"{config['frechet']['real_train_vs_heldout']:.3f}"
    return _NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak_memory_kind(run["results"]), floor=floor, fid=fid)


def write_ddpm_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``ddpm_loss.png``, ``ddpm_heldout_vs_state.png`` and ``ddpm_samples.png`` (every
    optimizer's sample grid side by side); ``None`` if matplotlib is not installed.

    The per-run grids ``ddpm_samples_<optimizer>.png`` are written during the runs (``plots`` of
    :class:`DdpmConfig`) and listed too.
    """
    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    paths = plot_job_curves(plt, run, directory, "ddpm", **DENOISING_CURVES)
    grids = sample_grids(run["results"])
    return paths + plot_grids_side_by_side(plt, grids, directory / "ddpm_samples.png", height=4.4)
