"""The optimizers ``coap-bench`` knows: one line each in :data:`OPTIMIZERS`.

A factory takes ``(params, lr, config)`` and returns a :class:`torch.optim.Optimizer`;
``config`` is the run's :class:`~coap_torch.bench.digits.DigitsConfig` (or any object with the
same attributes), so factories can read the shared COAP options from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from ._deps import require

__all__ = ["DEFAULT_OPTIMIZERS", "OPTIMIZERS", "OptimizerFactory", "parse_optimizer_names"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], float, Any], torch.optim.Optimizer]


def _coap_options(config: Any) -> dict[str, Any]:
    return dict(
        rank_ratio_matrix=config.rank_ratio,
        rank_ratio_cnn=config.rank_ratio,
        update_interval=config.update_interval,
        reproject_factor=config.reproject_factor,
        correlation_normalize=config.correlation_normalize,
        seed=config.seed,
    )


#: Adafactor runs use the same external lr schedule as the AdamW runs, and a first moment (the
#: paper's setting, where COAP saves memory on Adafactor): the comparison is then only the method.
_ADAFACTOR_OPTIONS = dict(relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9)


def _transformers_adafactor(params: Iterable[torch.nn.Parameter], lr: float, config: Any) -> torch.optim.Optimizer:
    optimization = require("transformers.optimization", package="transformers")
    return optimization.Adafactor(params, lr=lr, **_ADAFACTOR_OPTIONS)


#: name -> factory(params, lr, config). Add an optimizer with one line here.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda params, lr, config: torch.optim.AdamW(params, lr=lr),
    "coap_adamw": lambda params, lr, config: CoapAdamW(params, lr=lr, **_coap_options(config)),
    "coap_adamw8bit": lambda params, lr, config: CoapAdamW8bit(params, lr=lr, **_coap_options(config)),
    "adafactor": _transformers_adafactor,
    "coap_adafactor": lambda params, lr, config: CoapAdafactor(params, lr=lr, **_ADAFACTOR_OPTIONS, **_coap_options(config)),
    "coap_adafactor8bit": lambda params, lr, config: CoapAdafactor8bit(
        params, lr=lr, **_ADAFACTOR_OPTIONS, **_coap_options(config)
    ),
}

#: What `coap-bench digits` runs by default: every optimizer, each next to its dense counterpart.
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)


def parse_optimizer_names(text: str) -> list[str]:
    """``"adamw, coap_adamw"`` -> ``["adamw", "coap_adamw"]``; unknown names raise :class:`ValueError`."""
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no optimizer named in {text!r}; known: {', '.join(OPTIMIZERS)}")
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        raise ValueError(
            f"unknown optimizer {', '.join(repr(n) for n in unknown)}; known: {', '.join(OPTIMIZERS)}"
        )
    return names
