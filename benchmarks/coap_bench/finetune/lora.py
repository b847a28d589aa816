"""LoRA, the fine-tuning method COAP is compared with here: ``peft`` adapters on the attention and MLP
projections, trained with torch's AdamW while the base model stays frozen.

LoRA is this job's own method, not an optimizer of the suite's registry: :data:`LORA_SPEC` describes
it as the registry describes an optimizer (its ``build`` is AdamW over the trainable parameters), and
:func:`apply_lora` turns a model into the ``peft`` model that trains. :func:`matched_lora_rank` picks the
rank whose adapter plus AdamW state takes the bytes CoapAdamW's state takes, so that the two are
compared at equal memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..optimizers import OPTIMIZERS, LowRankSettings, OptimizerSpec

__all__ = [
    "LORA_SPEC",
    "LoraTarget",
    "adapter_nbytes",
    "apply_lora",
    "lora_bytes_per_rank",
    "lora_targets",
    "matched_lora_rank",
]


def _adamw_on_adapters(
    projected: Sequence[nn.Parameter], dense: Sequence[nn.Parameter], lr: float, settings: LowRankSettings
) -> torch.optim.Optimizer:
    """AdamW over the parameters handed in: the adapters (the frozen base is never handed to it)."""
    return OPTIMIZERS["adamw"].build(projected, dense, lr, settings)


#: LoRA as the benchmark's tables describe a method (family ``lora``: no projection refreshes).
LORA_SPEC = OptimizerSpec(
    "lora",
    "lora",
    "peft LoRA on the attention and MLP projections, torch.optim.AdamW on the adapters, base frozen",
    _adamw_on_adapters,
    package="peft",
    modules=("peft",),
)

#: Bytes per adapter value: float32 weight, and AdamW's two float32 moments.
_WEIGHT_BYTES = 4
_ADAMW_STATE_BYTES = 8


@dataclass(frozen=True)
class LoraTarget:
    """A projection LoRA adapts: its module name and its input and output sizes."""

    name: str
    in_features: int
    out_features: int


def lora_targets(model: nn.Module) -> list[LoraTarget]:
    """The projections LoRA adapts in ``model``: every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's
    projection) but the output layer, which is what ``peft``'s ``"all-linear"`` targets; for a LLaMA the
    attention and MLP projections."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = []
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, nn.Linear):
            targets.append(LoraTarget(name, module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            rows, cols = module.weight.shape  # Conv1D keeps its weight as (in, out)
            targets.append(LoraTarget(name, int(rows), int(cols)))
    if not targets:
        raise ValueError("LoRA: the model has no linear projection to adapt")
    return targets


def lora_bytes_per_rank(targets: Sequence[LoraTarget]) -> int:
    """Bytes of LoRA's adapter plus AdamW state per unit of rank: ``A`` (r x in) and ``B`` (out x r) per
    target, each value a float32 weight and two float32 moments."""
    return (_WEIGHT_BYTES + _ADAMW_STATE_BYTES) * sum(t.in_features + t.out_features for t in targets)


def matched_lora_rank(target_bytes: int, targets: Sequence[LoraTarget]) -> int:
    """The LoRA rank whose adapter plus AdamW state is closest to ``target_bytes`` (at least 1)."""
    return max(1, round(target_bytes / lora_bytes_per_rank(targets)))


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[LoraTarget], *, seed: int) -> Any:
    """``model`` with LoRA adapters of ``rank`` on ``targets`` (``peft.get_peft_model``; no dropout, so a
    step draws no random numbers), the base frozen. ``A`` is drawn from ``seed`` (``B`` starts at zero, so
    the adapted model starts as the base); the global RNG is left as it was."""
    peft = require("peft", names=("LoraConfig", "get_peft_model"))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted({t.name for t in targets}),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question about gradient checkpointing: not the user's concern
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def adapter_nbytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters of a LoRA model: its adapters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
