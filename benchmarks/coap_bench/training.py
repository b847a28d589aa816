"""One optimizer's training run, shared by ``coap-bench llama``, ``coap-bench ddpm`` and the
distributed llama job.

:class:`TrainingLoop` does what every run does around its model: the learning-rate schedule
(:func:`lr_lambda`: linear warm-up, then cosine decay), the timed step
(:func:`~coap_bench.timing.timed_step`), the Eq. 2 probe, the loss and time logs, the
progress bar, periodic checkpoints and the resume from them, and the measurements of the result
row (:meth:`TrainingLoop.measurements`, :func:`result_row`). A benchmark hands it the model, the
optimizer, the batch stream and ``compute_loss(batch)``; what is its own (held-out evaluations
during training, collectives counted on one step) goes in a subclass's hooks
(:meth:`~TrainingLoop.before_steps`, :meth:`~TrainingLoop.step_context`,
:meth:`~TrainingLoop.loss_value`, :meth:`~TrainingLoop.after_step`).

Checkpoints go through a *store* with ``load(loop)`` and ``save(loop, step)``:
:class:`FileCheckpoint` (one ``torch.save`` file, written atomically) in one process; the
distributed job has one on ``torch.distributed.checkpoint``. Each saves the model, the optimizer
and :meth:`TrainingLoop.state_dict` (scheduler, batch stream, RNG, logs), so that a resumed run
ends with the numbers of one that never stopped; :func:`run_fingerprint` is what must match for a
checkpoint to be continued.

Around the runs: :func:`run_optimizers` trains once per optimizer (or per method of a job's own
``specs``), per lr of a sweep (the best kept by :func:`best_of_sweep`) and per seed (the job's scores
averaged by :func:`average_seeds`). :class:`HeldoutLoop` adds held-out evaluations during training;
:func:`heldout_mean`, :func:`sample_in_chunks` and :func:`timed_sampling` are the evaluation and sampling
steps the image jobs share; :func:`job_settings` and :func:`job_run` assemble a job's result. The tables
and plots are :mod:`coap_bench.report`'s (its :func:`~coap_bench.report.measurement_columns`,
:func:`~coap_bench.report.result_remarks`, ... are re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch.utils import optimizer_state_nbytes

from ._deps import require
from ._quiet import gather_import_notes
from .environment import current_rss_bytes, hardware, peak_memory, torch_threads, versions
from .optimizers import OPTIMIZERS
from .probes import Eq2Probe, refresh_time
from .report import measurement_columns, percent, plot_heldout_vs_state, result_remarks, seed_label
from .runner import (
    atomic_save,
    check_checkpoint_archive,
    compare_to_baseline,
    load_checkpoint,
    rng_state,
    run_guarded,
    set_rng_state,
)
from .text import remove_stale_temporaries
from .timing import timed_step

__all__ = [
    "FINAL_LOSS_WINDOW",
    "FINAL_LR_FRACTION",
    "LR_SWEEP_FACTORS",
    "SEED_AVERAGED",
    "FileCheckpoint",
    "HeldoutLoop",
    "TrainingLoop",
    "average_seeds",
    "best_of_sweep",
    "eval_mode",
    "heldout_mean",
    "in_torch_threads",
    "job_run",
    "job_settings",
    "lr_lambda",
    "measurement_columns",
    "percent",
    "plot_heldout_vs_state",
    "result_remarks",
    "result_row",
    "run_fingerprint",
    "run_label",
    "run_optimizers",
    "run_recording_warnings",
    "run_stem",
    "sample_in_chunks",
    "seed_label",
    "start_measuring",
    "sweep_lrs",
    "timed_sampling",
]

#: The cosine decay ends at this share of the peak learning rate.
FINAL_LR_FRACTION = 0.1
#: Number of last batch losses averaged into ``final_loss``.
FINAL_LOSS_WINDOW = 10
#: ``--lr-sweep`` runs each optimizer at its peak learning rate times these factors.
LR_SWEEP_FACTORS = (0.5, 1.0, 2.0)

#: The order of the keys of a result row (keys not listed follow, in the order given).
_RESULT_KEYS = (
    "name",
    "optimizer",
    "family",
    "lr",
    "failed",
    "per_layer",
    "state_bytes",
    "state_bytes_by_kind",
    "projected",
    "peak_memory_bytes",
    "peak_memory_kind",
    "rss_before_model_bytes",
    "iteration_ms",
    "step_ms",
    "tokens_per_s",
    "images_per_s",
    "refresh",
    "p_step_rel_change",
    "p_step_rel_changes",
    "final_loss",
    "last_batch_loss",
    "heldout_loss",
    "heldout_perplexity",
    "heldout_curve",
    "classifier_frechet_distance",
    "fid",
    "samples",
    "sampling_seconds",
    "sample_grid",
    "first_nonfinite_step",
    "steps_done",
    "completed",
    "resumed_from_step",
    "workarounds",
    "warnings",
    "wall_seconds",
    "process_id",
    "loss_curve",
)
_RESULT_ORDER = {key: index for index, key in enumerate(_RESULT_KEYS)}


def lr_lambda(steps: int, warmup_steps: int, final_fraction: float = FINAL_LR_FRACTION):
    """Multiplier of the peak lr after ``step`` scheduler steps: linear warm-up, then cosine to ``final_fraction``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def start_measuring(device: torch.device) -> int:
    """Reset the CUDA peak-memory counters (on a GPU) and return the process's RSS: call before building the model."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return current_rss_bytes()


class TrainingLoop:
    """The steps of one optimizer's run, with its logs, checkpoints and measurements.

    ``config`` gives ``steps``, ``warmup_steps``, ``checkpoint_every``, ``stop_after`` and
    ``progress`` (the fields of :class:`~coap_bench.llama.LlamaConfig` and
    :class:`~coap_bench.ddpm.DdpmConfig`). Each step draws ``next_batch()`` (default
    ``batches.next()``), runs :func:`~coap_bench.timing.timed_step` on
    ``compute_loss(batch)`` between the probe's calls, steps the scheduler (a ``LambdaLR`` of
    :func:`lr_lambda`, built here) and logs the loss and times. ``logs`` are further lists a
    subclass appends to; they are saved with the checkpoint under their keys and restored in place.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Any,
        compute_loss: Callable[[Any], Tensor],
        *,
        config: Any,
        device: torch.device,
        label: str,
        next_batch: Callable[[], Any] | None = None,
        logs: dict[str, list[Any]] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.compute_loss = compute_loss
        self.next_batch = next_batch or batches.next
        self.device = device
        self.label = label
        self.steps = config.steps
        self.checkpoint_every = config.checkpoint_every
        self.stop_after = config.stop_after
        self.progress = config.progress and show_progress
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.steps, config.warmup_steps))
        self.probe = Eq2Probe(optimizer, {param: pname for pname, param in model.named_parameters()})
        self.losses: list[float] = []
        self.iteration_s: list[float] = []
        self.step_s: list[float] = []
        self.logs: dict[str, list[Any]] = dict(logs or {})
        self.checkpoint: Any = None
        self.start_step = 0
        self.wall_seconds = 0.0
        self.peak: tuple[int | None, str] = (None, "")

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self, step: int) -> dict[str, Any]:
        """All a checkpoint holds beside the model and the optimizer, after ``step`` steps."""
        return {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(self.device),
            "losses": self.losses,
            "iteration_s": self.iteration_s,
            "step_s": self.step_s,
            **self.logs,
            "eq2_changes": self.probe.changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the model and the optimizer are the store's to load)."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"], self.device)
        self.start_step = int(state["step"])
        for log, key in (
            (self.losses, "losses"),
            (self.iteration_s, "iteration_s"),
            (self.step_s, "step_s"),
            *((log, key) for key, log in self.logs.items()),
        ):
            log[:] = state[key]
        self.probe.changes = list(state["eq2_changes"])

    def resume(self, checkpoint: Any) -> None:
        """Save to ``checkpoint`` (a store, or ``None`` for no checkpoints) and continue from what it holds."""
        self.checkpoint = checkpoint
        if checkpoint is not None:
            checkpoint.load(self)

    # ----------------------------------------------------------------------------- hooks

    def before_steps(self) -> None:
        """Called once before the first step of :meth:`run` (inside the timed region)."""

    def step_context(self, step: int) -> AbstractContextManager[Any]:
        """A context manager around the timed step ``step``."""
        return contextlib.nullcontext()

    def loss_value(self, loss: Tensor) -> float:
        """The logged value of a step's ``loss``."""
        return loss.item()

    def after_step(self, step: int) -> None:
        """Called after step ``step`` is logged, before its checkpoint is saved."""

    # ----------------------------------------------------------------------------- running

    def run(self) -> None:
        """Train from :attr:`start_step` to ``steps`` (or ``stop_after`` steps), checkpointing as configured.

        Sets :attr:`wall_seconds` and :attr:`peak` (``peak_memory`` right after the last step).
        """
        tqdm = require("tqdm").tqdm
        end_step = self.steps if self.stop_after is None else min(self.steps, self.start_step + self.stop_after)
        started = time.perf_counter()
        with tqdm(
            total=self.steps,
            initial=self.start_step,
            desc=self.label,
            file=sys.stderr,
            disable=not self.progress,
            unit="step",
        ) as bar:
            self.before_steps()
            for step in range(self.start_step + 1, end_step + 1):
                batch = self.next_batch()
                self.probe.before_step()
                with self.step_context(step):
                    loss, iteration, step_time = timed_step(
                        lambda batch=batch: self.compute_loss(batch), self.optimizer, self.device
                    )
                self.probe.after_step(step)
                self.scheduler.step()
                self.iteration_s.append(iteration)
                self.step_s.append(step_time)
                self.losses.append(self.loss_value(loss))
                self.after_step(step)
                if self.checkpoint is not None and (step % self.checkpoint_every == 0 or step == self.steps):
                    self.checkpoint.save(self, step)
                bar.update(1)
                if step % 10 == 0 or step == end_step:
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
        self.wall_seconds = time.perf_counter() - started
        self.peak = peak_memory(self.device)

    def measurements(self, spec: Any, settings: Any, *, items_per_step: int, throughput: str) -> dict[str, Any]:
        """The result-row figures of the run: state, peak, medians of the times (and ``throughput``, items
        per second of ``items_per_step``), refreshes, Eq. 2 changes, losses, progress and the loss curve."""
        iteration_ms = statistics.median(self.iteration_s) * 1e3 if self.iteration_s else None
        tail = self.losses[-FINAL_LOSS_WINDOW:]
        return {
            "state_bytes": optimizer_state_nbytes(self.optimizer),
            "peak_memory_bytes": self.peak[0],
            "peak_memory_kind": self.peak[1],
            "iteration_ms": iteration_ms,
            "step_ms": statistics.median(self.step_s) * 1e3 if self.step_s else None,
            throughput: items_per_step / (iteration_ms / 1e3) if iteration_ms else None,
            "refresh": refresh_time(self.step_s, lambda i: spec.refreshes_at(i, settings)),
            "p_step_rel_change": self.probe.median(),
            "p_step_rel_changes": self.probe.changes,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "last_batch_loss": self.losses[-1] if self.losses else None,
            "first_nonfinite_step": next((i for i, v in enumerate(self.losses, start=1) if not math.isfinite(v)), None),
            "steps_done": len(self.losses),
            "completed": len(self.losses) == self.steps,
            "resumed_from_step": self.start_step or None,
            "wall_seconds": self.wall_seconds,
            "process_id": os.getpid(),
            "loss_curve": self.losses,
        }


def result_row(name: str, spec: Any, lr: float, **fields: Any) -> dict[str, Any]:
    """A finished run's result: name, optimizer description, family, lr, then ``fields``, keys in one order."""
    row = {"name": name, "optimizer": spec.description, "family": spec.family, "lr": lr, "failed": False, **fields}
    return dict(sorted(row.items(), key=lambda item: _RESULT_ORDER.get(item[0], len(_RESULT_ORDER))))


def run_fingerprint(name: str, lr: float, config: Any, low_rank: Any = None, **more: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: the optimizer, its lr, the options that shape the
    run (preset, steps, batch size, recipe and its settings, warm-up, seed), and ``more``. The settings are
    ``low_rank`` where a job gives each optimizer its own, else ``config.settings()``.

    A float32 ``state_dtype`` (the default) is left out, so that checkpoints written before the option
    existed still continue."""
    settings = dataclasses.asdict(config.settings() if low_rank is None else low_rank)
    if settings.get("state_dtype") == "float32":
        del settings["state_dtype"]
    return {
        "optimizer": name,
        "lr": lr,
        "preset": config.preset,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "recipe": config.recipe,
        "settings": settings,
        "warmup_steps": config.warmup_steps,
        "seed": config.seed,
        **more,
    }


class FileCheckpoint:
    """A run's checkpoint in one file: ``torch.save`` through :func:`~coap_bench.runner.atomic_save`.

    Loading allowlists the classes ``spec`` keeps in its optimizer state, and refuses a checkpoint
    of another format or ``fingerprint`` (:func:`~coap_bench.runner.load_checkpoint`).
    """

    def __init__(self, path: Path, spec: Any, fingerprint: dict[str, Any], checkpoint_format: int) -> None:
        self.path = path
        self.spec = spec
        self.fingerprint = fingerprint
        self.format = checkpoint_format

    def load(self, loop: TrainingLoop) -> None:
        saved = load_checkpoint(self.path, self.spec, self.fingerprint, self.format, loop.device)
        if saved is None:
            return
        loop.model.load_state_dict(saved["model"])
        loop.optimizer.load_state_dict(saved["optimizer"])
        loop.load_state_dict(saved)

    def save(self, loop: TrainingLoop, step: int) -> None:
        atomic_save(
            {
                "format": self.format,
                "fingerprint": self.fingerprint,
                "model": loop.model.state_dict(),
                "optimizer": loop.optimizer.state_dict(),
                **loop.state_dict(step),
            },
            self.path,
        )


def best_of_sweep(runs: list[dict[str, Any]], sweep: bool, keys: tuple[str, ...]) -> dict[str, Any]:
    """The run with the lowest finite held-out loss (a failed result if none finished).

    With ``sweep``, the ``keys`` of every run are listed in ``lr_sweep``, and ``lr_at_sweep_edge``
    flags a best lr at the smallest or largest swept value: the optimum may lie outside the sweep,
    and the comparison is then only as fair as the sweep is wide.
    """
    finished = [r for r in runs if not r.get("failed") and math.isfinite(r["heldout_loss"])]
    if finished:
        best = dict(min(finished, key=lambda r: r["heldout_loss"]))
    else:
        failed = [r for r in runs if r.get("failed")]
        best = dict(failed[0]) if failed else dict(runs[0])
    if sweep:
        best["lr_sweep"] = [{key: r.get(key) for key in keys} for r in runs]
        lrs = [r["lr"] for r in runs]
        best["lr_at_sweep_edge"] = not best.get("failed") and best["lr"] in (min(lrs), max(lrs))
    return best


def sweep_lrs(config: Any, name: str) -> list[float]:
    """The peak lrs optimizer ``name`` trains at: ``config.lr_for(name)``, times :data:`LR_SWEEP_FACTORS`
    with ``config.lr_sweep``."""
    base = config.lr_for(name)
    return [base * factor for factor in LR_SWEEP_FACTORS] if config.lr_sweep else [base]


def run_stem(name: str, lr: float, sweep: bool, seed: int | None = None) -> str:
    """The name of a run's checkpoint and files: the optimizer's, with the lr in a sweep and the
    seed when several are run."""
    stem = name if not sweep else f"{name}-lr{lr:g}"
    return stem if seed is None else f"{stem}-seed{seed}"


#: The result keys that ``--seeds N`` replaces by their mean over the seeds (each also listed per
#: seed, with its standard deviation); the other measurements are the first seed's. A job averages
#: its own scores too by naming them in ``also_averaged`` of :func:`run_optimizers`.
SEED_AVERAGED = ("heldout_loss", "final_loss", "classifier_frechet_distance", "fid")


def average_seeds(runs: list[dict[str, Any]], keys: Sequence[str] = SEED_AVERAGED) -> dict[str, Any]:
    """One result for the runs of one optimizer and lr under several seeds (in seed order).

    The first seed's row, with each of ``keys`` replaced by its mean and listed as ``<key>_per_seed``
    with ``<key>_std`` (a key some run lacks is left as it is); a failed run makes the result failed.
    A single run is returned as it is.
    """
    if len(runs) == 1:
        return runs[0]
    seeds = [run["seed"] for run in runs]
    failed = next((run for run in runs if run.get("failed")), None)
    if failed is not None:
        return {**failed, "seeds": seeds}
    row = dict(runs[0])
    row["seeds"] = seeds
    for key in keys:
        values = [run.get(key) for run in runs]
        if any(value is None for value in values):
            continue
        row[key] = statistics.fmean(values)
        row[f"{key}_per_seed"] = values
        row[f"{key}_std"] = statistics.stdev(values) if all(map(math.isfinite, values)) else float("nan")
    if "heldout_perplexity" in row:
        row["heldout_perplexity"] = math.exp(row["heldout_loss"]) if row["heldout_loss"] < 700 else float("inf")
    return row


def _checkpoints(config: Any, seeds: list[int]) -> dict[tuple[str, float, int], Path | None]:
    """The checkpoint of every run, by (optimizer, lr, seed): ``<checkpoint_dir>/<stem>.pt``, or ``None``.

    Before any run trains, the temporary files a killed save left are removed, and a checkpoint that is
    not a complete archive raises :class:`~coap_bench.runner.CheckpointError`.
    """
    folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
    checkpoints = {}
    for name in config.optimizers:
        for lr in sweep_lrs(config, name):
            for seed in seeds:
                stem = run_stem(name, lr, config.lr_sweep, seed if len(seeds) > 1 else None)
                checkpoint = folder / f"{stem}.pt" if folder is not None else None
                checkpoints[name, lr, seed] = checkpoint
                if checkpoint is not None:
                    remove_stale_temporaries(checkpoint)
                    check_checkpoint_archive(checkpoint)
    return checkpoints


def run_optimizers(
    config: Any,
    train: Callable[..., dict[str, Any]],
    args: tuple[Any, ...],
    sweep_keys: tuple[str, ...],
    *,
    specs: Mapping[str, Any] = OPTIMIZERS,
    also_averaged: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Each optimizer's result: ``train(name, lr, *args, checkpoint)`` for every lr of :func:`sweep_lrs`
    and every seed, through :func:`~coap_bench.runner.run_guarded` (a fresh process each with
    ``config.isolate``; a run that raises is a failed result naming the package to install, but a
    checkpoint that cannot be loaded stops the comparison); the seeds of one lr averaged
    (:func:`average_seeds`), the best lr of a sweep kept (:func:`best_of_sweep`), then the ratios to
    AdamW added.

    ``specs`` describes the names of ``config.optimizers`` (their ``package``): the registry's
    optimizers, or a job's own methods beside them (the fine-tuning job's LoRA). The seeds average
    :data:`SEED_AVERAGED` and the job's own scores ``also_averaged`` (the ControlNet job's edge scores).

    With ``config.seeds`` > 1 the runs use seeds ``config.seed``, ``config.seed + 1``, ...: ``config``
    is replaced in ``args`` by a copy with that seed. ``checkpoint`` is ``<checkpoint_dir>/<stem>.pt``
    (:func:`run_stem`), or ``None`` without ``checkpoint_dir``; checked, and cleaned of the temporary
    files of a killed save, before the first run starts.
    """
    count = getattr(config, "seeds", 1)
    seeds = [config.seed + k for k in range(count)]
    averaged = (*SEED_AVERAGED, *also_averaged)
    checkpoints = _checkpoints(config, seeds)
    results = []
    for name in config.optimizers:
        runs = []
        for lr in sweep_lrs(config, name):
            seed_runs = []
            for seed in seeds:
                seeded = config if seed == config.seed else dataclasses.replace(config, seed=seed)
                run_args = tuple(seeded if arg is config else arg for arg in args)
                checkpoint = checkpoints[name, lr, seed]
                result = run_guarded(train, (name, lr, *run_args, checkpoint), name=name, lr=lr, isolate=config.isolate)
                if result.get("failed") and specs[name].package:
                    result["package"] = specs[name].package
                result["seed"] = seed
                seed_runs.append(result)
            runs.append(average_seeds(seed_runs, averaged))
        results.append(best_of_sweep(runs, config.lr_sweep, sweep_keys))
    compare_to_baseline(results)
    return results


# ------------------------------------------------------------------------------------------ a job's runs


def in_torch_threads(train: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``train(name, lr, config, ...)`` under :func:`~coap_bench.environment.torch_threads` of
    ``config.threads``: a run in a process of its own starts with the library's thread count."""

    @functools.wraps(train)
    def run(name: str, lr: float, config: Any, *args: Any) -> dict[str, Any]:
        with torch_threads(config.threads):
            return train(name, lr, config, *args)

    return run


def run_label(name: str, lr: float, sweep: bool) -> str:
    """How the progress bar names a run: the optimizer, with its lr in a sweep."""
    return name if not sweep else f"{name} lr={lr:g}"


def run_recording_warnings(loop: TrainingLoop) -> list[str]:
    """``loop.run()``; the distinct warnings it raised, ``"Category: message"`` each, in the order first raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        loop.run()
    return list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip()}" for w in caught))


class HeldoutLoop(TrainingLoop):
    """A training loop with held-out evaluations before and during training (every ``config.eval_every``
    steps, none at the last: the job scores the trained model itself), logged in ``heldout_curve`` and kept
    in checkpoints. ``evaluate()`` is the held-out loss of the model as it is.

    It cooperates with other subclasses of :class:`TrainingLoop` (the distributed DDPM job's loop is this
    and :class:`~coap_bench.distributed.DistributedLoop`)."""

    def __init__(self, *args: Any, evaluate: Callable[[], Any], config: Any, **kwargs: Any) -> None:
        super().__init__(*args, config=config, logs={"heldout_curve": []}, **kwargs)
        self._evaluate, self.eval_every = evaluate, config.eval_every

    def evaluate(self, step: int) -> Any:
        """The held-out loss after ``step`` steps, logged."""
        loss = self._evaluate()
        self.logs["heldout_curve"].append({"step": step, "loss": loss})
        return loss

    def before_steps(self) -> None:
        super().before_steps()
        if self.eval_every and self.start_step == 0:
            self.evaluate(0)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.eval_every and step % self.eval_every == 0 and step != self.steps:
            self.evaluate(step)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode, put back in the mode it was in on leaving."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def heldout_mean(
    module: nn.Module, count: int, batch_size: int, summed_loss: Callable[[slice], Tensor], numel: int
) -> float:
    """The sum of ``summed_loss(chunk)`` over the chunks of ``batch_size`` of ``count`` items, over ``numel``:
    a held-out loss per value, with ``module`` in eval mode."""
    total = 0.0
    with eval_mode(module):
        for start in range(0, count, batch_size):
            total += summed_loss(slice(start, start + batch_size)).item()
    return total / numel


@torch.no_grad()
def sample_in_chunks(module: nn.Module, count: int, batch_size: int, sample: Callable[[slice], Tensor]) -> Tensor:
    """``count`` samples (CPU, clamped to ``[-1, 1]``), ``sample(chunk)`` drawing those of each chunk of
    ``batch_size`` in turn, with ``module`` in eval mode."""
    with eval_mode(module):
        chunks = [
            sample(slice(start, min(start + batch_size, count))).float().clamp(-1, 1).cpu()
            for start in range(0, count, batch_size)
        ]
    return torch.cat(chunks)


def timed_sampling(config: Any, label: str, count: int, sample: Callable[[Any], Tensor]) -> tuple[Tensor, float]:
    """``sample(bar)`` and its seconds: ``count`` samples drawn in chunks of ``config.eval_batch_size``, each
    ``config.sample_steps`` steps, under a progress bar (``config.progress``) the sampler advances per step."""
    tqdm = require("tqdm").tqdm
    started = time.perf_counter()
    chunks = math.ceil(count / config.eval_batch_size)
    with tqdm(
        total=chunks * config.sample_steps,
        desc=f"{label} sampling",
        file=sys.stderr,
        leave=False,
        disable=not config.progress,
        unit="step",
    ) as bar:
        samples = sample(bar)
    return samples, time.perf_counter() - started


def job_settings(config: Any, low_rank: Any, **details: Any) -> dict[str, Any]:
    """The ``config`` part of a job's result: the options, ``low_rank`` (the settings the optimizers got),
    the lr of each optimizer, the job's ``details``, and the sweep, schedule and thread figures."""
    settings = dataclasses.asdict(config)
    settings.update(
        optimizers=list(config.optimizers),
        low_rank=low_rank,
        lrs={name: config.lr_for(name) for name in config.optimizers},
        **details,
        lr_sweep_factors=list(LR_SWEEP_FACTORS) if config.lr_sweep else None,
        final_lr_fraction=FINAL_LR_FRACTION,
        torch_threads=torch.get_num_threads(),
    )
    return settings


def job_run(
    config: Any, settings: dict[str, Any], data: dict[str, Any], results: list[dict[str, Any]], device: Any = None
) -> dict[str, Any]:
    """A job's result: ``{"config", "data", "versions", "hardware", "argv", "results", "import_notes"}``
    (``hardware`` of ``device``, by default ``config.device``)."""
    return {
        "config": settings,
        "data": data,
        "versions": versions(),
        "hardware": hardware(config.device if device is None else device),
        "argv": list(config.argv),
        "results": results,
        "import_notes": gather_import_notes(results),
    }
