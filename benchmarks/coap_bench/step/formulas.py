"""Closed forms of the state bytes (README, "The four optimizers") for one projected ``(m, n)`` matrix, and
the state bytes each optimizer holds after one step, against them (section 1 of ``coap-bench step``).

``(m, n)`` is the matrix the optimizer works on: ``P`` is (n, r) and the moments (m, r). With the
library's default (``P`` on the smaller side) that is (max, min); with ``P`` on the input side the
weight (out, in) itself; with ``P`` on its first axis the transpose. :func:`measure_state_bytes` asks the optimizer which one it is.

``element_size`` is the bytes of one value of ``P`` and of every moment not stored 8-bit: 4 with the
library's float32 state, 2 with ``state_dtype=torch.bfloat16`` (``coap-bench step --state-dtype bf16``);
an 8-bit moment keeps its float32 absmax either way."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch import optimizer_state_nbytes
from coap_torch.utils import state_nbytes_by_kind

from .settings import BLOCK_SIZE, MIN_8BIT_SIZE, coap_optimizer, fresh_param, optimizer_layout, state_element_size


def moment_8bit_bytes(
    numel: int, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE, element_size: int = 4
) -> int:
    """Bytes of one moment of ``numel`` entries in an 8-bit optimizer: ``numel`` uint8 codes and one
    float32 absmax per block (the last block rounded up) when ``numel >= min_8bit_size``, else
    ``element_size * numel`` (the state's float dtype). This applies to every moment, 1-D accumulators included."""
    if numel >= min_8bit_size:
        return numel + 4 * math.ceil(numel / block_size)
    return element_size * numel


def coap_adamw_bytes(shape: tuple[int, int], rank: int, element_size: int = 4) -> int:
    """``CoapAdamW``: ``4 (2 m r + n r)``: two moments (m, r) and ``P`` (n, r)."""
    m, n = shape
    return element_size * (2 * m * rank + n * rank)


def coap_adamw8bit_bytes(
    shape: tuple[int, int],
    rank: int,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
    element_size: int = 4,
) -> int:
    """``CoapAdamW8bit``: ``4 n r + 2 m r + 8 ceil(m r / 256)``: ``P`` (n, r) in float32, both
    moments (m, r) 8-bit (float32 if ``m r < min_8bit_size``)."""
    m, n = shape
    return element_size * n * rank + 2 * moment_8bit_bytes(m * rank, block_size, min_8bit_size, element_size)


def coap_adafactor_bytes(shape: tuple[int, int], rank: int, beta1: bool = True, element_size: int = 4) -> int:
    """``CoapAdafactor``: ``4 (n r + m r + m + r)`` with ``beta1`` set, ``4 (n r + m + r)`` without:
    ``P`` (n, r), the first moment (m, r), row (m,) and column (r,) accumulators."""
    m, n = shape
    return element_size * (n * rank + (m * rank if beta1 else 0) + m + rank)


def coap_adafactor8bit_bytes(
    shape: tuple[int, int],
    rank: int,
    beta1: bool = True,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
    element_size: int = 4,
) -> int:
    """``CoapAdafactor8bit``: ``4 n r + m r + 4 ceil(m r / 256) + 4 (m + r)`` with ``beta1`` set,
    where an accumulator with ``>= min_8bit_size`` entries is 8-bit too: the row accumulator (m,)
    costs ``m + 4 ceil(m / 256)`` when ``m >= 4096``, the column one (r,) likewise."""
    m, n = shape
    first = moment_8bit_bytes(m * rank, block_size, min_8bit_size, element_size) if beta1 else 0
    rows = moment_8bit_bytes(m, block_size, min_8bit_size, element_size)
    cols = moment_8bit_bytes(rank, block_size, min_8bit_size, element_size)
    return element_size * n * rank + first + rows + cols


def adamw_bytes(shape: tuple[int, int]) -> int:
    """``torch.optim.AdamW``: ``8 m n``."""
    return 8 * shape[0] * shape[1]


#: The closed form of each COAP optimizer, as configured by :func:`coap_optimizer`, of the matrix
#: ``(m, n)`` it works on (``P`` (n, r), moments (m, r)); each takes ``element_size=`` too.
FORMULAS: dict[str, Callable[..., int]] = {
    "CoapAdamW": coap_adamw_bytes,
    "CoapAdamW8bit": coap_adamw8bit_bytes,
    "CoapAdafactor": coap_adafactor_bytes,
    "CoapAdafactor8bit": coap_adafactor8bit_bytes,
}
FORMULA_TEXT = {
    "CoapAdamW": "4*(2*m*r + n*r)",
    "CoapAdamW8bit": "4*n*r + 2*q(m*r)",
    "CoapAdafactor": "4*(n*r + m*r + m + r)",
    "CoapAdafactor8bit": "4*n*r + q(m*r) + q(m) + q(r)",
}
FORMULA_NOTE = (
    "m x n = the matrix the optimizer works on, P (n, r) and moments (m, r): (max x min) with P on the smaller "
    "side (the library's default), the weight (out x in) with P on the input side; q(k) = k + 4*ceil(k/256) "
    "(uint8 codes + fp32 absmax per block) if k >= min_8bit_size = 4096, else 4*k (fp32)"
)


def formula_texts(element_size: int = 4) -> tuple[dict[str, str], str]:
    """:data:`FORMULA_TEXT` and :data:`FORMULA_NOTE` for state of ``element_size`` bytes per value
    (2: ``state_dtype`` bf16, where ``P`` and the moments not stored 8-bit take 2 bytes, absmax 4)."""
    if element_size == 4:
        return dict(FORMULA_TEXT), FORMULA_NOTE
    e = str(element_size)
    texts = {
        "CoapAdamW": f"{e}*(2*m*r + n*r)",
        "CoapAdamW8bit": f"{e}*n*r + 2*q(m*r)",
        "CoapAdafactor": f"{e}*(n*r + m*r + m + r)",
        "CoapAdafactor8bit": f"{e}*n*r + q(m*r) + q(m) + q(r)",
    }
    note = FORMULA_NOTE.replace("else 4*k (fp32)", f"else {e}*k (bf16); P and the moments not stored 8-bit in bf16")
    return texts, note


def formula_bytes(shape: tuple[int, int], rank: int, element_size: int = 4) -> int:
    """CoapAdamW's closed form of the matrix ``(m, n)`` it works on (kept under its old name)."""
    return coap_adamw_bytes(shape, rank, element_size)


def measure_state_bytes(
    name: str, shape: tuple[int, int], args: argparse.Namespace, weight: Tensor, grad: Tensor
) -> tuple[nn.Parameter, torch.optim.Optimizer, dict[str, Any]]:
    """Build optimizer ``name`` on a copy of ``weight``, take one step, and compare its state bytes
    with the closed form of the matrix it works on (its own layout of ``shape``: the weight, or its
    transpose when ``P`` sits on the first axis). Returns the parameter, the optimizer and the row
    for the JSON."""
    param = fresh_param(weight, grad)
    opt = coap_optimizer(param, args, name)
    opt.step()
    layout = optimizer_layout(param, opt)
    worked_on = tuple(layout.canonical_shape)
    measured = optimizer_state_nbytes(opt)
    element_size = state_element_size(args)
    formula = FORMULAS[name](worked_on, args.rank, element_size=element_size)
    row = {
        "transposed": layout.transposed,
        "worked_on_shape": list(worked_on),
        "measured_bytes": measured,
        "measured_bytes_incl_step": optimizer_state_nbytes(opt, include_step=True),
        "formula_bytes": formula,
        "minus_formula_bytes": measured - formula,
        "formula": formula_texts(element_size)[0][name],
        "bytes_by_key": state_nbytes_by_kind(opt),
        "state_shapes": {
            k: [list(v.shape), str(v.dtype).replace("torch.", "")]
            for k, v in opt.state[param].items()
            if isinstance(v, Tensor) and k != "step"
        },
        "equal_formula": measured == formula,
    }
    return param, opt, row
