"""``coap-bench loss-scale``: does each optimizer train the same on a sum-reduced loss as on a mean-reduced one?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..environment import torch_threads, usable_cpus
from ..loss_scale import OPTIMIZERS, run_loss_scale

__all__ = ["add_parser", "run"]

_DESCRIPTION = "Gradient scale: does each optimizer train the same on a sum-reduced loss as on a mean-reduced one?"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "loss-scale", help="train with mean- and sum-reduced losses, compare the runs", description=_DESCRIPTION
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--batch", type=int, default=256, help="training and held-out examples (default 256)")
    parser.add_argument(
        "--target-scale",
        type=float,
        default=30.0,
        help="teacher outputs are multiplied by this (default 30: a sum-reduced gradient RMS of ~25)",
    )
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ", ".join(OPTIMIZERS)
    )
    parser.add_argument(
        "--faithful", action="store_true", help="also run the COAP optimizers with correlation_max_norm=None"
    )
    parser.add_argument("--quick", action="store_true", help="20 steps, for a smoke test")
    parser.add_argument(
        "--json", type=Path, default=Path("results/bench_loss_scale.json"), help="where to write the figures"
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    with torch_threads(usable_cpus()):
        return run_loss_scale(args)
