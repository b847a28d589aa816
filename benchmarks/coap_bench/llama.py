"""The LLaMA pre-training benchmark: one LLaMA model trained once per optimizer on the same tokens.

Every optimizer gets the same initial weights (:func:`~coap_bench.llama_model.build_llama`
with ``seed``), the same batches (:class:`~coap_bench.text.TokenBatches` with ``seed``) and
the same learning-rate schedule (linear warm-up, then cosine decay to 10% of the peak). Each run is
scored on the fixed held-out windows of :func:`~coap_bench.text.heldout_windows`.

Recipes (:func:`recipe_settings`):

* ``paper``: the pre-training recipe of the GaLore and COAP LLaMA scripts. The attention and MLP
  matrices are projected, embeddings, ``lm_head`` and norms are trained densely; the rank is the
  papers' rank for the preset (a quarter of the hidden size, :data:`PAPER_RANKS`), COAP's
  ``T_u`` / lambda are those of its LLaMA-1B run (40 / 5; 100 / 1 for 7B), GaLore's and APOLLO's
  ``update_proj_gap`` is 200, the update scale of projected weights is 0.25, and low-rank methods
  train at lr 1e-2 (5e-3 for 7B) where the dense optimizers train at 1e-3.
* ``drop-in``: every parameter in one group, the library defaults (rank ratio 2, ``T_u`` 32,
  lambda 5, scale ``"auto"``) and lr 1e-3 for everyone: the one-line swap of ``torch.optim.AdamW``.

GaLore and APOLLO get the same projected set and rank as COAP in both recipes.

On the CPU each run has a process of its own, so that its peak RSS is its own and a peer that
crashes becomes a *failed* row instead of ending the comparison. With ``checkpoint_dir``, a run
saves its model, optimizer, scheduler, RNG, batch stream, step and loss curve every
``checkpoint_every`` steps and continues from there when started again: on the CPU, a resumed run
ends with exactly the numbers of one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coap_torch.optim import LowRankOptimizer, enable_per_layer_updates

from . import report
from .config import RunConfig, check_choice, override_settings
from .llama_model import PRESETS, RECIPES, LlamaPreset, projected_parameter_groups
from .optimizers import OPTIMIZERS, LowRankSettings, build_optimizer
from .runner import checkpoint_workarounds
from .training import (
    FINAL_LOSS_WINDOW,
    LR_SWEEP_FACTORS,
    FileCheckpoint,
    TrainingLoop,
    best_of_sweep,
    heldout_mean,
    job_run,
    job_settings,
    lr_lambda,
    result_row,
    run_fingerprint,
    run_label,
    run_optimizers,
    start_measuring,
)

__all__ = [
    "DEFAULT_LLAMA_OPTIMIZERS",
    "LLAMA_PRESETS",
    "LR_SWEEP_FACTORS",
    "PAPER_RANKS",
    "LlamaConfig",
    "build_llama_run",
    "causal_lm_loop",
    "causal_lm_loss",
    "evaluate_heldout",
    "format_llama_table",
    "load_llama_data",
    "lr_lambda",
    "perplexity",
    "recipe_settings",
    "run_llama",
    "token_batches",
    "token_measurements",
    "train_causal_lm",
    "write_llama_plots",
]

#: Presets of ``coap-bench llama``: the model presets plus ``micro``, a very small one for smoke tests.
LLAMA_PRESETS: dict[str, LlamaPreset] = {
    **PRESETS,
    "micro": LlamaPreset(64, 172, 2, 2, 32, notes="smoke tests only: a few seconds on a CPU"),
}
#: What ``coap-bench llama`` compares by default: AdamW, COAP 32- and 8-bit, and GaLore at COAP's rank.
DEFAULT_LLAMA_OPTIMIZERS = ("adamw", "coap_adamw", "coap_adamw8bit", "galore_adamw")
#: Default batch size and the cap of the default sequence length, per preset (else the preset's own).
DEFAULT_BATCH_SIZE = {"micro": 8, "tiny": 16}
DEFAULT_SEQ_LEN_CAP = {"micro": 32, "tiny": 128}
#: The rank of the paper recipe: GaLore's LLaMA scripts (60M: 128, 130M and 350M: 256, 1B: 512,
#: 7B: 1024; COAP's Table 1 uses 512 and 1024 for 1B and 7B); a quarter of the hidden size for
#: the CPU presets.
PAPER_RANKS = {"micro": 16, "tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
#: COAP's (T_u, lambda) in its LLaMA runs (supplementary Table 1): 1B's for every preset up to 1B.
PAPER_COAP_SCHEDULE = {"7b": (100, 1)}
PAPER_COAP_SCHEDULE_DEFAULT = (40, 5)
#: Peak lr of the low-rank methods in the paper recipe (COAP Table 1, GaLore's scripts), and of the dense ones.
PAPER_LOW_RANK_LR = {"7b": 5e-3}
PAPER_LOW_RANK_LR_DEFAULT = 1e-2
PAPER_DENSE_LR = 1e-3
#: GaLore's ``scale`` (alpha) and ``update_proj_gap`` in its LLaMA scripts, used for every low-rank method.
PAPER_SCALE = 0.25
PAPER_PROJ_GAP = 200
#: The drop-in recipe: the library defaults and one lr for everyone.
DROP_IN_LR = 1e-3
DROP_IN_RANK_RATIO = 2.0
#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = ("lr", "heldout_loss", "final_loss", "first_nonfinite_step", "error")
#: Offset between the seed of the initial weights and the seed of the batch order.
_BATCH_STREAM = 2**32
_CHECKPOINT_FORMAT = 2


@dataclass
class LlamaConfig(RunConfig):
    """Options of one ``coap-bench llama`` run (the command-line flags, same names).

    Options left ``None`` take their defaults from the preset and recipe (see :meth:`resolved`
    and :func:`recipe_settings`); ``lr`` set applies to every optimizer. ``isolate`` (default: on
    the CPU) runs each optimizer in a fresh process. ``stop_after`` ends each optimizer's run after
    that many steps of this call (checkpointing as usual): it simulates an interrupted run.
    """

    presets = LLAMA_PRESETS
    preset_kind = "LLaMA"
    recipes = RECIPES

    preset: str = "tiny"
    steps: int = 400
    seq_len: int | None = None
    optimizers: tuple[str, ...] = DEFAULT_LLAMA_OPTIMIZERS
    correlation_normalize: bool = False
    projection_side: str | None = None
    data_dir: str | None = None
    c4: bool = False
    vocab_size: int = 4096
    max_documents: int | None = None
    max_heldout_windows: int | None = None
    #: ``"ddp"`` or ``"fsdp2"``: a ``torchrun`` job (see :mod:`coap_bench.llama_distributed`).
    distributed: str | None = None
    #: Update each parameter during backward (COAP optimizers; the others step as usual).
    per_layer: bool = False

    def job_defaults(self) -> dict[str, Any]:
        if self.c4 and self.data_dir:
            raise ValueError("c4 and data_dir are two different corpora: give one of them")
        preset = self.preset_spec
        default_seq = preset.seq_len if self.c4 else min(preset.seq_len, DEFAULT_SEQ_LEN_CAP.get(self.preset, 1 << 30))
        seq_len = self.seq_len or default_seq
        if seq_len > preset.seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds the {self.preset} preset's {preset.seq_len} positions")
        return {"batch_size": self.batch_size or DEFAULT_BATCH_SIZE.get(self.preset, 32), "seq_len": seq_len}

    def recipe_defaults(self) -> LowRankSettings:
        return recipe_settings(self.recipe, self.preset)

    def lr_for(self, name: str) -> float:
        """The peak lr of optimizer ``name``: ``lr`` if given, else the recipe's."""
        if self.lr is not None:
            return self.lr
        if self.recipe == "paper" and OPTIMIZERS[name].family != "dense":
            return PAPER_LOW_RANK_LR.get(self.preset, PAPER_LOW_RANK_LR_DEFAULT)
        return PAPER_DENSE_LR if self.recipe == "paper" else DROP_IN_LR


def recipe_settings(recipe: str, preset: str, **options: Any) -> LowRankSettings:
    """The low-rank settings of ``recipe`` for ``preset``; any option given (a field of
    :class:`~coap_bench.optimizers.LowRankSettings`) overrides the recipe.

    ``rank_ratio`` replaces the recipe's rank by ``min(m, n) // rank_ratio`` for every low-rank optimizer.
    """
    check_choice(recipe, RECIPES, "recipe")
    if recipe == "drop-in":
        base = LowRankSettings(rank_ratio=DROP_IN_RANK_RATIO, proj_gap=PAPER_PROJ_GAP, weight_decay=0.0)
    else:
        t_u, factor = PAPER_COAP_SCHEDULE.get(preset, PAPER_COAP_SCHEDULE_DEFAULT)
        rank = PAPER_RANKS.get(preset)
        base = LowRankSettings(
            rank=rank,
            rank_ratio=4.0 if rank is None else None,
            update_interval=t_u,
            reproject_factor=factor,
            scale=PAPER_SCALE,
            proj_gap=PAPER_PROJ_GAP,
            weight_decay=0.0,
        )
    return override_settings(base, **options)


def causal_lm_loss(model: nn.Module, batch: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of a causal LM on token rows ``batch`` (logits in float32)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1), reduction=reduction)


def evaluate_heldout(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean token cross-entropy of ``model`` on ``windows`` (``(n, seq_len + 1)``), in chunks of ``batch_size``."""
    device = next(model.parameters()).device
    return heldout_mean(
        model,
        windows.size(0),
        batch_size,
        lambda chunk: causal_lm_loss(model, windows[chunk].to(device), reduction="sum"),
        windows[:, 1:].numel(),
    )


def perplexity(heldout_loss: float | None) -> float | None:
    """``exp(heldout_loss)`` (infinite from a loss of 700 on; ``None`` for ``None``)."""
    if heldout_loss is None:
        return None
    return math.exp(heldout_loss) if heldout_loss < 700 else float("inf")


def load_llama_data(config: LlamaConfig) -> Any:
    """The tokenized corpus of ``config``: C4, a folder of text files, or Python's documentation."""
    from .text import load_token_data

    return load_token_data(
        source="c4" if config.c4 else None,
        data_dir=config.data_dir,
        vocab_size=config.vocab_size,
        max_documents=config.max_documents,
    )


def build_llama_run(
    name: str,
    lr: float,
    config: LlamaConfig,
    vocab_size: int,
    device: torch.device,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model of ``config`` (its initial weights drawn with ``config.seed``, in training mode, through
    ``wrap`` if given) and optimizer ``name`` at peak ``lr`` on the recipe's projected and dense parameters."""
    from .llama_model import build_llama

    model = build_llama(LLAMA_PRESETS[config.preset], vocab_size, seed=config.seed, device=device)
    model.train()
    if wrap is not None:
        model = wrap(model)
    split = projected_parameter_groups(model, config.recipe)
    optimizer = build_optimizer(
        name, [p for _, p in split.projected], [p for _, p in split.dense], lr, config.settings()
    )
    return model, optimizer


def token_batches(
    config: Any, tokens: Tensor, device: torch.device | None = None, batch_size: int | None = None
) -> Any:
    """The batch stream of a run of ``config``: ``batch_size`` (default ``config.batch_size``) windows of
    ``config.seq_len + 1`` tokens of ``tokens``, in an order drawn from ``config.seed``."""
    from .text import TokenBatches

    return TokenBatches(
        tokens, batch_size or config.batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM, device=device
    )


def causal_lm_loop(
    name: str,
    lr: float,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    device: torch.device,
    loop: type[TrainingLoop] = TrainingLoop,
    **options: Any,
) -> TrainingLoop:
    """A ``loop`` (with its ``options``) training ``model`` on the next-token loss of ``batches``, its
    progress bar named by :func:`~coap_bench.training.run_label`."""
    return loop(
        model,
        optimizer,
        batches,
        lambda batch: causal_lm_loss(model, batch),
        config=config,
        device=device,
        label=run_label(name, lr, config.lr_sweep),
        **options,
    )


def train_causal_lm(
    name: str,
    lr: float,
    config: Any,
    spec: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    checkpoint: Path | None,
    checkpoint_format: int,
    **fingerprint: Any,
) -> tuple[TrainingLoop, list[str]]:
    """Train ``model`` with ``optimizer`` (method ``spec``) on the batches of ``data.train`` (:func:`token_batches`)
    on ``config.device``, continuing ``checkpoint`` if it holds a run of the same :func:`_fingerprint` (with the
    further keys ``fingerprint``) and saving to it as configured; the loop, run, and the workarounds its
    checkpoints need."""
    device = torch.device(config.device)
    loop = causal_lm_loop(name, lr, config, model, optimizer, token_batches(config, data.train, device), device)
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        saved = _fingerprint(name, lr, config, data, **fingerprint)
        loop.resume(FileCheckpoint(checkpoint, spec, saved, checkpoint_format))
    loop.run()
    return loop, workarounds


def token_measurements(loop: TrainingLoop, spec: Any, config: Any, heldout_loss: float | None) -> dict[str, Any]:
    """The result-row figures of a causal LM run: :meth:`~coap_bench.training.TrainingLoop.measurements`
    in tokens per second, the held-out loss and its perplexity."""
    return {
        **loop.measurements(
            spec, config.settings(), items_per_step=config.batch_size * config.seq_len, throughput="tokens_per_s"
        ),
        "heldout_loss": heldout_loss,
        "heldout_perplexity": perplexity(heldout_loss),
    }


def _fingerprint(name: str, lr: float, config: Any, data: Any, **more: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be continued (with ``more``, a job's own keys)."""
    return run_fingerprint(name, lr, config, seq_len=config.seq_len, train_sha256=data.train_sha256, **more)


def train_one(
    name: str, lr: float, config: LlamaConfig, data: Any, windows: Tensor, checkpoint: Path | None
) -> dict[str, Any]:
    """Train a fresh model (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``."""
    spec = OPTIMIZERS[name]
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    model, optimizer = build_llama_run(name, lr, config, data.vocab_size, device)
    per_layer = config.per_layer and isinstance(optimizer, LowRankOptimizer)
    if per_layer:
        enable_per_layer_updates(optimizer)  # step() then finds nothing left to do
    loop, workarounds = train_causal_lm(name, lr, config, spec, model, optimizer, data, checkpoint, _CHECKPOINT_FORMAT)
    return result_row(
        name,
        spec,
        lr,
        per_layer=per_layer,
        **token_measurements(loop, spec, config, evaluate_heldout(model, windows, config.batch_size)),
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        workarounds=workarounds,
    )


def _best(runs: list[dict[str, Any]], sweep: bool) -> dict[str, Any]:
    """The run with the lowest finite held-out loss (a failed result if none finished), with the sweep listed."""
    return best_of_sweep(runs, sweep, _SWEEP_KEYS)


def run_settings(config: LlamaConfig, data: Any, windows: Tensor) -> dict[str, Any]:
    """The ``config`` part of a run's result: the options plus what they resolved to."""
    preset = LLAMA_PRESETS[config.preset]
    return job_settings(
        config,
        dataclasses.asdict(config.settings()),
        preset_shape={k: v for k, v in dataclasses.asdict(preset).items() if k != "notes"},
        parameters=preset.num_parameters(data.vocab_size),
        heldout_windows=int(windows.size(0)),
        tokens_per_step=config.batch_size * config.seq_len,
    )


def run_llama(config: LlamaConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config`` and return ``{"config", "data", "versions", "hardware", "argv", "results"}``.

    With ``lr_sweep``, each optimizer runs at its lr times :data:`LR_SWEEP_FACTORS` and the run
    with the lowest held-out loss is kept (all of them are listed in its ``lr_sweep``). A run that
    raises (or whose process dies) is a result with ``failed: True`` and its ``error``. Ratios to
    AdamW (``state_ratio_to_adamw``, ``iteration_ratio_to_adamw``, ...) are added when ``adamw`` ran.
    ``import_notes`` says what packages printed while the runs imported them.
    """
    from .text import heldout_windows

    config = config.resolved()
    data = load_llama_data(config)
    windows = heldout_windows(data, config.seq_len, config.max_heldout_windows)
    if config.batch_size * (config.seq_len + 1) > data.train.numel():
        raise ValueError(
            f"{data.train.numel()} training tokens are too few for batch {config.batch_size} x "
            f"{config.seq_len + 1}: lower --batch-size or --seq-len, or give more text (--data-dir)"
        )
    results = run_optimizers(config, train_one, (config, data, windows), _SWEEP_KEYS)
    return job_run(config, run_settings(config, data, windows), data.describe(), results)


_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step (refresh steps "
    "minus the median of the others); tok/s: batch tokens / median iteration; final loss: mean of the last "
    "{window} batch losses; held-out loss: mean token cross-entropy on the fixed held-out windows, "
    "ppl = exp(held-out loss)."
)

_HEADER = [*report.measurement_header("tok/s"), "ppl"]


def _columns(result: dict[str, Any]) -> list[str]:
    if result.get("failed"):
        return report.failed_columns(result, len(_HEADER))
    return [*report.measurement_columns(result, "tokens_per_s"), report._number(result["heldout_perplexity"], ".2f")]


def _side(low: dict[str, Any]) -> str:
    """``", P on the <side> side"`` when the run set COAP's ``projection_side``, else nothing."""
    side = low.get("projection_side")
    return f", P on the {side} side" if side else ""


def _state_dtype(low: dict[str, Any]) -> str:
    """``", state in bf16"`` when the run set COAP's ``state_dtype`` to bf16, else nothing."""
    return ", state in bf16" if low.get("state_dtype", "float32") != "float32" else ""


def _recipe_line(config: dict[str, Any]) -> str:
    low = config["low_rank"]
    rank = f"rank {low['rank']}" if low["rank"] is not None else f"rank min(m, n) // {low['rank_ratio']:g}"
    projected = "the attention and MLP matrices" if config["recipe"] == "paper" else "every matrix"
    lrs = ", ".join(f"{name} {lr:g}" for name, lr in config["lrs"].items())
    return (
        f"recipe {config['recipe']}: low-rank methods project {projected} at {rank} (COAP T_u "
        f"{low['update_interval']}, lambda {low['reproject_factor']}{_side(low)}{_state_dtype(low)}; GaLore/APOLLO update_proj_gap "
        f"{low['proj_gap']}; update scale {report.scale_text(low['scale'])}), weight decay {low['weight_decay']:g}; peak lr: {lrs}"
        + report.lr_sweep_text(config)
    )


def _sweep_edge_remark(result: dict[str, Any]) -> str:
    return report.sweep_edge_listing(result, " (try --lr)")


def format_llama_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    title = (
        f"llama {config['preset']}: {config['parameters']:,} parameters, vocab {data['vocab_size']} "
        f"({data['corpus']['name']}: {data['train_tokens']:,} train / {data['heldout_tokens']:,} held-out tokens); "
        + report.schedule_text(config, f"{config['batch_size']} x {config['seq_len']} tokens")
    )
    remarks = report.run_remarks(run, sweep_edge=_sweep_edge_remark)
    if config["recipe"] == "paper" and len({lr for lr in config["lrs"].values()}) > 1:
        remarks.append(
            "note: as in the papers' scripts, low-rank optimizers also train the dense parameters "
            "(embeddings, lm_head, norms) at their own, larger lr: the held-out difference to the dense "
            "optimizers mixes method and lr (--recipe drop-in compares the methods at one lr)"
        )
    notes_text = (
        _NOTES.format(window=FINAL_LOSS_WINDOW, peak=report.peak_memory_kind(run["results"])) if notes else None
    )
    rows = [_columns(r) for r in run["results"]]
    return report.job_table([title, _recipe_line(config)], _HEADER, rows, remarks, notes_text)


def write_llama_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``llama_loss.png`` and ``llama_heldout_vs_state.png``; ``None`` if matplotlib is not installed."""
    plt = report._pyplot()
    if plt is None:
        return None
    return report.plot_job_curves(plt, run, Path(directory), "llama", heldout_label="held-out loss")
