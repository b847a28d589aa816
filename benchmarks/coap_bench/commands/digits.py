"""``coap-bench digits`` (also ``coap-bench`` alone): a small CNN on scikit-learn's digits, once per optimizer."""

from __future__ import annotations

import argparse

from ..arguments import float_at_least, non_negative_int, optimizer_list, positive_int
from ..optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
from ..outputs import run_and_report

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    digits = commands.add_parser(
        "digits",
        help="train a small CNN on scikit-learn's digits once per optimizer and print a side-by-side table",
        description=(
            "Train a small CNN (a Tucker-projected 3x3 conv, projected linear layers) on scikit-learn's "
            "bundled digits (8x8, upsampled to 16x16; 20% held out, stratified) once per optimizer, with "
            "the same initial weights and batches, and print memory, speed, loss and accuracy side by side."
        ),
    )
    digits.add_argument("--steps", type=positive_int, default=400, help="training steps (default 400)")
    digits.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    digits.add_argument(
        "--lr",
        type=float_at_least(0.0, strict=True),
        default=1e-3,
        help="learning rate of every optimizer (default 1e-3)",
    )
    digits.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(DEFAULT_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers to compare, from: {', '.join(OPTIMIZERS)} (default: all)",
    )
    digits.add_argument(
        "--rank-ratio",
        type=float_at_least(1.0),
        default=2.0,
        help="COAP rank_ratio_matrix and rank_ratio_cnn (default 2)",
    )
    digits.add_argument("--update-interval", type=positive_int, default=32, help="COAP update_interval (default 32)")
    digits.add_argument("--reproject-factor", type=positive_int, default=5, help="COAP reproject_factor (default 5)")
    digits.add_argument(
        "--correlation-normalize", action="store_true", help="COAP correlation_normalize (scale-invariant Eq. 2 step)"
    )
    digits.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the initial weights and batch order (default 0)"
    )
    digits.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    digits.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    digits.add_argument("--plots", metavar="DIR", help="write a loss-curve PNG to this folder (needs matplotlib)")
    digits.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from ..digits import DigitsConfig, run_digits
    from ..report import format_table, write_plots

    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {args.device!r}: {error}") from None
    config = DigitsConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizers=tuple(args.optimizers),
        rank_ratio=args.rank_ratio,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        correlation_normalize=args.correlation_normalize,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    return run_and_report(lambda: run_digits(config), args, format_table, write_plots)
