"""``coap-bench llama``: pre-train a small LLaMA once per optimizer; with ``--distributed`` on every rank of a
``torchrun`` job, with ``--per-layer`` updating each parameter during backward."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import config_from_args, float_at_least, non_negative_int, optimizer_list, positive_int, update_scale
from ..llama import (
    DEFAULT_LLAMA_OPTIMIZERS,
    LLAMA_PRESETS,
    LlamaConfig,
    format_llama_table,
    run_llama,
    write_llama_plots,
)
from ..optimizers import OPTIMIZERS, PROJECTION_SIDES, STATE_DTYPES
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
    llama.add_argument(
        "--preset",
        choices=list(LLAMA_PRESETS),
        default="tiny",
        help="model size (default tiny; micro is for smoke tests)",
    )
    llama.add_argument("--steps", type=positive_int, default=400, help="training steps (default 400)")
    llama.add_argument("--batch-size", type=positive_int, help="sequences per batch (default 16 for tiny)")
    llama.add_argument(
        "--seq-len", type=positive_int, help="tokens per sequence (default: the preset's, at most 128 for tiny)"
    )
    llama.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(DEFAULT_LLAMA_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers, from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_LLAMA_OPTIMIZERS)})",
    )
    llama.add_argument(
        "--recipe",
        choices=["drop-in", "paper"],
        default="paper",
        help="paper (default): the GaLore/COAP LLaMA recipe: attention and MLP matrices projected at "
        "the papers' rank for the preset, embeddings and head dense, T_u 40, lambda 5, "
        "update_proj_gap 200, scale 0.25, lr 1e-2 for low-rank methods and 1e-3 for dense ones; "
        "drop-in: one param group, the library defaults (rank ratio 2), lr 1e-3 for all",
    )
    llama.add_argument(
        "--rank-ratio",
        type=float_at_least(1.0),
        help="rank = min(m, n) // R for every low-rank optimizer, instead of the recipe's rank",
    )
    llama.add_argument("--update-interval", type=positive_int, help="COAP update_interval T_u (default: recipe's)")
    llama.add_argument("--reproject-factor", type=positive_int, help="COAP reproject_factor lambda (default: recipe's)")
    llama.add_argument(
        "--scale",
        type=update_scale,
        help="update scale of projected weights, every low-rank optimizer: a number, or auto (COAP's norm-matched "
        "sqrt(n / r), the same factor per matrix for GaLore / APOLLO); default: recipe's (paper 0.25, drop-in the library's)",
    )
    llama.add_argument("--proj-gap", type=positive_int, help="GaLore / APOLLO update_proj_gap (default: recipe's, 200)")
    llama.add_argument(
        "--correlation-normalize",
        action="store_true",
        help="COAP correlation_normalize (the scale-invariant Eq. 2 step)",
    )
    llama.add_argument(
        "--projection-side",
        choices=list(PROJECTION_SIDES),
        help="where COAP puts P on each projected matrix (default: the library's default)",
    )
    llama.add_argument(
        "--state-dtype",
        choices=list(STATE_DTYPES),
        default="float32",
        help="precision of the COAP optimizers' state between steps: float32 (default, the library's) or bf16 "
        "(P and every moment not stored 8-bit in bfloat16, half the bytes); the other optimizers ignore it",
    )
    llama.add_argument(
        "--weight-decay",
        type=float_at_least(0.0),
        default=0.0,
        help="weight decay of every optimizer (default 0, as in the papers' scripts)",
    )
    llama.add_argument(
        "--lr",
        type=float_at_least(0.0, strict=True),
        help="peak learning rate of every optimizer (default: the recipe's, per optimizer)",
    )
    llama.add_argument(
        "--lr-sweep",
        action="store_true",
        help="run each optimizer at its lr x 0.5, 1, 2 and keep the lowest held-out loss",
    )
    llama.add_argument("--warmup-steps", type=non_negative_int, help="linear warm-up steps (default steps / 10)")
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
    llama.add_argument("--max-documents", type=positive_int, help=argparse.SUPPRESS)
    llama.add_argument("--max-heldout-windows", type=positive_int, help=argparse.SUPPRESS)
    llama.add_argument("--stop-after", type=positive_int, help=argparse.SUPPRESS)
    llama.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the initial weights and batch order (default 0)"
    )
    llama.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
        "held-out loss, with the spread (default 1; single-process runs only)",
    )
    llama.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    llama.add_argument(
        "--in-process",
        action="store_true",
        help="run every optimizer in this process (default on CPU: a fresh process each, so that "
        "peak RSS is per run and a crashing peer cannot end the comparison)",
    )
    llama.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    llama.add_argument("--plots", metavar="DIR", help="write PNG plots to this folder (needs matplotlib)")
    llama.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds; "
        "with --distributed a torch.distributed.checkpoint folder DIR/<optimizer>/) and "
        "continue from there when started again",
    )
    llama.add_argument(
        "--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints (default 100)"
    )
    llama.add_argument("--no-progress", action="store_true", help="no progress bars")
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
