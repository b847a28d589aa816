"""The settings of ``coap-bench step``: shapes, targets, the optimizers' hyper-parameters, and the
optimizers and data built from them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_torch.optim import Layout, layout_of

from ..arguments import parse_shape

FULL_SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))
FULL_RANK = 512
FULL_REFRESH_SHAPE = (2048, 5632)
QUICK_SHAPES = ((512, 512), (512, 1024), (1024, 512))
QUICK_RANK = 128
QUICK_REFRESH_SHAPE = (512, 1024)

# Targets (printed, never asserted).
STATE_BYTES_TOLERANCE = 0  # measured state bytes (step counters excluded) equal the closed form exactly
STEADY_TARGET = 1.25  # steady step <= 1.25 x floor
AMORTISED_TARGET = 1.5  # amortised step <= 1.5 x floor
REFRESH_TARGET = 0.1  # correlation_aware_step, low_cost_svd <= 0.1 x full SVD
CLOSED_FORM_TARGET = 1.0  # closed-form Eq. 2 step faster than autograd
EIGHT_BIT_TARGET = 1.5  # amortised step of an 8-bit optimizer <= 1.5 x its 32-bit counterpart

# Hyper-parameters of the timed steps (the optimizer's defaults).
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2
CORRELATION_LR = 0.1
# CoapAdafactor / CoapAdafactor8bit: a manual lr with a first moment (the paper's setting).
ADAFACTOR_LR = 1e-3
ADAFACTOR_BETA1 = 0.9
# CoapAdamW8bit / CoapAdafactor8bit: the optimizers' defaults.
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096

#: The four COAP optimizers, in the order of the tables; each 8-bit one maps to its 32-bit twin.
COAP_OPTIMIZERS = ("CoapAdamW", "CoapAdamW8bit", "CoapAdafactor", "CoapAdafactor8bit")
EIGHT_BIT_PAIRS = {"CoapAdamW8bit": "CoapAdamW", "CoapAdafactor8bit": "CoapAdafactor"}

#: Prefix of each optimizer's timing keys in the JSON (CoapAdamW keeps its historical ``coap_``).
OPT_KEYS = {
    "CoapAdamW": "coap",
    "CoapAdamW8bit": "coap_adamw8bit",
    "CoapAdafactor": "coap_adafactor",
    "CoapAdafactor8bit": "coap_adafactor8bit",
}


def eight_bit_target_key(name: str) -> str:
    """Summary / target key of the 8-bit optimizer ``name`` against its 32-bit twin."""
    return f"{name}_amortised_le_{EIGHT_BIT_TARGET}x_{EIGHT_BIT_PAIRS[name]}"


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_shape(part) for part in text.split(",") if part.strip())


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}x"


def random_matrix(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    # Drawn on the CPU from a private generator: same data on every device, global RNG untouched.
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def coap_optimizer(param: nn.Parameter, args: argparse.Namespace, name: str = "CoapAdamW") -> torch.optim.Optimizer:
    """One of :data:`COAP_OPTIMIZERS` on ``[param]``, with the benchmark's settings."""
    coap = {
        "rank": args.rank,
        "update_interval": args.update_interval,
        "reproject_factor": args.reproject_factor,
        "correlation_lr": CORRELATION_LR,
    }
    side = getattr(args, "projection_side", None)
    if side is not None:  # else the library's default
        coap["projection_side"] = side
    if state_element_size(args) != 4:  # else the library's default, float32
        coap["state_dtype"] = args.state_dtype
    quant = {"block_size": BLOCK_SIZE, "min_8bit_size": MIN_8BIT_SIZE}
    if name in ("CoapAdamW", "CoapAdamW8bit"):
        cls, extra = (CoapAdamW, {}) if name == "CoapAdamW" else (CoapAdamW8bit, quant)
        return cls([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **coap, **extra)
    if name in ("CoapAdafactor", "CoapAdafactor8bit"):
        cls, extra = (CoapAdafactor, {}) if name == "CoapAdafactor" else (CoapAdafactor8bit, quant)
        return cls(
            [param], lr=ADAFACTOR_LR, beta1=ADAFACTOR_BETA1, relative_step=False, scale_parameter=False, **coap, **extra
        )
    raise ValueError(f"unknown optimizer {name!r}; expected one of {COAP_OPTIMIZERS}")


def state_element_size(args: argparse.Namespace) -> int:
    """Bytes of one value of ``P`` and of the moments not stored 8-bit: 2 with ``--state-dtype bf16``, else 4."""
    return 2 if getattr(args, "state_dtype", "float32") == "bf16" else 4


def optimizer_layout(param: nn.Parameter, opt: torch.optim.Optimizer) -> Layout:
    """Where ``opt`` puts ``P`` on ``param``: the optimizer's own routing of it (its ``canonical_shape``
    (m, n) is the matrix the optimizer works on, ``P`` (n, r) and the moments (m, r))."""
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    return layout_of(param, group)


def coap_layout(shape: Sequence[int], args: argparse.Namespace, rank: int) -> Layout:
    """The layout CoapAdamW with the benchmark's settings and ``rank`` gives a matrix of ``shape``
    (asked of an optimizer built on a parameter on the meta device: nothing is allocated)."""
    param = nn.Parameter(torch.empty(tuple(shape), device="meta"))
    side = getattr(args, "projection_side", None)
    opt = CoapAdamW([param], rank=rank, **({"projection_side": side} if side is not None else {}))
    return optimizer_layout(param, opt)


def fresh_param(weight: Tensor, grad: Tensor) -> nn.Parameter:
    param = nn.Parameter(weight.clone())
    param.grad = grad  # shared and never modified by the optimizers
    return param
