"""The optimizer database: one :class:`OptimizerInfo` per optimizer configuration the generic tests run.

In the style of torch's ``OptimizerInfo`` (``torch/testing/_internal/common_optimizers.py``): each
entry says how to build the optimizer for the tests' small net, which other constructor inputs
must work, which inputs must be refused and with what message, which parameter dtypes it trains
and which features it supports. ``tests/optim/test_optim_db.py`` turns the table into tests; the
contract tests elsewhere parametrize over :data:`OPTIM_DB` (or its :data:`OPTIMIZERS` view).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

__all__ = ["COAP_KWARGS", "ENGINE_OPTIMIZERS", "OPTIMIZERS", "OPTIM_DB", "ErrorInput", "OptimizerInfo", "info"]

#: COAP options that make a few steps of the small net exercise everything: Tucker-2 on the conv
#: kernel, Eq. 2 steps at 3 and 9, low-cost SVD refreshes at 6 and 12.
COAP_KWARGS = {
    "lr": 3e-3,
    "rank_ratio_matrix": 2,
    "rank_ratio_cnn": 2,
    "update_interval": 3,
    "reproject_factor": 2,
    "min_conv_numel": 0,
}
_COAP_ONLY = {k: v for k, v in COAP_KWARGS.items() if k != "lr"}


@dataclass(frozen=True)
class ErrorInput:
    """Constructor keywords that must raise ``error`` with a message matching ``match``.

    ``group``: the keywords are param-group options, so ``add_param_group`` must refuse them too,
    with the group's index in the message, and keep no part of the group.
    """

    kwargs: dict[str, Any]
    match: str
    error: type[Exception] = ValueError
    group: bool = True

    def __str__(self) -> str:
        return ",".join(f"{k}={v!r}" for k, v in self.kwargs.items())


@dataclass(frozen=True)
class OptimizerInfo:
    """How to build one optimizer configuration, and what the generic tests expect of it."""

    name: str
    cls: type[torch.optim.Optimizer]
    #: The tests' configuration: keywords on top of which every test's overrides go.
    config: dict[str, Any]
    #: "adam" or "adafactor": the moment rule in the subspace.
    rule: str
    #: Moments stored as uint8 codes (with float32 absmax blocks) above ``min_8bit_size``.
    eight_bit: bool = False
    #: Whether a first moment (``exp_avg``) is kept.
    first_moment: bool = True
    #: Other constructor inputs that must build and train.
    constructor_inputs: tuple[dict[str, Any], ...] = ()
    error_inputs: tuple[ErrorInput, ...] = ()
    #: Parameter dtypes it trains (state stays float32 below float32, float64 at float64).
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    #: Optional features: "amsgrad", "maximize", "relative_step", "tensor_lr".
    supports: frozenset[str] = field(default_factory=frozenset)

    def make(self, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.config, **overrides})

    def float_state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the floating-point state (not 8-bit) it keeps for a parameter of ``param_dtype``."""
        if self.config.get("state_dtype") in (torch.bfloat16, "bfloat16", "bf16"):
            return torch.bfloat16
        return torch.float64 if param_dtype == torch.float64 else torch.float32

    def __str__(self) -> str:
        return self.name


# Refused by every optimizer: the COAP options, validated by one shared description.
_COAP_ERRORS = (
    ErrorInput({"rank": 0}, r"rank: 0"),
    ErrorInput({"rank": -3}, r"rank: -3"),
    ErrorInput({"rank": 2.5}, r"rank: 2\.5"),
    ErrorInput({"rank_ratio_matrix": 0.5}, r"rank_ratio_matrix: 0\.5"),
    ErrorInput({"rank_ratio_matrix": float("inf")}, r"rank_ratio_matrix must be a finite number"),
    ErrorInput({"rank_ratio_cnn": 0.0}, r"rank_ratio_cnn: 0\.0"),
    ErrorInput({"update_interval": 0}, r"update_interval: 0"),
    ErrorInput({"update_interval": -32}, r"update_interval: -32"),
    ErrorInput({"reproject_factor": 0}, r"reproject_factor: 0"),
    ErrorInput({"correlation_lr": -0.1}, r"correlation_lr: -0\.1"),
    ErrorInput({"correlation_lr": float("inf")}, r"correlation_lr must be a finite number"),
    ErrorInput({"correlation_max_norm": 0.0}, r"correlation_max_norm: 0\.0"),
    ErrorInput({"correlation_normalize": "yes"}, r"correlation_normalize: 'yes'"),
    ErrorInput({"scale": 0.0}, r"scale: 0\.0"),
    ErrorInput({"scale": float("inf")}, r"scale must be a finite number"),
    ErrorInput({"scale": "Auto"}, r"scale: 'Auto' \(must be 'auto' or a number > 0\)"),
    ErrorInput({"scale": "2"}, r"scale: '2'"),
    ErrorInput({"min_conv_numel": -1}, r"min_conv_numel: -1"),
    ErrorInput({"seed": -1}, r"seed: -1"),
    ErrorInput({"coap": "no"}, r"coap: 'no'"),
    ErrorInput({"projection_side": "left"}, r"projection_side: 'left'"),
    ErrorInput({"conv_projection": "output"}, r"conv_projection: 'output'"),
    ErrorInput({"state_dtype": torch.float16}, r"state_dtype: torch\.float16"),
    ErrorInput({"state_dtype": "half"}, r"state_dtype: 'half'"),
)

_ADAMW_ERRORS = (
    ErrorInput({"lr": -1e-3}, r"lr: -0\.001"),
    ErrorInput({"lr": float("nan")}, r"lr must be a real number"),
    ErrorInput({"lr": float("inf")}, r"lr must be a finite number"),
    ErrorInput({"lr": torch.tensor([1e-3, 2e-3])}, r"Invalid lr: a tensor of shape \(2,\)"),
    ErrorInput({"betas": (1.0, 0.999)}, r"beta parameter at index 0: 1\.0"),
    ErrorInput({"betas": (0.9, -0.1)}, r"beta parameter at index 1: -0\.1"),
    ErrorInput({"betas": (0.9,)}, r"betas"),
    ErrorInput({"eps": -1.0}, r"eps: -1\.0"),
    ErrorInput({"eps": float("inf")}, r"eps must be a finite number"),
    ErrorInput({"weight_decay": -0.1}, r"weight_decay: -0\.1"),
    ErrorInput({"weight_decay": float("inf")}, r"weight_decay must be a finite number"),
    ErrorInput({"amsgrad": 1}, r"amsgrad: 1"),
    # torch.optim.AdamW's implementation switches: refused with the reason, constructor only.
    ErrorInput({"fused": True}, r"fused=True", group=False),
    ErrorInput({"foreach": True}, r"foreach=True", group=False),
    ErrorInput({"capturable": True}, r"capturable=True", group=False),
    ErrorInput({"differentiable": True}, r"differentiable=True", group=False),
)

_ADAFACTOR_ERRORS = (
    ErrorInput({"lr": 1e-3, "relative_step": True}, r"Cannot combine manual lr=0\.001 and relative_step=True"),
    ErrorInput({"relative_step": False}, r"lr=None requires relative_step=True"),
    ErrorInput(
        {"lr": 1e-3, "relative_step": False, "warmup_init": True}, r"warmup_init=True requires relative_step=True"
    ),
    ErrorInput({"lr": 1e-3, "warmup_init": True}, r"warmup_init=True requires relative_step=True"),
    ErrorInput({"relative_step": 1}, r"relative_step: 1"),
    ErrorInput({"lr": -1e-3, "relative_step": False}, r"lr: -0\.001"),
    ErrorInput({"decay_rate": 0.5}, r"decay_rate: 0\.5"),
    ErrorInput({"beta1": 1.0}, r"beta1: 1\.0"),
    ErrorInput({"clip_threshold": 0.0}, r"clip_threshold: 0\.0"),
    ErrorInput({"eps": (1e-30,)}, r"eps"),
    ErrorInput({"eps": (-1.0, 1e-3)}, r"eps\[0\]: -1\.0"),
    ErrorInput({"weight_decay": -1.0}, r"weight_decay: -1\.0"),
    ErrorInput({"scale_parameter": 1}, r"scale_parameter: 1"),
)

_8BIT_ERRORS = (
    ErrorInput({"block_size": 0}, r"block_size: 0"),
    ErrorInput({"min_8bit_size": -1}, r"min_8bit_size: -1"),
)

_ADAMW_INPUTS = (
    {},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6},
    {"lr": torch.tensor(3e-3)},
    {"lr": torch.tensor([3e-3])},
    {"lr": torch.tensor([[3e-3]])},
    {"rank": 5, "rank_ratio_matrix": None, "rank_ratio_cnn": None, "correlation_normalize": True},
    {"correlation_max_norm": None, "scale": 0.5},
    {"scale": "auto", "projection_side": "larger"},
    {"projection_side": "input", "seed": 7},
    {"projection_side": "larger", "conv_projection": "input"},
    {"state_dtype": torch.bfloat16, "amsgrad": True},
)

_ADAFACTOR_INPUTS = (
    {},
    {"scale_parameter": False},
    {"warmup_init": True, "weight_decay": 0.01},
    {"lr": 1e-2, "relative_step": False, "clip_threshold": 0.5, "decay_rate": -0.5},
    {"lr": torch.tensor(1e-2), "scale_parameter": False},
    {"lr": torch.tensor([[1e-2]]), "relative_step": False},
    {"rank": 5, "rank_ratio_matrix": None, "rank_ratio_cnn": None, "correlation_normalize": True},
    {"projection_side": "larger", "conv_projection": "input"},
    {"scale": "auto", "clip_threshold": 0.5},
    {"state_dtype": "bf16", "lr": 1e-2, "relative_step": False},
)

_8BIT_INPUTS = ({"block_size": 64}, {"min_8bit_size": 0}, {"min_8bit_size": 10**9}, {"state_dtype": "bf16"})

_ADAM_FEATURES = frozenset({"amsgrad", "maximize", "tensor_lr"})
_ADAFACTOR_FEATURES = frozenset({"relative_step", "tensor_lr"})

OPTIM_DB: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        "CoapAdamW",
        CoapAdamW,
        dict(COAP_KWARGS),
        "adam",
        constructor_inputs=_ADAMW_INPUTS,
        error_inputs=_COAP_ERRORS + _ADAMW_ERRORS,
        supports=_ADAM_FEATURES,
    ),
    OptimizerInfo(
        "CoapAdafactor",
        CoapAdafactor,
        dict(_COAP_ONLY),
        "adafactor",
        first_moment=False,
        constructor_inputs=_ADAFACTOR_INPUTS,
        error_inputs=_COAP_ERRORS + _ADAFACTOR_ERRORS,
        supports=_ADAFACTOR_FEATURES,
    ),
    OptimizerInfo(
        "CoapAdafactor-beta1",
        CoapAdafactor,
        {**_COAP_ONLY, "beta1": 0.9, "lr": 1e-2, "relative_step": False},
        "adafactor",
        constructor_inputs=_ADAFACTOR_INPUTS[3:],
        error_inputs=_COAP_ERRORS,
        supports=_ADAFACTOR_FEATURES,
    ),
    OptimizerInfo(
        "CoapAdamW8bit",
        CoapAdamW8bit,
        {**COAP_KWARGS, "min_8bit_size": 256},
        "adam",
        eight_bit=True,
        constructor_inputs=_ADAMW_INPUTS[:3] + _8BIT_INPUTS,
        error_inputs=_COAP_ERRORS + _ADAMW_ERRORS + _8BIT_ERRORS,
        supports=_ADAM_FEATURES,
    ),
    OptimizerInfo(
        "CoapAdafactor8bit",
        CoapAdafactor8bit,
        {**_COAP_ONLY, "beta1": 0.9, "min_8bit_size": 256},
        "adafactor",
        eight_bit=True,
        constructor_inputs=_ADAFACTOR_INPUTS[:3] + _8BIT_INPUTS,
        error_inputs=_COAP_ERRORS + _ADAFACTOR_ERRORS + _8BIT_ERRORS,
        supports=_ADAFACTOR_FEATURES,
    ),
    # bfloat16 state (P and moments; stochastically rounded second moments) in both storages.
    OptimizerInfo(
        "CoapAdamW-bf16",
        CoapAdamW,
        {**COAP_KWARGS, "state_dtype": torch.bfloat16},
        "adam",
        constructor_inputs=_ADAMW_INPUTS[:4],
        error_inputs=(),
        supports=_ADAM_FEATURES,
    ),
    OptimizerInfo(
        "CoapAdafactor8bit-bf16",
        CoapAdafactor8bit,
        {**_COAP_ONLY, "beta1": 0.9, "min_8bit_size": 256, "state_dtype": "bfloat16"},
        "adafactor",
        eight_bit=True,
        constructor_inputs=_ADAFACTOR_INPUTS[:3],
        error_inputs=(),
        supports=_ADAFACTOR_FEATURES,
    ),
)

#: name -> factory ``make(params, **overrides)``, for tests that only need to build each optimizer.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {entry.name: entry.make for entry in OPTIM_DB}


def info(name: str) -> OptimizerInfo:
    """The database entry called ``name``."""
    return next(entry for entry in OPTIM_DB if entry.name == name)


#: :data:`OPTIMIZERS` at the paper's update scale (1.0), for the tests that compare engines (one
#: process, DDP): their tolerances are set for that update size, and larger steps amplify the
#: order of float sums through the refreshes. The norm-matched scale is a per-layout number, the
#: same in every engine (tests/optim/test_update_scale.py, tests/distributed/test_fsdp_kernels.py).
ENGINE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    name: functools.partial(make, scale=1.0) for name, make in OPTIMIZERS.items()
}
