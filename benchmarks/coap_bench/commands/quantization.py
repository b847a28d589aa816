"""``coap-bench quantization``: our 8-bit state codec against bitsandbytes' and torchao's, when installed."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import parse_shape
from ..quantization import run_quantization
from ..quantization.benchmark import FULL_SHAPE, QUICK_SHAPE
from ..report import shape_str

__all__ = ["add_parser", "run"]

_DESCRIPTION = "Compare 8-bit block-wise quantization backends (ours, bitsandbytes, torchao) for optimizer state."


def _moment_shape(text: str) -> tuple[int, int]:
    return parse_shape(text, example="5632x512")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quantization", help="the 8-bit state codec against bitsandbytes' and torchao's", description=_DESCRIPTION
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shape {shape_str(QUICK_SHAPE)}, 3 repeats, 1 warm-up, no torch.compile",
    )
    parser.add_argument(
        "--shape",
        type=_moment_shape,
        default=None,
        help=f"shape of the moment tensor (default: {shape_str(FULL_SHAPE)})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per operation (default: 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed round trips per operation (default: 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs available to this process)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd torchao backend")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench_quantization.json"),
        help="where to write the results (default: results/bench_quantization.json)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    return run_quantization(args)
