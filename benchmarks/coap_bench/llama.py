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
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coap_torch.optim import LowRankOptimizer, enable_per_layer_updates

from ._quiet import gather_import_notes, import_note_lines
from .config import RunConfig, check_choice, override_settings
from .environment import hardware, versions
from .llama_model import PRESETS, RECIPES, LlamaPreset, projected_parameter_groups
from .optimizers import OPTIMIZERS, LowRankSettings, build_optimizer
from .report import _number, markdown_table, scale_text
from .runner import checkpoint_workarounds
from .training import (
    FINAL_LOSS_WINDOW,
    FINAL_LR_FRACTION,
    LR_SWEEP_FACTORS,
    FileCheckpoint,
    TrainingLoop,
    best_of_sweep,
    lr_lambda,
    measurement_columns,
    plot_heldout_vs_state,
    result_remarks,
    result_row,
    run_fingerprint,
    run_optimizers,
    seed_label,
    start_measuring,
)

__all__ = [
    "DEFAULT_LLAMA_OPTIMIZERS",
    "LLAMA_PRESETS",
    "LR_SWEEP_FACTORS",
    "PAPER_RANKS",
    "LlamaConfig",
    "causal_lm_loss",
    "evaluate_heldout",
    "format_llama_table",
    "lr_lambda",
    "recipe_settings",
    "run_llama",
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


@torch.no_grad()
def evaluate_heldout(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean token cross-entropy of ``model`` on ``windows`` (``(n, seq_len + 1)``), in chunks of ``batch_size``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.size(0), batch_size):
        chunk = windows[start : start + batch_size].to(device)
        total += causal_lm_loss(model, chunk, reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def _fingerprint(name: str, lr: float, config: LlamaConfig, data: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be continued."""
    return run_fingerprint(name, lr, config, seq_len=config.seq_len, train_sha256=data.train_sha256)


def train_one(
    name: str, lr: float, config: LlamaConfig, data: Any, windows: Tensor, checkpoint: Path | None
) -> dict[str, Any]:
    """Train a fresh model (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``."""
    from .llama_model import build_llama
    from .text import TokenBatches

    spec = OPTIMIZERS[name]
    settings = config.settings()
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device=device)
    model.train()
    split = projected_parameter_groups(model, config.recipe)
    optimizer = build_optimizer(name, [p for _, p in split.projected], [p for _, p in split.dense], lr, settings)
    per_layer = config.per_layer and isinstance(optimizer, LowRankOptimizer)
    if per_layer:
        enable_per_layer_updates(optimizer)  # step() then finds nothing left to do
    batches = TokenBatches(
        data.train, config.batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM, device=device
    )
    loop = TrainingLoop(
        model,
        optimizer,
        batches,
        lambda batch: causal_lm_loss(model, batch),
        config=config,
        device=device,
        label=name if not config.lr_sweep else f"{name} lr={lr:g}",
    )
    workarounds = checkpoint_workarounds(spec, checkpoint)
    if checkpoint is not None:
        loop.resume(FileCheckpoint(checkpoint, spec, _fingerprint(name, lr, config, data), _CHECKPOINT_FORMAT))
    loop.run()

    heldout_loss = evaluate_heldout(model, windows, config.batch_size)
    return result_row(
        name,
        spec,
        lr,
        per_layer=per_layer,
        **loop.measurements(
            spec, settings, items_per_step=config.batch_size * config.seq_len, throughput="tokens_per_s"
        ),
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        heldout_loss=heldout_loss,
        heldout_perplexity=math.exp(heldout_loss) if heldout_loss < 700 else float("inf"),
        workarounds=workarounds,
    )


def _best(runs: list[dict[str, Any]], sweep: bool) -> dict[str, Any]:
    """The run with the lowest finite held-out loss (a failed result if none finished), with the sweep listed."""
    return best_of_sweep(runs, sweep, _SWEEP_KEYS)


def run_settings(config: LlamaConfig, data: Any, windows: Tensor) -> dict[str, Any]:
    """The ``config`` part of a run's result: the options plus what they resolved to."""
    preset = LLAMA_PRESETS[config.preset]
    settings = dataclasses.asdict(config)
    settings.update(
        optimizers=list(config.optimizers),
        low_rank=dataclasses.asdict(config.settings()),
        lrs={name: config.lr_for(name) for name in config.optimizers},
        preset_shape={k: v for k, v in dataclasses.asdict(preset).items() if k != "notes"},
        parameters=preset.num_parameters(data.vocab_size),
        heldout_windows=int(windows.size(0)),
        tokens_per_step=config.batch_size * config.seq_len,
        lr_sweep_factors=list(LR_SWEEP_FACTORS) if config.lr_sweep else None,
        final_lr_fraction=FINAL_LR_FRACTION,
        torch_threads=torch.get_num_threads(),
    )
    return settings


def run_llama(config: LlamaConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config`` and return ``{"config", "data", "versions", "hardware", "argv", "results"}``.

    With ``lr_sweep``, each optimizer runs at its lr times :data:`LR_SWEEP_FACTORS` and the run
    with the lowest held-out loss is kept (all of them are listed in its ``lr_sweep``). A run that
    raises (or whose process dies) is a result with ``failed: True`` and its ``error``. Ratios to
    AdamW (``state_ratio_to_adamw``, ``iteration_ratio_to_adamw``, ...) are added when ``adamw`` ran.
    ``import_notes`` says what packages printed while the runs imported them.
    """
    from .text import heldout_windows, load_token_data

    config = config.resolved()
    data = load_token_data(
        source="c4" if config.c4 else None,
        data_dir=config.data_dir,
        vocab_size=config.vocab_size,
        max_documents=config.max_documents,
    )
    windows = heldout_windows(data, config.seq_len, config.max_heldout_windows)
    if config.batch_size * (config.seq_len + 1) > data.train.numel():
        raise ValueError(
            f"{data.train.numel()} training tokens are too few for batch {config.batch_size} x "
            f"{config.seq_len + 1}: lower --batch-size or --seq-len, or give more text (--data-dir)"
        )
    results = run_optimizers(config, train_one, (config, data, windows), _SWEEP_KEYS)

    settings = run_settings(config, data, windows)
    return {
        "config": settings,
        "data": data.describe(),
        "versions": versions(),
        "hardware": hardware(config.device),
        "argv": list(config.argv),
        "results": results,
        "import_notes": gather_import_notes(results),
    }


_NOTES = (
    "state: optimizer-state bytes after training (every tensor reachable from the state, each storage once, "
    "step counters excluded); peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step (refresh steps "
    "minus the median of the others); tok/s: batch tokens / median iteration; final loss: mean of the last "
    "{window} batch losses; held-out loss: mean token cross-entropy on the fixed held-out windows, "
    "ppl = exp(held-out loss)."
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
    "tok/s",
    "final loss",
    "held-out loss",
    "vs AdamW",
    "ppl",
]


def _columns(result: dict[str, Any]) -> list[str]:
    if result.get("failed"):
        return [result["name"], f"{result['lr']:g}", "failed", *["-"] * (len(_HEADER) - 3)]
    return [*measurement_columns(result, "tokens_per_s"), _number(result["heldout_perplexity"], ".2f")]


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
        f"{low['proj_gap']}; update scale {scale_text(low['scale'])}), weight decay {low['weight_decay']:g}; peak lr: {lrs}"
        + (f"; lr sweep x{config['lr_sweep_factors']}, best held-out kept" if config.get("lr_sweep") else "")
    )


def _sweep_edge_remark(result: dict[str, Any]) -> str:
    swept = ", ".join(f"{s['lr']:g}: {_number(s['heldout_loss'], '.4f')}" for s in result["lr_sweep"])
    return (
        f"note: {result['name']}: its best lr is at the edge of the sweep ({swept}); the optimum may lie "
        "outside it (try --lr)"
    )


def format_llama_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, with the setup above and the notes below."""
    config, data = run["config"], run["data"]
    title = (
        f"llama {config['preset']}: {config['parameters']:,} parameters, vocab {data['vocab_size']} "
        f"({data['corpus']['name']}: {data['train_tokens']:,} train / {data['heldout_tokens']:,} held-out tokens); "
        f"{config['steps']} steps, batch {config['batch_size']} x {config['seq_len']} tokens, warm-up "
        f"{config['warmup_steps']}, cosine to {config['final_lr_fraction']:g} x lr, {seed_label(config)}, "
        f"{config['device']} ({config['torch_threads']} threads)"
    )
    results = run["results"]
    text = [*textwrap.wrap(title, width=120), *textwrap.wrap(_recipe_line(config), width=120), ""]
    text += markdown_table(_HEADER, [_columns(r) for r in results])
    remarks = [
        line for result in results for line in result_remarks(result, config["steps"], sweep_edge=_sweep_edge_remark)
    ]
    remarks += import_note_lines(run)  # what peers printed while imported, said once
    if config["recipe"] == "paper" and len({lr for lr in config["lrs"].values()}) > 1:
        remarks.append(
            "note: as in the papers' scripts, low-rank optimizers also train the dense parameters "
            "(embeddings, lm_head, norms) at their own, larger lr: the held-out difference to the dense "
            "optimizers mixes method and lr (--recipe drop-in compares the methods at one lr)"
        )
    if remarks:
        text += ["", *remarks]
    if notes:
        finished = [r for r in results if not r.get("failed")]
        peak = finished[0]["peak_memory_kind"] if finished else ""
        text += ["", *textwrap.wrap(_NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak), width=120)]
    return "\n".join(text)


def write_llama_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``llama_loss.png`` and ``llama_heldout_vs_state.png``; ``None`` if matplotlib is not installed."""
    from .report import _pyplot, plot_loss_curves

    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    finished = [r for r in run["results"] if not r.get("failed")]
    loss_path = plot_loss_curves(
        plt,
        {**run, "results": finished},
        directory / "llama_loss.png",
        title=f"llama {run['config']['preset']}, {seed_label(run['config'])}",
        label=lambda result: f"{result['name']} lr={result['lr']:g}",
    )

    scatter_path = plot_heldout_vs_state(plt, finished, directory / "llama_heldout_vs_state.png", "held-out loss")
    return [loss_path, scatter_path]
