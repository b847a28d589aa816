"""``coap-bench finetune``: fine-tune a pretrained causal LM on a second offline corpus once per method
(full AdamW, AdamW8bit, GaLore, CoapAdamW, LoRA) and print a side-by-side table."""

from __future__ import annotations

import argparse

from ..arguments import add_optimizers_flag, add_run_flags, config_from_args, float_at_least, positive_int
from ..finetune import (
    FinetuneConfig,
    format_finetune_table,
    run_finetune,
    write_finetune_plots,
)
from ..finetune.presets import MODEL_DTYPES, parse_method_names
from ..outputs import run_and_report

__all__ = ["add_parser", "run"]


def _methods(text: str) -> list[str]:
    try:
        return parse_method_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _packages(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected package names like numpy,sklearn, got {text!r}")
    return names


def add_parser(commands: argparse._SubParsersAction) -> None:
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a pretrained causal LM on a second offline corpus once per method (COAP, AdamW, "
        "AdamW8bit, GaLore, LoRA) and print a side-by-side table",
        description=(
            "Fine-tune a pretrained causal LM (by default the tiny LLaMA that `coap-bench llama` pretrains on "
            "Python's documentation, made once and cached; or any local Hugging Face folder) on a second "
            "offline corpus (the docstrings of installed packages, or a folder of text), once per method, with "
            "the same weights, batches and learning-rate schedule, and print memory (optimizer state, LoRA "
            "adapters), speed, and held-out loss side by side, with the base model's held-out loss as reference."
        ),
    )
    add_run_flags(
        finetune,
        FinetuneConfig,
        {
            "--preset": "small (default): the tiny LLaMA, batch 8 x 64, 100 steps; llava: the paper's LLaVA-v1.5-7B "
            "fine-tuning settings for a model given with --model on a GPU; micro: smoke tests",
        },
    )
    finetune.add_argument(
        "--model",
        metavar="PATH",
        help="fine-tune this local Hugging Face causal-LM folder (with its tokenizer) instead of the default",
    )
    finetune.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the default base model is cached (default: $COAP_BENCH_FINETUNE_CACHE, else "
        "~/.cache/coap-bench/finetune)",
    )
    finetune.add_argument("--corpus", metavar="PATH", help="fine-tune on this folder of *.txt / *.md files instead")
    finetune.add_argument(
        "--corpus-packages",
        type=_packages,
        default=("numpy",),
        metavar="A,B",
        help="installed packages whose docstrings are the default corpus (default numpy)",
    )
    add_run_flags(
        finetune,
        FinetuneConfig,
        {
            "--steps": "fine-tuning steps (default: the preset's)",
            "--batch-size": "sequences per batch (default: the preset's)",
            "--seq-len": "tokens per sequence (default: the preset's)",
        },
    )
    add_optimizers_flag(finetune, FinetuneConfig, _methods, noun="methods")
    add_run_flags(
        finetune,
        FinetuneConfig,
        {
            "--rank-ratio": "rank = min(m, n) // R for COAP and GaLore (default 4, the paper's LLaVA row)",
            "--update-interval": "COAP update_interval T_u (default 32)",
            "--reproject-factor": "COAP reproject_factor lambda (default 1)",
            "--scale": "update scale of projected weights, COAP and GaLore: a number, or auto (default 1)",
            "--proj-gap": "GaLore update_proj_gap (default: T_u)",
            "--projection-side": None,
            "--state-dtype": "precision of COAP's state between steps: float32 (default) or bf16",
        },
    )
    finetune.add_argument(
        "--dtype",
        choices=list(MODEL_DTYPES),
        default="float32",
        help="precision of the model's weights, gradients and activations: float32 (default) or bf16 (the "
        "paper's LLaVA run)",
    )
    finetune.add_argument(
        "--lora-rank",
        type=positive_int,
        help="LoRA rank (default: the rank whose adapter + AdamW state matches CoapAdamW's state)",
    )
    finetune.add_argument(
        "--lora-alpha", type=float_at_least(0.0, strict=True), help="LoRA alpha (default 2 x the rank)"
    )
    add_run_flags(
        finetune,
        FinetuneConfig,
        {
            "--weight-decay": "weight decay of every method (default 0, as LLaVA's fine-tuning)",
            "--lr": "peak learning rate of every method (default: the preset's per family: dense, low-rank, LoRA)",
            "--lr-sweep": "run each method at its lr x 0.5, 1, 2 and keep the lowest held-out loss",
            "--warmup-steps": None,
        },
    )
    finetune.add_argument(
        "--pretrain-steps",
        type=positive_int,
        help="AdamW steps of the default base model's pretraining (default: coap-bench llama's 400)",
    )
    add_run_flags(
        finetune,
        FinetuneConfig,
        {
            "--max-documents": None,
            "--max-heldout-windows": None,
            "--stop-after": None,
            "--seed": "seed of the batch order and LoRA's init (default 0)",
            "--seeds": "run each method (and lr) with seeds SEED, SEED+1, ... and report the mean held-out loss "
            "(default 1)",
            "--device": None,
            "--threads": None,
            "--in-process": "run every method in this process (default on CPU: a fresh process each, so that peak "
            "RSS is per run and a crashing peer cannot end the comparison)",
            "--json": None,
            "--plots": "write PNG plots to this folder (needs matplotlib)",
            "--checkpoint-dir": None,
            "--checkpoint-every": None,
            "--no-progress": None,
        },
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = config_from_args(FinetuneConfig, args, argv)
    return run_and_report(lambda: run_finetune(config), args, format_finetune_table, write_finetune_plots)
