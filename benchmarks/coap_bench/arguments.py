"""Command-line values shared by the ``coap-bench`` commands: checked number and shape types, and a
job's config dataclass built from its parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

from .optimizers import parse_optimizer_names

__all__ = [
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
