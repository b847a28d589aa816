"""Argument checks. Every message names the argument and the offending value."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def _is_real(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(
            f"Invalid {name}: a tensor of shape {tuple(value.shape)} (a tensor {name} must hold one element)"
        )
    if not _is_real(value) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not allow_inf and math.isinf(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def positive_or_inf(name: str, value: Any) -> None:
    """A bound where ``inf`` means "no bound" (``clip_threshold``, ``correlation_max_norm``)."""
    if _number(name, value, allow_inf=True) <= 0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


def non_positive(name: str, value: Any) -> None:
    if _number(name, value) > 0:
        raise ValueError(f"Invalid {name}: {value} (must be <= 0)")


def unit_interval(name: str, value: Any) -> None:
    if not 0.0 <= _number(name, value) < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


def positive_or_auto(name: str, value: Any) -> None:
    """A factor that may also be ``"auto"`` (the update ``scale``)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"Invalid {name}: {value!r} (must be 'auto' or a number > 0)")
        return
    positive(name, value)


def at_least_one(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if _number(name, value) < 1:
        raise ValueError(f"Invalid {name}: {value} (must be >= 1)")


def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        # ValueError like every other bad option value (torch's convention for optimizer arguments).
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")  # noqa: TRY004


def betas(value: Any, name: str = "betas") -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair of floats)")
    for index, beta in enumerate(value):
        if not 0.0 <= _number(f"{name}[{index}]", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")


def unsupported_flag(name: str, value: Any, optimizer: str) -> None:
    """Torch implementation switches we do not implement: refuse them rather than ignore them."""
    if value:
        raise ValueError(f"{optimizer} does not support {name}={value!r}; leave it at its default")


def parameter(param: torch.Tensor, index: int) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"parameter {index} is a {type(param).__name__}, not a torch.Tensor")
    if param.is_complex():
        raise ValueError(
            f"parameter {index} of shape {tuple(param.shape)} has dtype {param.dtype}: complex parameters are not "
            "supported. torch.optim.AdamW trains a complex tensor as its real view, whose last axis holds the real "
            "and imaginary parts, and a real projection of that view would mix them; optimize complex parameters "
            "with torch.optim.AdamW in an optimizer of their own"
        )
    if not param.is_floating_point():
        raise ValueError(
            f"parameter {index} of shape {tuple(param.shape)} has dtype {param.dtype}; "
            "only real floating-point parameters can be optimized"
        )
    if param.layout != torch.strided:
        raise ValueError(
            f"parameter {index} of shape {tuple(param.shape)} has layout {param.layout}; only dense tensors are supported"
        )


class SparseGradientError(RuntimeError, ValueError):
    """Raised for a sparse gradient (a ``RuntimeError`` as in torch, and a ``ValueError``)."""
