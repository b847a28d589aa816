"""The presets and recipe of ``coap-bench finetune``, the methods it compares, and the options of one run
(:class:`FinetuneConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import RunConfig, check_choice
from ..optimizers import OPTIMIZERS, LowRankSettings
from .lora import LORA_SPEC

__all__ = [
    "DEFAULT_FINETUNE_OPTIMIZERS",
    "FINETUNE_PRESETS",
    "METHODS",
    "MODEL_DTYPES",
    "FinetuneConfig",
    "FinetunePreset",
    "parse_method_names",
]

#: The methods ``coap-bench finetune`` knows: the suite's optimizers (every parameter trained) and
#: ``lora`` (the base frozen, peft adapters trained with AdamW), which only this job has.
METHODS = {**OPTIMIZERS, LORA_SPEC.name: LORA_SPEC}
#: What ``coap-bench finetune`` compares by default: COAP against what fine-tuning users pick today.
DEFAULT_FINETUNE_OPTIMIZERS = ("adamw", "coap_adamw", "lora", "galore_adamw", "adamw8bit")

#: The paper's LLaVA-v1.5-7B fine-tuning row (supplementary Table 1): CoapAdamW at rank ratio 4,
#: T_u 32, lambda 1, lr 2e-5 (LLaVA's full fine-tuning lr), BF16 on one A100.
PAPER_RANK_RATIO = 4.0
PAPER_UPDATE_INTERVAL = 32
PAPER_REPROJECT_FACTOR = 1
#: The precisions the model can be fine-tuned in (``--dtype``): float32, or bfloat16 weights, gradients and
#: activations throughout (the paper's LLaVA run is BF16).
MODEL_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
#: The recipe's name, in the JSON and in checkpoint fingerprints.
RECIPE = "llava"


@dataclass(frozen=True)
class FinetunePreset:
    """A fine-tuning run's size, its learning rates per family and, when no ``--model`` is given, how the
    base model is pretrained (a ``coap-bench llama`` run: ``base_preset``, ``pretrain_steps`` of AdamW,
    ``vocab_size``, the first ``pretrain_documents`` documents of its corpus or all of them).

    ``lr_dense`` is every full fine-tuning optimizer's peak lr (AdamW, AdamW8bit), ``lr_low_rank``
    COAP's, GaLore's and APOLLO's, ``lr_lora`` LoRA's. ``heldout_windows`` caps the held-out windows.

    The ``small`` preset's lrs were measured (one seed, 120 steps, held-out loss from the base model's
    5.45): AdamW 4.75 / 4.33 / 4.05 at 1e-4 / 3e-4 / 1e-3, CoapAdamW 4.73 / 4.23 / 4.00 at 3e-4 / 1e-3 /
    3e-3, LoRA 4.82 / 4.70 / 5.93 (diverging) at 1e-3 / 3e-3 / 1e-2. The base model saw 400 steps of one
    corpus and ended its cosine at 1e-4, so fine-tuning on a new corpus still gains from the pretraining
    peak lr (1e-3) for dense updates. Low-rank updates keep only part of the gradient and want about twice
    that (as in pretraining, where the papers give them a larger lr); LoRA's adapters (alpha 2r) want three
    times, not the usual ten, because full fine-tuning here is far from the small lrs of a converged model.
    Each centre leaves the best lr measured inside the ``--lr-sweep`` (x0.5, 1, 2).
    """

    batch_size: int
    seq_len: int
    steps: int
    lr_dense: float
    lr_low_rank: float
    lr_lora: float
    heldout_windows: int | None
    base_preset: str | None
    pretrain_steps: int = 400
    vocab_size: int = 4096
    pretrain_documents: int | None = None
    corpus_documents: int | None = None
    notes: str = ""


#: Presets of ``coap-bench finetune``.
FINETUNE_PRESETS: dict[str, FinetunePreset] = {
    "micro": FinetunePreset(
        batch_size=4,
        seq_len=32,
        steps=8,
        lr_dense=1e-3,
        lr_low_rank=2e-3,
        lr_lora=3e-3,
        heldout_windows=8,
        base_preset="micro",
        pretrain_steps=6,
        vocab_size=300,
        pretrain_documents=40,
        corpus_documents=40,
        notes="smoke tests only: a few seconds on a CPU",
    ),
    "small": FinetunePreset(
        batch_size=8,
        seq_len=64,
        steps=100,
        lr_dense=1e-3,
        lr_low_rank=2e-3,
        lr_lora=3e-3,
        heldout_windows=256,
        base_preset="tiny",
        notes="the default: coap-bench llama's tiny LLaMA (400 steps of AdamW on python-docs), about 20 s per "
        "run on one idle CPU core",
    ),
    "llava": FinetunePreset(
        batch_size=16,
        seq_len=2048,
        steps=1000,
        lr_dense=2e-5,
        lr_low_rank=2e-5,
        lr_lora=2e-4,
        heldout_windows=None,
        base_preset=None,
        notes="the paper's LLaVA-v1.5-7B fine-tuning hyper-parameters (lr 2e-5; LoRA 2e-4 as LLaVA's LoRA "
        "script) for a 7B causal LM given with --model, on a GPU",
    ),
}


def parse_method_names(text: str) -> list[str]:
    """``"adamw, lora"`` -> ``["adamw", "lora"]``; unknown names raise :class:`ValueError`."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError(f"no optimizer named in {text!r}; known: {', '.join(METHODS)}")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
    return names


@dataclass
class FinetuneConfig(RunConfig):
    """Options of one ``coap-bench finetune`` run (the command-line flags, same names).

    ``model`` is a local Hugging Face causal-LM folder (with its tokenizer); without it the preset's
    base model is pretrained once and cached under ``cache_dir`` (:mod:`coap_bench.finetune.pretrained`).
    ``corpus`` is a folder of text files; without it the docstrings of ``corpus_packages``
    (:mod:`coap_bench.finetune.corpus`). Options left ``None`` take the preset's values
    (:meth:`resolved`); ``lr`` set applies to every method. ``lora_rank`` ``None`` matches LoRA's
    adapter-plus-optimizer bytes to CoapAdamW's state (:func:`~coap_bench.finetune.lora.matched_lora_rank`).
    ``dtype`` is the precision of the model (``"float32"`` or ``"bf16"``). ``isolate`` (default: on the CPU) runs each run in a fresh process; ``stop_after`` ends each run after
    that many steps of this call (checkpointing as usual), to simulate an interruption.
    """

    presets = FINETUNE_PRESETS
    preset_kind = "fine-tuning"
    recipes = (RECIPE,)
    known_optimizers = METHODS

    preset: str = "small"
    optimizers: tuple[str, ...] = DEFAULT_FINETUNE_OPTIMIZERS
    recipe: str = RECIPE
    model: str | None = None
    cache_dir: str | None = None
    corpus: str | None = None
    corpus_packages: tuple[str, ...] = ("numpy",)
    seq_len: int | None = None
    projection_side: str | None = None
    dtype: str = "float32"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    max_documents: int | None = None
    max_heldout_windows: int | None = None
    pretrain_steps: int | None = None
    threads: int | None = None

    def job_defaults(self) -> dict[str, Any]:
        preset = self.preset_spec
        if self.model is None and preset.base_preset is None:
            raise ValueError(f"the {self.preset} preset fine-tunes a model you give: add --model PATH")
        check_choice(self.dtype, MODEL_DTYPES, "dtype")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")
        return {
            "batch_size": self.batch_size or preset.batch_size,
            "seq_len": self.seq_len or preset.seq_len,
            "corpus_packages": tuple(self.corpus_packages),
            "max_documents": self.max_documents if self.max_documents is not None else preset.corpus_documents,
            "max_heldout_windows": self.max_heldout_windows or preset.heldout_windows,
            "pretrain_steps": self.pretrain_steps or preset.pretrain_steps,
        }

    def recipe_defaults(self) -> LowRankSettings:
        """The paper's LLaVA row (rank ratio 4, T_u 32, lambda 1, update scale 1), GaLore's
        ``update_proj_gap`` equal to T_u (both refresh as often)."""
        update_interval = self.update_interval or PAPER_UPDATE_INTERVAL
        return LowRankSettings(
            rank_ratio=PAPER_RANK_RATIO,
            update_interval=update_interval,
            reproject_factor=PAPER_REPROJECT_FACTOR,
            scale=1.0,
            proj_gap=update_interval,
        )

    def lr_for(self, name: str) -> float:
        """The peak lr of method ``name``: ``lr`` if given, else the preset's lr of its family."""
        if self.lr is not None:
            return self.lr
        preset = self.preset_spec
        family = METHODS[name].family
        if family == "lora":
            return preset.lr_lora
        return preset.lr_dense if family == "dense" else preset.lr_low_rank
