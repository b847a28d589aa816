"""The LLaMA pre-training benchmark: one LLaMA model trained once per optimizer on the same tokens.

Every optimizer gets the same initial weights (:func:`~coap_torch.bench.llama_model.build_llama`
with ``seed``), the same batches (:class:`~coap_torch.bench.text.TokenBatches` with ``seed``) and
the same learning-rate schedule (linear warm-up, then cosine decay to 10% of the peak). Each run is
scored on the fixed held-out windows of :func:`~coap_torch.bench.text.heldout_windows`.

With ``checkpoint_dir``, a run saves its model, optimizer, scheduler, batch stream, step and loss
curve every ``checkpoint_every`` steps and continues from there when started again: on the CPU, a
resumed run ends with exactly the numbers of one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import optimizer_state_nbytes
from ._deps import require
from .llama_model import PRESETS, RECIPES, LlamaPreset, projected_parameter_groups
from .optimizers import OPTIMIZERS
from .report import _number, format_bytes
from .timing import timed_step

__all__ = [
    "DEFAULT_LLAMA_OPTIMIZERS",
    "LLAMA_PRESETS",
    "LR_SWEEP_FACTORS",
    "LlamaConfig",
    "evaluate_heldout",
    "format_llama_table",
    "lr_lambda",
    "run_llama",
    "write_llama_plots",
]

#: Presets of ``coap-bench llama``: the model presets plus ``micro``, a very small one for smoke tests.
LLAMA_PRESETS: dict[str, LlamaPreset] = {
    **PRESETS,
    "micro": LlamaPreset(64, 172, 2, 2, 32, notes="smoke tests only: a few seconds on a CPU"),
}
DEFAULT_LLAMA_OPTIMIZERS = ("adamw", "coap_adamw")
#: Default batch size and the cap of the default sequence length, per preset (else the preset's own).
DEFAULT_BATCH_SIZE = {"micro": 8, "tiny": 16}
DEFAULT_SEQ_LEN_CAP = {"micro": 32, "tiny": 128}
#: Default peak learning rate per recipe (the AdamW rate of the GaLore / COAP recipes at small scale).
DEFAULT_LR = {"paper": 1e-3, "drop-in": 1e-3}
#: ``--lr-sweep`` runs each optimizer at the peak learning rate times these factors.
LR_SWEEP_FACTORS = (0.5, 1.0, 2.0)
#: The cosine decay ends at this share of the peak learning rate.
FINAL_LR_FRACTION = 0.1
#: Number of last batch losses averaged into ``final_loss``.
FINAL_LOSS_WINDOW = 10
#: Offset between the seed of the initial weights and the seed of the batch order.
_BATCH_STREAM = 2**32
_CHECKPOINT_FORMAT = 1

_NOTES = (
    "state: optimizer-state bytes after training (storage counted once); iter / step ms: median over all "
    "steps of forward+backward+step / of optimizer.step() alone; tok/s: batch tokens / median iteration; "
    "final loss: mean of the last {window} batch losses; held-out loss: mean token cross-entropy on the "
    "fixed held-out windows, ppl = exp(held-out loss); peak mem: {peak}."
)


@dataclass
class LlamaConfig:
    """Options of one ``coap-bench llama`` run (the command-line flags, same names).

    ``batch_size``, ``seq_len``, ``lr`` and ``warmup_steps`` left ``None`` take their defaults
    from the preset and recipe (see :meth:`resolved`). ``stop_after`` ends each optimizer's run
    after that many steps of this call (checkpointing as usual): it simulates an interrupted run.
    """

    preset: str = "tiny"
    steps: int = 400
    batch_size: int | None = None
    seq_len: int | None = None
    optimizers: tuple[str, ...] = DEFAULT_LLAMA_OPTIMIZERS
    recipe: str = "paper"
    rank_ratio: float = 4.0
    update_interval: int = 32
    reproject_factor: int = 5
    correlation_normalize: bool = False
    lr: float | None = None
    lr_sweep: bool = False
    warmup_steps: int | None = None
    data_dir: str | None = None
    vocab_size: int = 4096
    max_documents: int | None = None
    max_heldout_windows: int | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    stop_after: int | None = None
    progress: bool = True
    argv: list[str] = field(default_factory=list)

    def resolved(self) -> LlamaConfig:
        """A copy with every ``None`` default filled in; raises :class:`ValueError` on bad options."""
        if self.preset not in LLAMA_PRESETS:
            raise ValueError(f"unknown LLaMA preset {self.preset!r}; choose from {', '.join(LLAMA_PRESETS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown))}; known: {', '.join(OPTIMIZERS)}")
        if not self.optimizers:
            raise ValueError("no optimizer to run")
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        preset = LLAMA_PRESETS[self.preset]
        seq_len = self.seq_len or min(preset.seq_len, DEFAULT_SEQ_LEN_CAP.get(self.preset, preset.seq_len))
        if seq_len > preset.seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds the {self.preset} preset's {preset.seq_len} positions")
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)
        if warmup >= self.steps:
            raise ValueError(f"warmup_steps ({warmup}) must be smaller than steps ({self.steps})")
        return dataclasses.replace(
            self,
            batch_size=self.batch_size or DEFAULT_BATCH_SIZE.get(self.preset, 32),
            seq_len=seq_len,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.recipe],
            warmup_steps=warmup,
            optimizers=tuple(self.optimizers),
        )


def lr_lambda(steps: int, warmup_steps: int, final_fraction: float = FINAL_LR_FRACTION):
    """Multiplier of the peak lr after ``step`` scheduler steps: linear warm-up, then cosine to ``final_fraction``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, name: str, config: LlamaConfig) -> Any:
    """What the optimizer ``name`` gets: COAP optimizers follow the recipe, the others get every parameter."""
    if not name.startswith("coap_"):
        return list(model.parameters())
    split = projected_parameter_groups(model, config.recipe)
    if config.recipe == "drop-in":
        return split.param_groups()
    projected = {
        "rank_ratio_matrix": config.rank_ratio,
        "update_interval": config.update_interval,
        "reproject_factor": config.reproject_factor,
    }
    return split.param_groups(projected, {"coap": False})


def _loss(model: nn.Module, batch: Tensor, reduction: str = "mean") -> Tensor:
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
        total += _loss(model, chunk, reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(rss), "process peak RSS so far (ru_maxrss)"


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fingerprint(name: str, lr: float, config: LlamaConfig, data: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be continued."""
    return {
        "optimizer": name,
        "lr": lr,
        "preset": config.preset,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "recipe": config.recipe,
        "rank_ratio": config.rank_ratio,
        "update_interval": config.update_interval,
        "reproject_factor": config.reproject_factor,
        "correlation_normalize": config.correlation_normalize,
        "warmup_steps": config.warmup_steps,
        "seed": config.seed,
        "train_sha256": data.train_sha256,
    }


def train_one(name: str, lr: float, config: LlamaConfig, data: Any, windows: Tensor,
              checkpoint: Path | None) -> dict[str, Any]:
    """Train a fresh model (or continue ``checkpoint``) with optimizer ``name`` at peak ``lr``."""
    from .llama_model import build_llama
    from .text import TokenBatches

    tqdm = require("tqdm").tqdm
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device=device)
    model.train()
    optimizer = OPTIMIZERS[name](_param_groups(model, name, config), lr, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.steps, config.warmup_steps))
    batches = TokenBatches(data.train, config.batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM,
                           device=device)
    fingerprint = _fingerprint(name, lr, config, data)
    losses: list[float] = []
    iteration_s: list[float] = []
    step_s: list[float] = []
    start_step = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved.get("format") != _CHECKPOINT_FORMAT or saved.get("fingerprint") != fingerprint:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} was saved by a different run configuration; "
                "remove it or use another --checkpoint-dir"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["batches"])
        start_step = int(saved["step"])
        losses, iteration_s, step_s = list(saved["losses"]), list(saved["iteration_s"]), list(saved["step_s"])

    def save(step: int) -> None:
        _atomic_save(
            {
                "format": _CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "batches": batches.state_dict(),
                "losses": losses,
                "iteration_s": iteration_s,
                "step_s": step_s,
            },
            checkpoint,
        )

    end_step = config.steps
    if config.stop_after is not None:
        end_step = min(end_step, start_step + config.stop_after)
    label = name if not config.lr_sweep else f"{name} lr={lr:g}"
    started = time.perf_counter()
    with tqdm(total=config.steps, initial=start_step, desc=label, file=sys.stderr, disable=not config.progress,
              unit="step") as bar:
        for step in range(start_step + 1, end_step + 1):
            batch = batches.next()
            loss, iteration, step_time = timed_step(lambda: _loss(model, batch), optimizer, device)
            scheduler.step()
            iteration_s.append(iteration)
            step_s.append(step_time)
            losses.append(loss.item())
            if checkpoint is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                save(step)
            bar.update(1)
            if step % 10 == 0 or step == end_step:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    wall = time.perf_counter() - started

    heldout_loss = evaluate_heldout(model, windows, config.batch_size)
    peak, peak_kind = _peak_memory(device)
    iteration_ms = statistics.median(iteration_s) * 1e3 if iteration_s else None
    nonfinite = next((i for i, value in enumerate(losses, start=1) if not math.isfinite(value)), None)
    tail = losses[-FINAL_LOSS_WINDOW:]
    return {
        "name": name,
        "lr": lr,
        "state_bytes": optimizer_state_nbytes(optimizer),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "iteration_ms": iteration_ms,
        "step_ms": statistics.median(step_s) * 1e3 if step_s else None,
        "tokens_per_s": config.batch_size * config.seq_len / (iteration_ms / 1e3) if iteration_ms else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_batch_loss": losses[-1] if losses else None,
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss) if heldout_loss < 700 else float("inf"),
        "first_nonfinite_step": nonfinite,
        "steps_done": len(losses),
        "completed": len(losses) == config.steps,
        "resumed_from_step": start_step or None,
        "wall_seconds": wall,
        "loss_curve": losses,
    }


def _versions() -> dict[str, str | None]:
    from .. import __version__

    found: dict[str, str | None] = {"coap_torch": __version__, "torch": torch.__version__,
                                    "python": platform.python_version()}
    for module in ("transformers", "tokenizers"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def run_llama(config: LlamaConfig) -> dict[str, Any]:
    """Train once per optimizer of ``config`` and return ``{"config", "data", "versions", "results"}``.

    With ``lr_sweep``, each optimizer runs at ``lr`` times :data:`LR_SWEEP_FACTORS` and the run
    with the lowest held-out loss is kept (all of them are listed in its ``lr_sweep``).
    ``state_ratio_to_adamw`` and ``iteration_ratio_to_adamw`` are present when ``adamw`` ran.
    """
    from .text import heldout_windows, load_token_data

    config = config.resolved()
    data = load_token_data(data_dir=config.data_dir, vocab_size=config.vocab_size,
                           max_documents=config.max_documents)
    windows = heldout_windows(data, config.seq_len, config.max_heldout_windows)
    if config.batch_size * (config.seq_len + 1) > data.train.numel():
        raise ValueError(f"{data.train.numel()} training tokens are too few for batch {config.batch_size}")
    lrs = [config.lr * f for f in LR_SWEEP_FACTORS] if config.lr_sweep else [config.lr]
    folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None

    results = []
    for name in config.optimizers:
        runs = []
        for lr in lrs:
            stem = name if not config.lr_sweep else f"{name}-lr{lr:g}"
            checkpoint = folder / f"{stem}.pt" if folder is not None else None
            runs.append(train_one(name, lr, config, data, windows, checkpoint))
        best = min(runs, key=lambda r: r["heldout_loss"] if math.isfinite(r["heldout_loss"]) else math.inf)
        if config.lr_sweep:
            best = dict(best)
            best["lr_sweep"] = [
                {key: r[key] for key in ("lr", "heldout_loss", "final_loss", "first_nonfinite_step")} for r in runs
            ]
        results.append(best)

    by_name = {r["name"]: r for r in results}
    if "adamw" in by_name:
        adamw = by_name["adamw"]
        for result in results:
            result["state_ratio_to_adamw"] = result["state_bytes"] / adamw["state_bytes"]
            if result["iteration_ms"] and adamw["iteration_ms"]:
                result["iteration_ratio_to_adamw"] = result["iteration_ms"] / adamw["iteration_ms"]
            result["heldout_loss_minus_adamw"] = result["heldout_loss"] - adamw["heldout_loss"]

    preset = LLAMA_PRESETS[config.preset]
    settings = dataclasses.asdict(config)
    settings["optimizers"] = list(config.optimizers)
    settings.update(
        preset_shape={k: v for k, v in dataclasses.asdict(preset).items() if k != "notes"},
        parameters=preset.num_parameters(data.vocab_size),
        heldout_windows=int(windows.size(0)),
        tokens_per_step=config.batch_size * config.seq_len,
        lr_sweep_factors=list(LR_SWEEP_FACTORS) if config.lr_sweep else None,
        final_lr_fraction=FINAL_LR_FRACTION,
        torch_threads=torch.get_num_threads(),
    )
    return {"config": settings, "data": data.describe(), "versions": _versions(), "argv": list(config.argv),
            "results": results}


# ------------------------------------------------------------------------------------------- report

_HEADER = ["optimizer", "lr", "state", "vs AdamW", "peak mem", "iter ms", "vs AdamW", "step ms", "tok/s",
           "final loss", "held-out loss", "ppl"]


def _columns(result: dict[str, Any]) -> list[str]:
    return [
        result["name"],
        f"{result['lr']:g}",
        format_bytes(result["state_bytes"]),
        _number(result.get("state_ratio_to_adamw"), ".3f"),
        format_bytes(result["peak_memory_bytes"]),
        _number(result["iteration_ms"], ".1f"),
        _number(result.get("iteration_ratio_to_adamw"), ".2f"),
        _number(result["step_ms"], ".1f"),
        _number(result["tokens_per_s"], ".0f"),
        _number(result["final_loss"], ".4f"),
        _number(result["heldout_loss"], ".4f"),
        _number(result["heldout_perplexity"], ".2f"),
    ]


def format_llama_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per optimizer, preceded by a line describing the setup."""
    config, data = run["config"], run["data"]
    rows = [_HEADER, *(_columns(r) for r in run["results"])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    title = (
        f"llama {config['preset']}: {config['parameters']:,} parameters, vocab {data['vocab_size']} "
        f"({data['corpus']['name']}: {data['train_tokens']:,} train / {data['heldout_tokens']:,} held-out tokens); "
        f"{config['steps']} steps, batch {config['batch_size']} x {config['seq_len']} tokens, warm-up "
        f"{config['warmup_steps']}, cosine to {config['final_lr_fraction']:g} x lr, seed {config['seed']}, "
        f"{config['device']} ({config['torch_threads']} threads); recipe {config['recipe']}, COAP rank ratio "
        f"{config['rank_ratio']:g}, update interval {config['update_interval']}, reproject factor "
        f"{config['reproject_factor']}" + (f"; lr sweep x{config['lr_sweep_factors']}, best held-out kept"
                                           if config.get("lr_sweep") else "")
    )
    text = [*textwrap.wrap(title, width=120), "", line(rows[0]), rule, *(line(row) for row in rows[1:])]
    for result in run["results"]:
        if result.get("first_nonfinite_step") is not None:
            text.append(f"\nwarning: {result['name']}: the training loss became non-finite at step "
                        f"{result['first_nonfinite_step']}")
        if not result.get("completed", True):
            text.append(f"\nnote: {result['name']}: stopped after {result['steps_done']} of {config['steps']} steps")
    if notes:
        peak = run["results"][0]["peak_memory_kind"] if run["results"] else ""
        text += ["", *textwrap.wrap(_NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak), width=100)]
    return "\n".join(text)


def write_llama_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``llama_loss.png`` and ``llama_heldout_vs_state.png``; ``None`` if matplotlib is not installed."""
    from .report import _pyplot, plot_loss_curves

    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    loss_path = plot_loss_curves(
        plt,
        run,
        directory / "llama_loss.png",
        title=f"llama {run['config']['preset']}, seed {run['config']['seed']}",
        label=lambda result: f"{result['name']} lr={result['lr']:g}",
    )

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for result in run["results"]:
        ax.scatter([result["state_bytes"] / 2**20], [result["heldout_loss"]], label=result["name"])
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss vs optimizer state")
    ax.legend()
    fig.tight_layout()
    scatter_path = directory / "llama_heldout_vs_state.png"
    fig.savefig(scatter_path, dpi=120)
    plt.close(fig)
    return [loss_path, scatter_path]
