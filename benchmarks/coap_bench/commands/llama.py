"""``coap-bench llama``: pre-train a small LLaMA once per optimizer; with ``--distributed`` on every rank of a
``torchrun`` job, with ``--per-layer`` updating each parameter during backward."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import (
    DISTRIBUTED_CHECKPOINT_HELP,
    add_optimizers_flag,
    add_run_flags,
    config_from_args,
    positive_int,
)
from ..llama import (
    LlamaConfig,
    format_llama_table,
    run_llama,
    write_llama_plots,
)
from ..outputs import run_and_report

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    llama = commands.add_parser(
        "llama",
        help="pre-train a small LLaMA once per optimizer on an offline corpus and print a side-by-side table",
        description=(
            "Pre-train a LLaMA model (transformers' LlamaForCausalLM, built locally) on Python's own documentation "
            "(or a folder of text files) with a locally trained BPE tokenizer, once per optimizer, with the same "
            "initial weights, batches and learning-rate schedule (linear warm-up, cosine to 10%), and print "
            "memory, speed, training and held-out loss side by side."
        ),
    )
    add_run_flags(
        llama,
        LlamaConfig,
        {
            "--preset": "model size (default tiny; micro is for smoke tests)",
            "--steps": "training steps (default 400)",
            "--batch-size": "sequences per batch (default 16 for tiny)",
            "--seq-len": "tokens per sequence (default: the preset's, at most 128 for tiny)",
        },
    )
    add_optimizers_flag(llama, LlamaConfig)
    add_run_flags(
        llama,
        LlamaConfig,
        {
            "--recipe": "paper (default): the GaLore/COAP LLaMA recipe: attention and MLP matrices projected at "
            "the papers' rank for the preset, embeddings and head dense, T_u 40, lambda 5, "
            "update_proj_gap 200, scale 0.25, lr 1e-2 for low-rank methods and 1e-3 for dense ones; "
            "drop-in: one param group, the library defaults (rank ratio 2), lr 1e-3 for all",
            "--rank-ratio": "rank = min(m, n) // R for every low-rank optimizer, instead of the recipe's rank",
            "--update-interval": None,
            "--reproject-factor": None,
            "--scale": "update scale of projected weights, every low-rank optimizer: a number, or auto (COAP's "
            "norm-matched sqrt(n / r), the same factor per matrix for GaLore / APOLLO); default: recipe's "
            "(paper 0.25, drop-in the library's)",
            "--proj-gap": "GaLore / APOLLO update_proj_gap (default: recipe's, 200)",
            "--correlation-normalize": None,
            "--projection-side": None,
            "--state-dtype": None,
            "--weight-decay": "weight decay of every optimizer (default 0, as in the papers' scripts)",
            "--lr": "peak learning rate of every optimizer (default: the recipe's, per optimizer)",
            "--lr-sweep": None,
            "--warmup-steps": None,
        },
    )
    llama.add_argument("--data-dir", metavar="PATH", help="train on this folder of *.txt / *.md files instead")
    llama.add_argument(
        "--c4",
        action="store_true",
        help="the papers' data: English C4 streamed from the Hugging Face Hub with the t5-base "
        "tokenizer and the preset's sequence length (needs internet and `pip install datasets`)",
    )
    llama.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="vocabulary of the local BPE tokenizer (default 4096)"
    )
    add_run_flags(
        llama,
        LlamaConfig,
        {
            "--max-documents": None,
            "--max-heldout-windows": None,
            "--stop-after": None,
            "--seed": "seed of the initial weights and batch order (default 0)",
            "--seeds": "train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
            "held-out loss, with the spread (default 1; single-process runs only)",
            "--device": None,
            "--in-process": None,
            "--json": None,
            "--plots": "write PNG plots to this folder (needs matplotlib)",
            "--checkpoint-dir": DISTRIBUTED_CHECKPOINT_HELP,
            "--checkpoint-every": None,
            "--no-progress": None,
        },
    )
    llama.add_argument(
        "--distributed",
        choices=["ddp", "fsdp2"],
        help="train on every rank of a torchrun job (gloo on CPU, NCCL on GPU) and report per-rank "
        "optimizer state and communication: torchrun --nproc-per-node 2 -m coap_bench.cli "
        "llama --distributed fsdp2 ...",
    )
    llama.add_argument(
        "--per-layer",
        action="store_true",
        help="update each parameter during backward (COAP optimizers; single process or fsdp2) and "
        "report the peak-memory saving",
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = config_from_args(LlamaConfig, args, argv)
    if config.distributed or config.per_layer:
        if config.seeds > 1:
            raise ValueError(
                f"--seeds {config.seeds} is for single-process runs; run --distributed / --per-layer "
                "once per --seed instead"
            )
        return _run_distributed_or_per_layer(config, args)
    return run_and_report(lambda: run_llama(config), args, format_llama_table, write_llama_plots)


def _run_distributed_or_per_layer(config: LlamaConfig, args: argparse.Namespace) -> int:
    """``coap-bench llama`` with ``--distributed`` and/or ``--per-layer``."""
    from ..llama_distributed import (
        format_distributed_table,
        launch_environment,
        measure_per_layer_saving,
        run_llama_distributed,
    )

    if config.distributed is None:  # --per-layer on one process: the usual runs, then the saving

        def job() -> dict[str, Any]:
            run = run_llama(config)
            run["per_layer_saving"] = measure_per_layer_saving(config)
            return run

        return run_and_report(job, args, format_distributed_table, write_llama_plots)
    rank, _, _ = launch_environment()
    if rank != 0:
        run_llama_distributed(config)
        return 0
    return run_and_report(lambda: run_llama_distributed(config), args, format_distributed_table, write_llama_plots)
