"""Training and scoring one SiT run per optimizer (:func:`run_sit`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coap_torch.utils import state_nbytes_by_kind

from ..ddpm.model import projection_summary
from ..environment import torch_threads
from ..frechet import FrechetScorer, frechet_scorer
from ..images import ImageData, load_image_data, save_sample_grid
from ..optimizers import OPTIMIZERS, build_optimizer
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
from .data import HeldoutSet, SitBatches, heldout_set, to_channels
from .model import build_sit, count_parameters
from .presets import SIT_PRESETS, SitConfig
from .transport import evaluate_heldout, generate_samples, sample_labels, velocity_loss

__all__ = ["SitInputs", "load_inputs", "run_sit", "sample_class_accuracy", "train_one"]

#: Rows of the PNG sample grid of each run; its columns are the classes (up to :data:`GRID_COLUMNS`).
GRID_ROWS = 8
GRID_COLUMNS = 10
#: Offsets between ``seed`` and the seeds of the batch stream and of the sampling noise.
_BATCH_STREAM = 2**32
_SAMPLE_STREAM = 2 * 2**32
_CHECKPOINT_FORMAT = 1
#: How the low-rank optimizers' warning names a parameter whose first gradient is all zero.


@dataclasses.dataclass
class SitInputs:
    """What the runs of a SiT job share: the images (in the model's channels), the held-out set, the scorer."""

    data: ImageData
    heldout: HeldoutSet
    scorer: FrechetScorer


def load_inputs(config: SitConfig) -> SitInputs:
    """The images of ``config`` (the digits, or ``image_dir``), the held-out set in the model's channels and
    the Frechet scorer (a feature classifier trained here on the training images)."""
    preset = SIT_PRESETS[config.preset]
    data = load_image_data(
        preset.resolution,
        preset.image_channels or preset.channels,
        image_dir=config.image_dir,
        max_images=config.max_images,
    )
    if config.batch_size > len(data.train):
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} training images")
    if data.num_classes > preset.num_classes:
        raise ValueError(f"the data has {data.num_classes} classes, the {config.preset} preset {preset.num_classes}")
    scorer = frechet_scorer(data, samples=config.samples, seed=config.seed, steps=config.classifier_steps)
    heldout = heldout_set(to_channels(data.heldout, preset.channels), data.heldout_labels, config.heldout_repeats)
    return SitInputs(data, heldout, scorer)


def _fingerprint(name: str, lr: float, config: SitConfig, data: ImageData) -> dict[str, Any]:
    """What must match for a checkpoint to be continued (with this optimizer's own low-rank settings)."""
    return run_fingerprint(
        name,
        lr,
        config,
        config.settings(name),
        train_sha256=data.describe()["train_sha256"],
        cfg_scale=config.cfg_scale,
    )


@in_torch_threads
def train_one(name: str, lr: float, config: SitConfig, inputs: SitInputs, checkpoint: Path | None) -> dict[str, Any]:
    """Train a fresh SiT (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``, then score it."""
    spec = OPTIMIZERS[name]
    settings = config.settings(name)
    preset = SIT_PRESETS[config.preset]
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    model = build_sit(preset, seed=config.seed, device=device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(name, trainable, [], lr, settings)
    batches = SitBatches(
        to_channels(inputs.data.train, preset.channels),
        inputs.data.train_labels,
        config.batch_size,
        seed=config.seed + _BATCH_STREAM,
        class_dropout=preset.class_dropout,
        null_class=preset.num_classes,
    )
    label = run_label(name, lr, config.lr_sweep)
    loop = HeldoutLoop(
        model,
        optimizer,
        batches,
        lambda batch: velocity_loss(model, batch.x, batch.labels, batch.noise, batch.t),
        evaluate=lambda: evaluate_heldout(model, inputs.heldout, config.eval_batch_size),
        config=config,
        device=device,
        label=label,
        next_batch=lambda: batches.next().to(device),
    )
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        loop.resume(FileCheckpoint(checkpoint, spec, _fingerprint(name, lr, config, inputs.data), _CHECKPOINT_FORMAT))
    messages = run_recording_warnings(loop)
    heldout_loss = loop.evaluate(len(loop.losses))
    scores = score_samples(model, name, lr, config, inputs, label)
    return result_row(
        name,
        spec,
        lr,
        **loop.measurements(spec, settings, items_per_step=config.batch_size, throughput="images_per_s"),
        state_bytes_by_kind=state_nbytes_by_kind(optimizer),
        projected=projection_summary(optimizer, spec.family),
        low_rank=dataclasses.asdict(settings) if spec.family != "dense" else None,
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        heldout_loss=heldout_loss,
        heldout_curve=loop.logs["heldout_curve"] if config.eval_every else [],
        **scores,
        workarounds=workarounds,
        warnings=messages[:5],
    )


@torch.no_grad()
def sample_class_accuracy(scorer: FrechetScorer, samples: Tensor, labels: Tensor, chunk: int = 1024) -> float:
    """The share of ``samples`` that the scorer's feature classifier puts in the class they were generated for."""
    classifier = scorer.classifier
    was_training = classifier.training
    classifier.eval()
    samples = samples.detach().cpu().float()
    predicted = torch.cat([classifier(samples[i : i + chunk]).argmax(dim=1) for i in range(0, len(samples), chunk)])
    classifier.train(was_training)
    return float((predicted == labels.cpu()).float().mean())


def score_samples(
    model: torch.nn.Module, name: str, lr: float, config: SitConfig, inputs: SitInputs, label: str
) -> dict[str, Any]:
    """The sample-quality figures of a trained ``model``: ``config.samples`` class-conditional images (balanced
    classes, seeded noise), their classifier Frechet distance to the held-out images, the share the classifier
    assigns to their class, and the PNG grid of the first of them (one column per class, with ``config.plots``)."""
    data = inputs.data
    labels = sample_labels(config.samples, data.num_classes)
    samples, sampling_seconds = timed_sampling(
        config,
        label,
        config.samples,
        lambda bar: generate_samples(
            model,
            labels,
            sampler=config.sampler,
            steps=config.sample_steps,
            seed=config.seed + _SAMPLE_STREAM,
            batch_size=config.eval_batch_size,
            cfg_scale=config.cfg_scale,
            progress=bar,
        ),
    )
    images = samples[:, : data.channels]  # the image channels of a latent stand-in
    finite = bool(torch.isfinite(images).all())
    frechet = inputs.scorer.score(images) if finite else float("nan")
    accuracy = sample_class_accuracy(inputs.scorer, images, labels) if finite else float("nan")
    grid = None
    if config.plots:
        columns = min(GRID_COLUMNS, data.num_classes)
        grid = save_sample_grid(
            images[: GRID_ROWS * columns],
            Path(config.plots) / f"sit_samples_{run_stem(name, lr, config.lr_sweep)}.png",
            columns=columns,
        )
    return {
        "classifier_frechet_distance": frechet,
        "sample_class_accuracy": accuracy,
        "samples": config.samples,
        "sampling_seconds": sampling_seconds,
        "sample_grid": str(grid) if grid is not None else None,
    }


#: Result keys averaged over ``--seeds`` beyond :data:`~coap_bench.training.SEED_AVERAGED`.
_SEED_AVERAGED = ("sample_class_accuracy",)
#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = (
    "lr",
    "heldout_loss",
    "final_loss",
    "classifier_frechet_distance",
    "sample_class_accuracy",
    "first_nonfinite_step",
    "error",
)


def run_sit(config: SitConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config``; return ``{"config", "data", "versions", "hardware", "argv", "results"}``.

    With ``lr_sweep``, each optimizer runs at its lr times :data:`~coap_bench.training.LR_SWEEP_FACTORS` and
    the run with the lowest held-out loss is kept; with ``seeds`` > 1, each lr is trained once per seed and
    the held-out loss, clf-FD and class accuracy averaged. A run that raises (or whose process dies) is a
    result with ``failed: True`` and its ``error``; ratios to AdamW are added when ``adamw`` ran.
    """
    config = config.resolved()
    if config.memory_only():
        from .state import run_sit_memory

        return run_sit_memory(config)
    with torch_threads(config.threads):
        return _run_sit(config)


def _run_sit(config: SitConfig) -> dict[str, Any]:
    inputs = load_inputs(config)
    results = run_optimizers(config, train_one, (config, inputs), _SWEEP_KEYS, also_averaged=_SEED_AVERAGED)
    ratio_to_baseline(results, "classifier_frechet_distance")
    preset = SIT_PRESETS[config.preset]
    settings = job_settings(
        config,
        {name: dataclasses.asdict(config.settings(name)) for name in config.optimizers},
        model=preset.model_config(),
        parameters=count_parameters(preset),
        objective="linear interpolant x_t = (1 - t) x + t eps, velocity eps - x, MSE; t ~ U[0, 1]",
        heldout_evaluations=len(inputs.heldout),
    )
    settings.update(frechet=inputs.scorer.info, memory_only=False)
    return job_run(config, settings, inputs.data.describe(), results)
