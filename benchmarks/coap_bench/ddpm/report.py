"""The DDPM run as a table, its plots, and the PNG grid of each run's samples."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._quiet import import_note_lines
from ..report import _number, _pyplot, markdown_table, plot_loss_curves, scale_text
from ..training import FINAL_LOSS_WINDOW, measurement_columns, plot_heldout_vs_state, result_remarks, seed_label

__all__ = ["format_ddpm_table", "save_sample_grid", "write_ddpm_plots"]


def save_sample_grid(images: Tensor, path: str | Path, *, columns: int = 8, min_side: int = 512) -> Path | None:
    """A PNG grid of ``images`` (N, C, H, W in ``[-1, 1]``), upscaled (nearest) to about ``min_side``
    pixels; ``None`` (nothing written) when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate((images.float().clamp(-1, 1) + 1) / 2):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            image
        )
    factor = max(1, math.ceil(min_side / max(grid.shape[1:])))
    grid = grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array, cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
    return path


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

_HEADER = [
    "optimizer",
    "lr",
    "state",
    "vs AdamW",
    "peak mem",
    "iter ms",
    "vs AdamW",
    "step ms",
    "refresh ms",
    "img/s",
    "final loss",
    "held-out loss",
    "vs AdamW",
    "clf-FD",
]


def _columns(result: dict[str, Any], with_fid: bool) -> list[str]:
    width = len(_HEADER) + with_fid
    if result.get("failed"):
        return [result["name"], f"{result['lr']:g}", "failed", *["-"] * (width - 3)]
    row = [*measurement_columns(result, "images_per_s"), _number(result["classifier_frechet_distance"], ".3f")]
    return [*row, _number(result.get("fid"), ".2f")] if with_fid else row


def _projection_line(result: dict[str, Any]) -> str | None:
    summary = result.get("projected") or {}
    parts = []
    for kind, label in (
        ("tucker", "Tucker-2 kernels"),
        ("conv_input", "kernels on their input channels"),
        ("matrix", "matrices"),
    ):
        if kind in summary:
            parts.append(f"{summary[kind]['tensors']} {label} ({summary[kind]['parameters']:,} parameters)")
    if not parts:
        return None
    dense = summary.get("dense", {"tensors": 0, "parameters": 0})
    return (
        f"{result['name']} projects {' and '.join(parts)}; {dense['tensors']} tensors "
        f"({dense['parameters']:,} parameters) dense"
    )


def _recipe_line(config: dict[str, Any]) -> str:
    low = config["low_rank"]
    lrs = sorted(set(config["lrs"].values()))
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
        f"peak lr {', '.join(f'{lr:g}' for lr in lrs)} for every optimizer"
        + (f"; lr sweep x{config['lr_sweep_factors']}, best held-out kept" if config.get("lr_sweep") else "")
    )


def format_ddpm_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    unet = config["unet"]
    title = (
        f"ddpm {config['preset']}: UNet2DModel {tuple(unet['block_out_channels'])}, {config['parameters']:,} "
        f"parameters, {unet['sample_size']}x{unet['sample_size']}x{unet['in_channels']}; {data['name']}: "
        f"{data['train_images']:,} train / {data['heldout_images']:,} held-out images; {config['steps']} steps, "
        f"batch {config['batch_size']}, warm-up {config['warmup_steps']}, cosine to {config['final_lr_fraction']:g} "
        f"x lr, {seed_label(config)}, {config['device']} ({config['torch_threads']} threads)"
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
    results = run["results"]
    text = [
        *textwrap.wrap(title, width=120),
        *textwrap.wrap(_recipe_line(config), width=120),
        *textwrap.wrap(sampling, width=120),
        "",
    ]
    text += markdown_table(header, [_columns(r, with_fid) for r in results])
    remarks = [
        line
        for result in results
        for line in result_remarks(
            result,
            config["steps"],
            more=[_projection_line(result)],
            sweep_edge=lambda r: f"note: {r['name']}: the best lr {r['lr']:g} is at the edge of the sweep",
        )
    ]
    remarks += import_note_lines(run)  # what peers printed while imported, said once
    if remarks:
        text += ["", *remarks]
    if notes:
        finished = [r for r in results if not r.get("failed")]
        peak = finished[0]["peak_memory_kind"] if finished else ""
        fid = (
            (
                f"; FID: Frechet Inception Distance ({config['fid']['backend']}) of the samples against "
                f"{config['fid']['reference']}"
            )
            if with_fid
            else ""
        )
        floor = f"{frechet['real_train_vs_heldout']:.3f}"
        text += [
            "",
            *textwrap.wrap(_NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak, floor=floor, fid=fid), width=120),
        ]
    return "\n".join(text)


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
    finished = [r for r in run["results"] if not r.get("failed")]
    paths = [
        plot_loss_curves(
            plt,
            {**run, "results": finished},
            directory / "ddpm_loss.png",
            title=f"ddpm {run['config']['preset']}, {seed_label(run['config'])}",
            label=lambda result: f"{result['name']} lr={result['lr']:g}",
            log_scale=True,
            ylabel="training loss (batch MSE of the predicted noise)",
        )
    ]
    paths.append(
        plot_heldout_vs_state(plt, finished, directory / "ddpm_heldout_vs_state.png", "held-out denoising loss")
    )

    grids = [r for r in finished if r.get("sample_grid") and Path(r["sample_grid"]).is_file()]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), squeeze=False)
        for ax, result in zip(axes[0], grids, strict=True):
            ax.imshow(plt.imread(result["sample_grid"]), cmap="gray")
            ax.set_title(
                f"{result['name']} lr={result['lr']:g}\nclf-FD {result['classifier_frechet_distance']:.3f}", fontsize=9
            )
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(directory / "ddpm_samples.png", dpi=120)
        plt.close(fig)
        paths.append(directory / "ddpm_samples.png")
        paths += [Path(r["sample_grid"]) for r in grids]
    return paths
