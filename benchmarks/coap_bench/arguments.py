"""Command-line values shared by the ``coap-bench`` commands: checked number and shape types, the flags the
training commands share (:func:`add_run_flags`), and a job's config dataclass built from its parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .optimizers import PROJECTION_SIDES, STATE_DTYPES, parse_optimizer_names

__all__ = [
    "DISTRIBUTED_CHECKPOINT_HELP",
    "RUN_FLAGS",
    "add_optimizers_flag",
    "add_run_flags",
    "config_from_args",
    "float_at_least",
    "non_negative_int",
    "optimizer_list",
    "parse_shape",
    "positive_int",
    "update_scale",
]

T = TypeVar("T")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def float_at_least(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # inf and nan pass no comparison test below, and train to nan
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    return parse


def update_scale(text: str) -> float | str:
    """``--scale``: ``auto`` (COAP's norm-matched scale) or a number > 0."""
    if text == "auto":
        return text
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None
    return float_at_least(0.0, strict=True)(text)


def optimizer_list(text: str) -> list[str]:
    try:
        return parse_optimizer_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_shape(text: str, example: str = "2048x5632") -> tuple[int, int]:
    """``"MxN"`` as ``(M, N)``, for argparse; ``example`` is the shape shown in the error message."""
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a shape like {example}, got {text!r}") from exc
    if m <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"shape sides must be positive, got {text!r}")
    return m, n


def config_from_args(config_class: type[T], args: argparse.Namespace, argv: list[str]) -> T:
    """A job's config dataclass from its parsed flags: each field from the flag of the same name,
    ``isolate`` from ``--in-process``, ``progress`` from ``--no-progress``, and the command line."""
    import torch

    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {args.device!r}: {error}") from None
    flags = vars(args)
    given = {field.name: flags[field.name] for field in dataclasses.fields(config_class) if field.name in flags}
    given["optimizers"] = tuple(args.optimizers)
    return config_class(
        **given, isolate=False if args.in_process else None, progress=not args.no_progress, argv=["coap-bench", *argv]
    )


#: The flags the training commands share: argparse's options for each and, where every command says the
#: same, its help. The value of a flag that sets a field of the job's config defaults to that field's.
RUN_FLAGS: dict[str, dict[str, Any]] = {
    "--preset": {},
    "--steps": {"type": positive_int},
    "--batch-size": {"type": positive_int},
    "--seq-len": {"type": positive_int},
    "--recipe": {},
    "--rank-ratio": {"type": float_at_least(1.0)},
    "--update-interval": {"type": positive_int, "help": "COAP update_interval T_u (default: recipe's)"},
    "--reproject-factor": {"type": positive_int, "help": "COAP reproject_factor lambda (default: recipe's)"},
    "--scale": {"type": update_scale},
    "--proj-gap": {"type": positive_int},
    "--correlation-normalize": {
        "action": "store_true",
        "help": "COAP correlation_normalize (the scale-invariant Eq. 2 step)",
    },
    "--projection-side": {
        "choices": list(PROJECTION_SIDES),
        "help": "where COAP puts P on each projected matrix (default: the library's default)",
    },
    "--state-dtype": {
        "choices": list(STATE_DTYPES),
        "help": "precision of the COAP optimizers' state between steps: float32 (default, the library's) or bf16 "
        "(P and every moment not stored 8-bit in bfloat16, half the bytes); the other optimizers ignore it",
    },
    "--weight-decay": {"type": float_at_least(0.0)},
    "--lr": {"type": float_at_least(0.0, strict=True)},
    "--lr-sweep": {
        "action": "store_true",
        "help": "run each optimizer at its lr x 0.5, 1, 2 and keep the lowest held-out loss",
    },
    "--warmup-steps": {"type": non_negative_int, "help": "linear warm-up steps (default steps / 10)"},
    "--image-dir": {"metavar": "PATH"},
    "--samples": {"type": positive_int},
    "--sample-steps": {"type": positive_int},
    "--eval-every": {
        "type": non_negative_int,
        "help": "also measure the held-out loss before training and every N steps (default: at the end)",
    },
    # Flags for tests and for simulating interruptions: kept out of --help.
    **{
        flag: {"type": positive_int, "help": argparse.SUPPRESS}
        for flag in (
            "--max-documents",
            "--max-heldout-windows",
            "--max-images",
            "--heldout-repeats",
            "--classifier-steps",
            "--stop-after",
        )
    },
    "--seed": {"type": non_negative_int},
    "--seeds": {"type": positive_int},
    "--device": {"help": "torch device to train on (default cpu)"},
    "--threads": {
        "type": positive_int,
        "help": "torch threads of each run (default: torch's; 1 gives steadier times on a busy machine)",
    },
    "--in-process": {
        "action": "store_true",
        "help": "run every optimizer in this process (default on CPU: a fresh process each, so that peak RSS is "
        "per run and a crashing peer cannot end the comparison)",
    },
    "--json": {"metavar": "PATH", "help": "write the configuration and all results to this JSON file"},
    "--plots": {"metavar": "DIR"},
    "--checkpoint-dir": {
        "metavar": "DIR",
        "help": "save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds) and continue "
        "from there when started again",
    },
    "--checkpoint-every": {"type": positive_int, "help": "steps between checkpoints (default 100)"},
    "--no-progress": {"action": "store_true", "help": "no progress bars"},
}
#: ``--checkpoint-dir`` of the commands that also train with ``--distributed``.
DISTRIBUTED_CHECKPOINT_HELP = (
    "save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds; with --distributed a "
    "torch.distributed.checkpoint folder DIR/<optimizer>/) and continue from there when started again"
)
#: The flags whose choices are the job's own, and the attribute of its config class that lists them.
_JOB_CHOICES = {"--preset": "presets", "--recipe": "recipes"}


def add_run_flags(parser: argparse.ArgumentParser, config_class: type, flags: Mapping[str, str | None]) -> None:
    """Add ``flags`` (names of :data:`RUN_FLAGS`) to ``parser`` in their order, each with the help given
    (``None``: the shared help). A flag that sets a field of ``config_class`` gets that field's default;
    ``--preset`` and ``--recipe`` choose from the config class's ``presets`` and ``recipes``."""
    defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    for flag, help_text in flags.items():
        options = dict(RUN_FLAGS[flag])
        if help_text is not None:
            options["help"] = help_text
        dest = flag.removeprefix("--").replace("-", "_")
        if dest in defaults:
            options["default"] = defaults[dest]
        if flag in _JOB_CHOICES:
            options["choices"] = list(getattr(config_class, _JOB_CHOICES[flag]))
        parser.add_argument(flag, **options)


def add_optimizers_flag(
    parser: argparse.ArgumentParser,
    config_class: type,
    parse: Callable[[str], list[str]] = optimizer_list,
    noun: str = "optimizers",
) -> None:
    """``--optimizers``: the names ``parse`` accepts, among the config class's ``known_optimizers``; by default
    the config's ``optimizers``."""
    default = config_class.optimizers
    parser.add_argument(
        "--optimizers",
        type=parse,
        default=list(default),
        metavar="A,B",
        help=f"comma-separated {noun}, from: {', '.join(config_class.known_optimizers)} (default: {','.join(default)})",
    )
