"""``coap-bench step``: state bytes, step time and refresh cost of the four COAP optimizers, against
``torch.optim.AdamW`` and the matmul floor, at LLaMA layer shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import parse_shape
from ..optimizers import PROJECTION_SIDES, STATE_DTYPES
from ..report import shape_str
from ..step import run_step
from ..step.settings import FULL_RANK, FULL_REFRESH_SHAPE, FULL_SHAPES, QUICK_RANK, QUICK_SHAPES, parse_shapes

__all__ = ["add_parser", "run"]

_DESCRIPTION = (
    "Benchmark the four COAP optimizers (and CoapAdamW vs torch.optim.AdamW): state bytes, step time, refresh cost."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "step", help="state bytes, step time and refresh cost of the four COAP optimizers", description=_DESCRIPTION
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shapes {','.join(map(shape_str, QUICK_SHAPES))}, rank {QUICK_RANK}, "
        "2 repeats, 1 warm-up, 1 thread",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench_optimizer.json"),
        help="where to write the results (default: results/bench_optimizer.json)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per measurement, the median is reported (default: 5 on CPU, 20 on CUDA, 2 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls before each measurement (default: 2 on CPU, 5 on CUDA, 1 with --quick)",
    )
    parser.add_argument(
        "--inner", type=int, default=None, help="calls averaged into one sample (default: 1 on CPU, 10 on CUDA)"
    )
    parser.add_argument(
        "--svd-step-repeats",
        type=int,
        default=None,
        help="samples of CoapAdamW's SVD-refresh step (default: --repeats)",
    )
    parser.add_argument(
        "--full-svd-repeats",
        type=int,
        default=None,
        help="samples of the full torch.linalg.svd in section 3 (default: --repeats)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: all CPUs available to this process; 1 with --quick)",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help=f"comma-separated MxN shapes (default: {','.join(map(shape_str, FULL_SHAPES))})",
    )
    parser.add_argument("--rank", type=int, default=None, help=f"rank of the COAP optimizers (default: {FULL_RANK})")
    parser.add_argument(
        "--refresh-shape",
        type=parse_shape,
        default=None,
        help=f"shape of section 3 (default: {shape_str(FULL_REFRESH_SHAPE)})",
    )
    parser.add_argument("--refresh-rank", type=int, default=None, help="rank of section 3 (default: --rank)")
    parser.add_argument(
        "--projection-side",
        choices=list(PROJECTION_SIDES),
        help="where the COAP optimizers put P on each matrix (default: the library's default, the smaller side)",
    )
    parser.add_argument(
        "--state-dtype",
        choices=list(STATE_DTYPES),
        default="float32",
        help="precision of the COAP optimizers' state between steps: float32 (default, the library's) or bf16 "
        "(P and every moment not stored 8-bit in bfloat16); torch.optim.AdamW ignores it",
    )
    parser.add_argument("--update-interval", type=int, default=32, help="T_u (default: 32)")
    parser.add_argument("--reproject-factor", type=int, default=5, help="lambda (default: 5)")
    parser.add_argument(
        "--full-cycle", action="store_true", help="also time T_u*lambda consecutive real steps per shape (slow on CPU)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="break the steady step down into its parts and print a torch.profiler op table",
    )
    parser.add_argument("--skip-refresh", action="store_true", help="skip section 3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and gradients")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    return run_step(args)
