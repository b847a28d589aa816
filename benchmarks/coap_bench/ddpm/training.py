"""Training and scoring one DDPM run per optimizer (:func:`run_ddpm`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coap_torch.utils import state_nbytes_by_kind

from ..environment import torch_threads
from ..frechet import FrechetScorer, frechet_scorer
from ..images import ImageData, load_image_data, save_sample_grid
from ..optimizers import OPTIMIZERS, build_optimizer
from ..report import jsonable
from ..runner import checkpoint_workarounds, ratio_to_baseline
from ..training import (
    FileCheckpoint,
    HeldoutLoop,
    TrainingLoop,
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
from .data import HeldoutSet, ImageBatches, heldout_set
from .model import build_unet, denoising_loss, evaluate_heldout, generate_samples, noise_scheduler, projection_summary
from .presets import DDPM_PRESETS, DDPM_VARIANCE, SCHEDULER_CONFIG, DdpmConfig

__all__ = ["run_ddpm", "train_one"]

#: Number of generated samples drawn in the PNG grid of each run (8 x 8).
GRID_SAMPLES = 64
#: Offsets between ``seed`` and the seeds of the batch stream and of the sampling noise.
_BATCH_STREAM = 2**32
_SAMPLE_STREAM = 2 * 2**32
_CHECKPOINT_FORMAT = 1


def _fingerprint(name: str, lr: float, config: DdpmConfig, data: ImageData) -> dict[str, Any]:
    """What must match for a checkpoint to be continued."""
    return run_fingerprint(name, lr, config, train_sha256=data.describe()["train_sha256"])


@in_torch_threads
def train_one(
    name: str,
    lr: float,
    config: DdpmConfig,
    data: ImageData,
    heldout: HeldoutSet,
    scorer: FrechetScorer,
    fid_reference: tuple[Tensor, Tensor] | None,
    checkpoint: Path | None,
) -> dict[str, Any]:
    """Train a fresh UNet (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``, then score it."""
    spec = OPTIMIZERS[name]
    settings = config.settings()
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    model = build_unet(DDPM_PRESETS[config.preset], seed=config.seed, device=device)
    model.train()
    scheduler_ = noise_scheduler()
    optimizer = build_optimizer(name, list(model.parameters()), [], lr, settings)
    batches = ImageBatches(
        data.train, config.batch_size, scheduler_.config.num_train_timesteps, seed=config.seed + _BATCH_STREAM
    )
    label = run_label(name, lr, config.lr_sweep)
    loop = HeldoutLoop(
        model,
        optimizer,
        batches,
        lambda batch: denoising_loss(model, scheduler_, *batch),
        evaluate=lambda: evaluate_heldout(model, scheduler_, heldout, config.eval_batch_size),
        config=config,
        device=device,
        label=label,
        next_batch=lambda: tuple(t.to(device) for t in batches.next()),
    )
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        loop.resume(FileCheckpoint(checkpoint, spec, _fingerprint(name, lr, config, data), _CHECKPOINT_FORMAT))
    messages = run_recording_warnings(loop)
    heldout_loss = loop.evaluate(len(loop.losses))
    scores = score_samples(model, name, lr, config, scorer, fid_reference, label)
    return ddpm_result(name, lr, config, loop, baseline_rss, heldout_loss, scores, workarounds, messages)


def ddpm_result(
    name: str,
    lr: float,
    config: DdpmConfig,
    loop: TrainingLoop,
    baseline_rss: int,
    heldout_loss: float | None,
    scores: dict[str, Any],
    workarounds: list[str],
    messages: list[str],
    **more: Any,
) -> dict[str, Any]:
    """The result row of a finished DDPM run (one process's, or one rank's with the rank's figures in
    ``more``): the loop's measurements, the optimizer's state by kind and what it projects, the held-out
    loss and the loop's held-out curve (none without ``eval_every``), the sample ``scores``, the
    ``workarounds`` and the first five warning ``messages``."""
    spec = OPTIMIZERS[name]
    return result_row(
        name,
        spec,
        lr,
        **loop.measurements(spec, config.settings(), items_per_step=config.batch_size, throughput="images_per_s"),
        state_bytes_by_kind=state_nbytes_by_kind(loop.optimizer),
        projected=projection_summary(loop.optimizer, spec.family),
        rss_before_model_bytes=baseline_rss if loop.device.type == "cpu" else None,
        heldout_loss=heldout_loss,
        heldout_curve=loop.logs["heldout_curve"] if config.eval_every else [],
        **scores,
        workarounds=workarounds,
        warnings=messages[:5],
        **more,
    )


def score_samples(
    model: torch.nn.Module,
    name: str,
    lr: float,
    config: DdpmConfig,
    scorer: FrechetScorer,
    fid_reference: tuple[Tensor, Tensor] | None,
    label: str,
) -> dict[str, Any]:
    """The sample-quality figures of a trained ``model``: ``config.samples`` images generated from seeded
    noise, their classifier Frechet distance, their FID (with ``fid_reference``), and the PNG grid of the
    first of them (with ``config.plots``)."""
    device = next(model.parameters()).device
    samples, sampling_seconds = timed_sampling(
        config,
        label,
        config.samples,
        lambda bar: generate_samples(
            model,
            config.samples,
            sampler=config.sampler,
            steps=config.sample_steps,
            seed=config.seed + _SAMPLE_STREAM,
            batch_size=config.eval_batch_size,
            progress=bar,
        ),
    )
    finite = bool(torch.isfinite(samples).all())
    frechet = scorer.score(samples) if finite else float("nan")
    fid = None
    if fid_reference is not None and finite:
        from ..frechet import frechet_distance, gaussian_statistics, inception_features, inception_fid_features

        features = inception_fid_features(samples, inception_features(device)[1])
        fid = frechet_distance(*gaussian_statistics(features), *fid_reference)
    grid = None
    if config.plots:
        grid = save_sample_grid(
            samples[:GRID_SAMPLES], Path(config.plots) / f"ddpm_samples_{run_stem(name, lr, config.lr_sweep)}.png"
        )
    return {
        "classifier_frechet_distance": frechet,
        "fid": fid,
        "samples": config.samples,
        "sampling_seconds": sampling_seconds,
        "sample_grid": str(grid) if grid is not None else None,
    }


#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = ("lr", "heldout_loss", "final_loss", "classifier_frechet_distance", "first_nonfinite_step", "error")


def run_ddpm(config: DdpmConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config``; return ``{"config", "data", "versions", "hardware", "argv", "results"}``.

    With ``lr_sweep``, each optimizer runs at its lr times
    :data:`~coap_bench.training.LR_SWEEP_FACTORS` and the run with the lowest held-out loss is
    kept (all of them are listed in its ``lr_sweep``). A run that raises (or whose process dies)
    is a result with ``failed: True`` and its ``error``. Ratios to AdamW are added when ``adamw`` ran.
    ``import_notes`` says what packages printed while the runs imported them.
    """
    config = config.resolved()
    with torch_threads(config.threads):
        return _run_ddpm(config)


@dataclasses.dataclass
class DdpmInputs:
    """What the runs of a DDPM job share: the images, the held-out set and the sample scorers (``scorer``
    ``None`` where no samples are scored: the other ranks of a distributed job)."""

    data: ImageData
    heldout: HeldoutSet
    scorer: FrechetScorer | None = None
    fid_reference: tuple[Tensor, Tensor] | None = None
    fid_info: dict[str, Any] | None = None


def load_inputs(config: DdpmConfig, *, scoring: bool = True) -> DdpmInputs:
    """The images and held-out set of ``config`` and, with ``scoring``, the sample scorers (the feature
    classifier, trained here, and with ``config.fid`` the Inception statistics of the training images)."""
    preset = DDPM_PRESETS[config.preset]
    if config.fid and scoring:  # fail before training when real FID cannot work here
        from ..frechet import inception_features

        backend, _ = inception_features(config.device)
    data = load_image_data(
        preset.resolution,
        preset.channels,
        image_dir=config.image_dir,
        cifar10=config.cifar10,
        max_images=config.max_images,
    )
    if config.batch_size > len(data.train):
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} training images")
    num_timesteps = SCHEDULER_CONFIG["num_train_timesteps"]
    inputs = DdpmInputs(data, heldout_set(data.heldout, config.heldout_repeats, num_timesteps))
    if not scoring:
        return inputs
    inputs.scorer = frechet_scorer(data, samples=config.samples, seed=config.seed, steps=config.classifier_steps)
    if config.fid:
        from ..frechet import gaussian_statistics, inception_features, inception_fid_features

        real_features = inception_fid_features(data.train, inception_features(config.device)[1])
        inputs.fid_reference = gaussian_statistics(real_features)
        inputs.fid_info = {"backend": backend, "reference": f"{len(data.train)} training images (as in the paper)"}
    return inputs


def _run_ddpm(config: DdpmConfig) -> dict[str, Any]:
    inputs = load_inputs(config)
    results = run_optimizers(
        config,
        train_one,
        (config, inputs.data, inputs.heldout, inputs.scorer, inputs.fid_reference),
        _SWEEP_KEYS,
    )
    return summarize_run(config, inputs, results, config.device)


def summarize_run(
    config: DdpmConfig, inputs: DdpmInputs, results: list[dict[str, Any]], device: torch.device | str
) -> dict[str, Any]:
    """The job's result: its settings, data, environment and ``results`` (with the clf-FD ratios to AdamW added)."""
    preset = DDPM_PRESETS[config.preset]
    ratio_to_baseline(results, "classifier_frechet_distance")
    settings = job_settings(
        config,
        dataclasses.asdict(config.settings()),
        unet=jsonable(preset.unet_config()),
        scheduler={**SCHEDULER_CONFIG, "variance_type": DDPM_VARIANCE},
        parameters=preset.num_parameters(),
        heldout_evaluations=len(inputs.heldout.images),
    )
    settings.update(frechet=inputs.scorer.info, fid=inputs.fid_info)
    return job_run(config, settings, inputs.data.describe(), results, device)
