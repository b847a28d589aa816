"""``coap-bench``: the command line of the benchmarks.

``coap-bench`` alone runs ``coap-bench digits`` with its defaults; ``coap-bench --steps 100``
is ``coap-bench digits --steps 100``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._deps import MissingExtraError
from .optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, parse_optimizer_names

__all__ = ["build_parser", "main"]

_COMMANDS = ("digits",)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _float_at_least(minimum: float, *, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    return parse


def _optimizer_list(text: str) -> list[str]:
    try:
        return parse_optimizer_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-bench",
        description="Compare COAP optimizers with their dense counterparts on real data.",
        epilog="Without a command, runs `digits` (any options given are passed to it).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    digits = commands.add_parser(
        "digits",
        help="train a small CNN on scikit-learn's digits once per optimizer and print a side-by-side table",
        description=(
            "Train a small CNN (a Tucker-projected 3x3 conv, projected linear layers) on scikit-learn's "
            "bundled digits (8x8, upsampled to 16x16; 20% held out, stratified) once per optimizer, with "
            "the same initial weights and batches, and print memory, speed, loss and accuracy side by side."
        ),
    )
    digits.add_argument("--steps", type=_positive_int, default=400, help="training steps (default 400)")
    digits.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    digits.add_argument(
        "--lr",
        type=_float_at_least(0.0, strict=True),
        default=1e-3,
        help="learning rate of every optimizer (default 1e-3)",
    )
    digits.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(DEFAULT_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers to compare, from: {', '.join(OPTIMIZERS)} (default: all)",
    )
    digits.add_argument(
        "--rank-ratio",
        type=_float_at_least(1.0),
        default=2.0,
        help="COAP rank_ratio_matrix and rank_ratio_cnn (default 2)",
    )
    digits.add_argument("--update-interval", type=_positive_int, default=32, help="COAP update_interval (default 32)")
    digits.add_argument("--reproject-factor", type=_positive_int, default=5, help="COAP reproject_factor (default 5)")
    digits.add_argument(
        "--correlation-normalize", action="store_true", help="COAP correlation_normalize (scale-invariant Eq. 2 step)"
    )
    digits.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the initial weights and batch order (default 0)"
    )
    digits.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    digits.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    digits.add_argument("--plots", metavar="DIR", help="write a loss-curve PNG to this folder (needs matplotlib)")
    digits.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _digits(args: argparse.Namespace) -> int:
    import torch

    from .digits import DigitsConfig, run_digits
    from .report import format_table, write_json, write_plots

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
    started = time.perf_counter()
    run = run_digits(config)
    run["config"]["total_seconds"] = time.perf_counter() - started
    print(format_table(run), flush=True)
    if args.json:
        path = write_json(run, args.json)
        print(f"results written to {path}", file=sys.stderr)
    if args.plots:
        path = write_plots(run, args.plots)
        if path is None:
            print(
                'no plots written: matplotlib is not installed (pip install matplotlib, or "coap-torch[examples]")',
                file=sys.stderr,
            )
        else:
            print(f"loss curves written to {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coap-bench``; returns the exit status."""
    args_list = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not args_list or (args_list[0] not in _COMMANDS and args_list[0] not in ("-h", "--help")):
        args_list = ["digits", *args_list]
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return _digits(args)
    except MissingExtraError as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    except ValueError as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    return 0  # unreachable: parser.exit raises SystemExit


if __name__ == "__main__":
    sys.exit(main())
