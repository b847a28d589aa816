"""Training and scoring one ControlNet run per optimizer (:func:`run_controlnet`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coap_torch.utils import state_nbytes_by_kind

from ..ddpm.data import HeldoutSet, ImageBatches, heldout_set
from ..ddpm.model import noise_scheduler, projection_summary
from ..ddpm.presets import SCHEDULER_CONFIG
from ..environment import torch_threads
from ..images import ImageData, load_image_data
from ..optimizers import OPTIMIZERS, build_optimizer
from ..report import jsonable
from ..runner import checkpoint_workarounds, ratio_to_baseline
from ..training import (
    FileCheckpoint,
    HeldoutLoop,
    in_torch_threads,
    job_run,
    job_settings,
    result_row,
    run_fingerprint,
    run_label,
    run_optimizers,
    run_recording_warnings,
    run_stem,
    start_measuring,
    timed_sampling,
)
from .data import edge_f1, edge_map
from .model import build_controlnet, denoising_loss, evaluate_heldout, generate_samples
from .presets import CONTROLNET_PRESETS, ControlNetConfig
from .pretrain import FrozenUnet, frozen_unet, load_frozen_unet
from .report import save_control_grid

__all__ = ["ControlNetInputs", "load_inputs", "run_controlnet", "train_one"]

#: Control maps and samples drawn in the PNG grid of each run (pairs, 8 per row).
GRID_PAIRS = 32
#: Offsets between ``seed`` and the seeds of the batch stream and of the sampling noise.
_BATCH_STREAM = 2**32
_SAMPLE_STREAM = 2 * 2**32
_CHECKPOINT_FORMAT = 1
#: The control-fidelity scores of a run, averaged over ``--seeds`` beside
#: :data:`~coap_bench.training.SEED_AVERAGED`.
_EDGE_SCORES = ("edge_f1", "edge_precision", "edge_recall")
#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = ("lr", "heldout_loss", "final_loss", "edge_f1", "first_nonfinite_step", "error")


@dataclasses.dataclass
class ControlNetInputs:
    """What the runs of a ControlNet job share: the images, the held-out set, the frozen UNet, and the control
    maps samples are drawn from (the edge maps of the first held-out images)."""

    data: ImageData
    heldout: HeldoutSet
    frozen: FrozenUnet
    control: Tensor


def load_inputs(config: ControlNetConfig) -> ControlNetInputs:
    """The images, held-out set and sampling control maps of ``config``, and its frozen UNet (pretrained and
    cached on first use)."""
    preset = CONTROLNET_PRESETS[config.preset]
    data = load_image_data(preset.resolution, preset.channels)
    if config.batch_size > len(data.train):
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} training images")
    if config.samples > len(data.heldout):
        raise ValueError(f"samples ({config.samples}) exceeds the {len(data.heldout)} held-out control maps")
    heldout = heldout_set(data.heldout, config.heldout_repeats, SCHEDULER_CONFIG["num_train_timesteps"])
    frozen = frozen_unet(config, data, unet_seed=config.unet_seed)
    control = edge_map(data.heldout[: config.samples], preset.edge_threshold)
    return ControlNetInputs(data, heldout, frozen, control)


def _fingerprint(name: str, lr: float, config: ControlNetConfig, inputs: ControlNetInputs) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: the common fields, the images and the frozen UNet."""
    return run_fingerprint(
        name, lr, config, train_sha256=inputs.data.describe()["train_sha256"], unet_sha256=inputs.frozen.sha256
    )


@in_torch_threads
def train_one(
    name: str, lr: float, config: ControlNetConfig, inputs: ControlNetInputs, checkpoint: Path | None
) -> dict[str, Any]:
    """Train a fresh ControlNet (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``, then score it."""
    spec = OPTIMIZERS[name]
    settings = config.settings()
    preset = CONTROLNET_PRESETS[config.preset]
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    unet = load_frozen_unet(inputs.frozen, config, device)
    controlnet = build_controlnet(unet, preset, seed=config.seed)
    controlnet.train()
    scheduler = noise_scheduler()
    optimizer = build_optimizer(name, list(controlnet.parameters()), [], lr, settings)
    batches = ImageBatches(
        inputs.data.train, config.batch_size, scheduler.config.num_train_timesteps, seed=config.seed + _BATCH_STREAM
    )
    label = run_label(name, lr, config.lr_sweep)
    loop = HeldoutLoop(
        controlnet,
        optimizer,
        batches,
        lambda batch: denoising_loss(unet, controlnet, scheduler, preset, *batch),
        evaluate=lambda: evaluate_heldout(unet, controlnet, scheduler, preset, inputs.heldout, config.eval_batch_size),
        config=config,
        device=device,
        label=label,
        next_batch=lambda: tuple(t.to(device) for t in batches.next()),
    )
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        loop.resume(FileCheckpoint(checkpoint, spec, _fingerprint(name, lr, config, inputs), _CHECKPOINT_FORMAT))
    messages = run_recording_warnings(loop)
    heldout_loss = loop.evaluate(len(loop.losses))
    scores = score_control(unet, controlnet, config, inputs, label, run_stem(name, lr, config.lr_sweep))
    return result_row(
        name,
        spec,
        lr,
        **loop.measurements(spec, settings, items_per_step=config.batch_size, throughput="images_per_s"),
        state_bytes_by_kind=state_nbytes_by_kind(optimizer),
        projected=projection_summary(optimizer, spec.family),
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        heldout_loss=heldout_loss,
        heldout_curve=loop.logs["heldout_curve"] if config.eval_every else [],
        **scores,
        workarounds=workarounds,
        warnings=messages[:5],
    )


def score_control(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    config: ControlNetConfig,
    inputs: ControlNetInputs,
    label: str,
    stem: str | None,
) -> dict[str, Any]:
    """Control fidelity: one sample per sampling control map (DDIM, seeded noise), scored by
    :func:`~coap_bench.controlnet.data.edge_f1`; with ``config.plots`` and a ``stem``, the PNG grid of the first
    control maps beside their samples."""
    preset = CONTROLNET_PRESETS[config.preset]
    samples, seconds = timed_sampling(
        config,
        label,
        len(inputs.control),
        lambda bar: generate_samples(
            unet,
            controlnet,
            preset,
            inputs.control,
            steps=config.sample_steps,
            seed=config.seed + _SAMPLE_STREAM,
            batch_size=config.eval_batch_size,
            progress=bar,
        ),
    )
    finite = bool(torch.isfinite(samples).all())
    fidelity = edge_f1(samples, inputs.control, preset.edge_threshold) if finite else dict.fromkeys(("f1",), math.nan)
    grid = None
    if config.plots and stem is not None:
        grid = save_control_grid(
            inputs.control[:GRID_PAIRS], samples[:GRID_PAIRS], Path(config.plots) / f"controlnet_samples_{stem}.png"
        )
    return {
        "edge_f1": fidelity["f1"],
        "edge_precision": fidelity.get("precision", math.nan),
        "edge_recall": fidelity.get("recall", math.nan),
        "samples": len(samples),
        "sampling_seconds": seconds,
        "sample_grid": str(grid) if grid is not None else None,
    }


def run_controlnet(config: ControlNetConfig) -> dict[str, Any]:
    """Train a ControlNet once per optimizer of ``config``; return ``{"config", "data", "versions", "hardware",
    "argv", "results"}``.

    The frozen UNet is pretrained (or loaded from the cache) first, and scored alone (``reference`` in the
    config: its held-out loss without control, and the edge F1 of its samples, which ignore the control maps).
    With ``lr_sweep``, each optimizer runs at its lr times :data:`~coap_bench.training.LR_SWEEP_FACTORS` and the
    run with the lowest held-out loss is kept; with ``seeds`` > 1 each lr is run per seed and the held-out loss,
    final loss and edge scores are averaged. A run that raises (or whose process dies) is a failed result.
    """
    config = config.resolved()
    if CONTROLNET_PRESETS[config.preset].memory_only:
        raise ValueError(
            f"training the {config.preset} preset (latents, SDXL's text and time conditioning) is not built into this "
            f"job yet; `coap-bench controlnet --preset {config.preset}` prints its memory"
        )
    with torch_threads(config.threads):
        inputs = load_inputs(config)
        reference = _reference(config, inputs)
        results = run_optimizers(config, train_one, (config, inputs), _SWEEP_KEYS, also_averaged=_EDGE_SCORES)
        return _summarize(config, inputs, reference, results)


def _reference(config: ControlNetConfig, inputs: ControlNetInputs) -> dict[str, Any]:
    """The frozen UNet's own figures: held-out loss and edge F1 without a ControlNet (the floor each run improves on)."""
    preset = CONTROLNET_PRESETS[config.preset]
    unet = load_frozen_unet(inputs.frozen, config, config.device)
    loss = evaluate_heldout(unet, None, noise_scheduler(), preset, inputs.heldout, config.eval_batch_size)
    scores = score_control(unet, None, config, inputs, "frozen UNet", "frozen_unet")
    return {"heldout_loss": loss, **{k: scores[k] for k in _EDGE_SCORES}}


def _summarize(
    config: ControlNetConfig, inputs: ControlNetInputs, reference: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    preset = CONTROLNET_PRESETS[config.preset]
    ratio_to_baseline(results, "edge_f1")
    unet = load_frozen_unet(inputs.frozen, config, "cpu")
    controlnet = build_controlnet(unet, preset, seed=config.seed)
    settings = job_settings(
        config,
        dataclasses.asdict(config.settings()),
        unet=jsonable(preset.unet_config()),
        conditioning_channels=list(preset.conditioning_channels),
        edge_threshold=preset.edge_threshold,
        scheduler=dict(SCHEDULER_CONFIG),
        sampler="ddim",
        unet_parameters=sum(p.numel() for p in unet.parameters()),
        parameters=sum(p.numel() for p in controlnet.parameters()),
        frozen_unet=inputs.frozen.describe(),
        reference=reference,
        heldout_evaluations=len(inputs.heldout.images),
    )
    return job_run(config, settings, inputs.data.describe(), results)
