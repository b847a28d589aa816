"""``coap-bench memory --fit``: what a LLaMA training step needs at its peak, per optimizer and precision,
and the GPU memory sizes it fits in.

Each row is :func:`coap_torch.utils.peak.estimate_peak_bytes` of one optimizer choice on the model
built on ``meta`` as ``coap-bench memory`` builds it (bf16 weights, the papers' 32000-token
vocabulary, nothing allocated), with and without per-layer updates: the weights, the gradients and
activations alive at the peak (the activations from a meta forward and backward of a batch of one,
scaled to the batch), the optimizer state, and the temporaries of one parameter's update. The COAP
optimizers follow the paper recipe (attention and MLP matrices projected at the paper's rank, the
embeddings, ``lm_head`` and norms dense), with their state in float32 (the library's default) or
bfloat16 (``state_dtype``); the dense baselines train every parameter dense. A choice fits a budget
when its peak is at most that many GiB; a GPU also holds its CUDA context, the allocator's cache and
fragmentation, and library workspaces: leave 1-2 GiB.

Example::

    coap-bench memory --fit                          # LLaMA-7B, batch 1 x 256 tokens, a few minutes on a laptop
    coap-bench memory --fit --batch-size 8 --checkpointing --json fit.json
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from coap_torch.utils.peak import estimate_peak_bytes

from ._quiet import import_note_lines, import_notes
from .optimizers import ADAFACTOR_OPTIONS

__all__ = ["BUDGETS_GIB", "CHOICES", "FIT_OPTIMIZERS", "FitChoice", "format_fit_report", "run_fit"]

#: The GPU memory sizes of the table, in GiB (2**30 bytes).
BUDGETS_GIB = (16, 24, 40, 80)


@dataclass(frozen=True)
class FitChoice:
    """One optimizer and precision choice: ``key`` is the suite's optimizer name (``--optimizers``),
    ``optimizer`` and ``options`` what the estimate gets; ``paper_recipe``: the paper's projected and
    dense groups, else every parameter in one group."""

    key: str
    label: str
    precision: str
    optimizer: str
    options: dict[str, Any] = field(default_factory=dict)
    paper_recipe: bool = True


def _coap(key: str, label: str, **options: Any) -> tuple[FitChoice, ...]:
    return tuple(
        FitChoice(key, label, precision, key, {**options, "state_dtype": dtype})
        for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    )


_ADAFACTOR = {**ADAFACTOR_OPTIONS, "lr": 1e-3}  # beta1 set, as in the paper's runs

#: The rows: AdamW with float32 moments (CoapAdamW with ``coap=False``: AdamW's update, the library's
#: float32 state) and with moments in the weights' bf16 (``torch.optim.AdamW``), bitsandbytes' 8-bit
#: AdamW, then the four COAP optimizers at both state precisions.
CHOICES: tuple[FitChoice, ...] = (
    FitChoice("adamw", "AdamW", "float32", "coap_adamw", {"coap": False}, paper_recipe=False),
    FitChoice("adamw", "AdamW", "bfloat16", "adamw", paper_recipe=False),
    FitChoice("adamw8bit", "AdamW8bit (bitsandbytes)", "8-bit", "adamw8bit", paper_recipe=False),
    *_coap("coap_adamw", "CoapAdamW"),
    *_coap("coap_adamw8bit", "CoapAdamW8bit"),
    *_coap("coap_adafactor", "CoapAdafactor", **_ADAFACTOR),
    *_coap("coap_adafactor8bit", "CoapAdafactor8bit", **_ADAFACTOR),
)
#: The names ``--optimizers`` takes.
FIT_OPTIMIZERS: tuple[str, ...] = tuple(dict.fromkeys(choice.key for choice in CHOICES))


@contextlib.contextmanager
def _no_packed_sequence_check() -> Iterator[None]:
    """transformers asks whether the batch packs several sequences per row by reading position ids
    (``.all()``), which a meta tensor cannot answer. Our rows are fixed-length windows, one sequence
    each: the answer is no, given here."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _model(preset: Any, checkpointing: bool) -> nn.Module:
    from .llama_model import PAPER_VOCAB_SIZE, build_llama

    model = build_llama(preset, PAPER_VOCAB_SIZE, seed=0, device="meta", dtype=torch.bfloat16)
    model.train()
    if checkpointing:  # every decoder layer's activations recomputed in the backward
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _optimizer(choice: FitChoice, model: nn.Module, rank: int) -> tuple[Any, Any, dict[str, Any]]:
    """What ``estimate_peak_bytes`` gets for ``choice``: the optimizer, its params and its options."""
    options = dict(choice.options)
    if choice.optimizer == "adamw8bit":
        from .state_layouts import estimate_state_bytes

        optimizer = _bitsandbytes_adamw8bit()
        options["state_bytes"] = estimate_state_bytes(model, "adamw8bit").total
        return optimizer, list(model.parameters()), options
    if not choice.paper_recipe:
        return choice.optimizer, list(model.parameters()), options
    from .llama_model import projected_parameter_groups

    split = projected_parameter_groups(model, "paper")
    groups = split.param_groups({"rank": rank}, {"coap": False})
    return choice.optimizer, groups, options


def _bitsandbytes_adamw8bit() -> Any:
    from ._deps import require

    return require("bitsandbytes", hint="pip install bitsandbytes", names=("optim",)).optim.AdamW8bit


def _row(choice: FitChoice, per_layer: bool, estimate: Any = None, error: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": choice.key,
        "optimizer": choice.label,
        "precision": choice.precision,
        "per_layer_updates": per_layer,
        "error": error,
    }
    if estimate is not None:
        row.update(estimate.parts, total=estimate.total, phase=estimate.phase)
        row["fits"] = {str(gib): estimate.total <= gib * 2**30 for gib in BUDGETS_GIB}
    return row


def run_fit(
    preset: str = "7b",
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    checkpointing: bool = False,
    optimizers: tuple[str, ...] = FIT_OPTIMIZERS,
) -> dict[str, Any]:
    """The peak of a training step of LLaMA ``preset`` for the choices of ``optimizers`` (names of
    :data:`FIT_OPTIMIZERS`), with and without per-layer updates, at ``batch_size`` sequences of
    ``seq_len`` tokens (default: the preset's, 256 for the papers' sizes); rows and settings as plain
    data. A choice that cannot be estimated (a package missing, an option the installed library
    lacks) becomes a row with its error."""
    from .llama import LLAMA_PRESETS, PAPER_RANKS, causal_lm_loss
    from .llama_model import PAPER_VOCAB_SIZE

    unknown = [name for name in optimizers if name not in FIT_OPTIMIZERS]
    if unknown or not optimizers:
        raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known: {', '.join(FIT_OPTIMIZERS)}")  # fmt: skip
    choices = [choice for choice in CHOICES if choice.key in optimizers]
    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown LLaMA preset {preset!r}; choose from {', '.join(LLAMA_PRESETS)}")
    spec = LLAMA_PRESETS[preset]
    seq_len = spec.seq_len if seq_len is None else seq_len
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq_len > spec.seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the {preset} preset's {spec.seq_len} positions")
    model = _model(spec, checkpointing)
    rank = PAPER_RANKS[preset]
    sample = torch.zeros(1, seq_len + 1, dtype=torch.long, device="meta")  # a batch of one: inputs and targets
    rows = []
    with _no_packed_sequence_check():
        for choice in choices:
            for per_layer in (False, True):
                try:
                    optimizer, params, options = _optimizer(choice, model, rank)
                    estimate = estimate_peak_bytes(
                        model, optimizer, sample_batch=sample, batch_size=batch_size, forward=causal_lm_loss,
                        params=params, per_layer_updates=per_layer, **options,
                    )  # fmt: skip
                except (ImportError, TypeError, ValueError, RuntimeError) as error:
                    rows.append(_row(choice, per_layer, error=f"{type(error).__name__}: {error}"))
                else:
                    rows.append(_row(choice, per_layer, estimate))
    return {
        "rows": rows,
        "config": {
            "preset": preset,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": PAPER_VOCAB_SIZE,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "checkpointing": checkpointing,
            "rank": rank,
            "budgets_gib": list(BUDGETS_GIB),
            "optimizers": list(optimizers),
        },
        "import_notes": import_notes(),
    }


# -- the report -------------------------------------------------------------------------------------
_PARTS = ("weights", "gradients", "state", "activations", "optimizer_temporaries")


def _explanations(unit: str) -> list[str]:
    """What the table counts, below it."""
    parts = (
        f"{unit} = 2^{30 if unit == 'GiB' else 20} bytes. The parts are what is alive at the peak ('peak at'); they "
        "add up to it. At the optimizer step every gradient is alive and the activations are gone; with per-layer "
        "updates each parameter is updated, and its gradient freed, as soon as its gradient is ready, inside the "
        "backward, next to the activations not yet freed. Per-layer updates do not combine with gradient "
        "accumulation (accumulating keeps every gradient: the 'no' rows)."
    )
    measured = (
        "Activations: a forward and backward of one sequence on meta, scaled to the batch (on meta, attention takes "
        "the math kernel, which keeps the attention probabilities that fused kernels do not). Update temps: the "
        "update of one parameter at a time, measured by stepping the optimizer on the CPU (COAP at a refresh of P, "
        "its largest); bitsandbytes' state from its layout, its update fused."
    )
    margin = (
        "A choice fits when its peak is at most the budget; a GPU also holds the CUDA context, the allocator's "
        "cache and fragmentation, and library workspaces: leave 1-2 GiB."
    )
    return [parts, measured, margin]


def format_fit_report(run: dict[str, Any]) -> str:
    """The Markdown table of ``run`` (from :func:`run_fit`), its settings above it and what it counts below.
    Figures in GiB, or in MiB for models whose every peak is under 1 GiB."""
    config, budgets = run["config"], run["config"]["budgets_gib"]
    totals = [row["total"] for row in run["rows"] if not row.get("error")]
    unit, scale = ("GiB", 2**30) if not totals or max(totals) >= 2**30 else ("MiB", 2**20)
    checkpointing = (
        "activation checkpointing of every decoder layer" if config["checkpointing"] else "no activation checkpointing"
    )
    title = (
        f"LLaMA-{config['preset']} ({config['parameters']:,} parameters, bf16 weights, built on meta): peak of "
        f"one training step at batch {config['batch_size']} x {config['seq_len']} tokens, {checkpointing}."
    )
    recipe = (
        f"COAP: paper recipe, attention and MLP matrices at rank {config['rank']}, embeddings, lm_head and norms "
        "dense. AdamW: every parameter dense; float32 moments as CoapAdamW(coap=False), bfloat16 (the "
        "weights' dtype) as torch.optim.AdamW."
    )
    header = (
        "| optimizer | state dtype | per-layer updates | weights | gradients | state | activations | update temps "
        f"| peak ({unit}) | peak at | " + " | ".join(f"{gib} GiB" for gib in budgets) + " |"
    )
    lines = [title, recipe, "", header, "|---|---|---|" + "---:|" * 6 + "---|" + ":---:|" * len(budgets)]
    failures = []
    for row in run["rows"]:
        head = f"| {row['optimizer']} | {row['precision']} | {'yes' if row['per_layer_updates'] else 'no'} |"
        if row.get("error"):
            failures.append(f"{row['optimizer']} ({row['precision']}): {row['error']}")
            cells = ["-"] * len(_PARTS) + [f"failed [{len(failures)}]", "-"] + ["-"] * len(budgets)
        else:
            fits = ["✓" if row["fits"][str(gib)] else "✗" for gib in budgets]
            cells = [f"{row[part] / scale:,.2f}" for part in (*_PARTS, "total")] + [row["phase"], *fits]
        lines.append(f"{head} {' | '.join(cells)} |")
    lines += ["", *_explanations(unit)]
    lines += [f"[{index}] {text}" for index, text in enumerate(failures, 1)]
    notes = import_note_lines(run)
    lines += ["", *notes] if notes else []
    return "\n".join(lines)
