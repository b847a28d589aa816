"""Optimizer-state memory from shapes alone: what an optimizer will hold, before it holds it.

:func:`estimate_state_bytes` builds one of our optimizers on the given parameters (constructing an
optimizer allocates no state, and its constructor validates the options exactly as in training),
then asks it, parameter by parameter, for the tensors its first ``step()`` would create:
:meth:`~coap_torch.optim.LowRankOptimizer.planned_state` (the routing, the factor shapes, the
moments of the moment rule, stored 8-bit where the storage says so), so no routing or moment rule
is written twice. Other libraries' optimizers (torch's AdamW, bitsandbytes, GaLore, transformers'
Adafactor) are estimated by the benchmark suite (``coap-bench memory``), which knows their layouts.

Bytes are counted as :func:`~coap_torch.utils.optimizer_state_nbytes` counts them (each storage
once, with all its bytes; ``step`` counters left out), so on a real model the two agree to the
byte after any number of steps. The parameters may live on the ``meta`` device: a 7B model costs
nothing to estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

__all__ = ["OPTIMIZER_NAMES", "StateEstimate", "estimate_state_bytes", "named_param_groups"]


@dataclass(frozen=True)
class StateEstimate:
    """Bytes of optimizer state that an optimizer configuration holds after its first step.

    Attributes:
        optimizer: the optimizer name it was computed for.
        total: bytes of all state tensors, ``step`` counters excluded (``int(estimate)`` too).
        per_parameter: parameter name -> bytes of the state that belongs to it alone, in
            ``param_groups`` order (frozen parameters appear with 0: they never get a gradient).
        by_key: state key (``exp_avg``, ``proj``, ``exp_avg_codes`` ...) -> bytes; comparable with
            :func:`~coap_torch.utils.state_nbytes_by_kind` of the real optimizer.
        shared: bytes that several parameters point at (none in our optimizers; bitsandbytes' two
            256-entry code maps in ``coap-bench memory``); ``total == sum(per_parameter.values()) + shared``.
    """

    optimizer: str
    total: int
    per_parameter: dict[str, int] = field(repr=False)
    by_key: dict[str, int] = field(repr=False)
    shared: int = 0

    def __int__(self) -> int:
        return self.total

    @property
    def mib(self) -> float:
        """``total`` in MiB (2**20 bytes), the unit the COAP paper prints as "MB"."""
        return self.total / 2**20

    def __str__(self) -> str:
        return f"{self.optimizer}: {self.total:,} bytes ({self.mib:.2f} MiB)"


#: The optimizers :func:`estimate_state_bytes` knows, by name.
_OPTIMIZERS: dict[str, type] = {
    "coap_adamw": CoapAdamW,
    "coap_adamw8bit": CoapAdamW8bit,
    "coap_adafactor": CoapAdafactor,
    "coap_adafactor8bit": CoapAdafactor8bit,
}

#: The optimizer names :func:`estimate_state_bytes` knows.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)


def _planned_bytes(optimizer: Any, param: Tensor) -> dict[str, int]:
    """Bytes of each tensor the optimizer plans to keep for ``param`` (its own plan: the routing, the moment
    rule, the 8-bit storage), ``step`` left out."""
    planned = optimizer.planned_state(param)
    return {key: math.prod(tensor.shape) * tensor.dtype.itemsize for key, tensor in planned.items() if key != "step"}


# -- inputs: a module, parameters, named parameters or param groups ----------------------------
def _named(params: Any, start: int) -> list[tuple[str, Tensor]]:
    if isinstance(params, Tensor):
        params = [params]
    named = []
    for index, item in enumerate(params, start):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            named.append((str(item[0]), item[1]))
        elif isinstance(item, Tensor):
            named.append((str(index), item))
        else:
            raise TypeError(f"expected tensors or (name, tensor) pairs as parameters, got {type(item).__name__}")
    return named


def named_param_groups(model: Any) -> tuple[list[dict[str, Any]], dict[int, str], bool]:
    """Param groups of plain tensors, the name of every parameter (by ``id``), and whether groups were given.

    ``model`` is what :func:`estimate_state_bytes` accepts: a module (named by ``named_parameters``),
    tensors, ``(name, tensor)`` pairs, or param groups of either (unnamed tensors are named by their
    position). Shared with estimators of other optimizers, such as the benchmark suite's.
    """
    if isinstance(model, nn.Module):
        model = model.named_parameters()
    items: list[Any] = [model] if isinstance(model, Tensor) else list(model)
    given = bool(items) and all(isinstance(item, dict) for item in items)
    if not given:
        items = [{"params": items}]
    groups, names = [], {}
    for group in items:
        if "params" not in group:
            raise ValueError(f"a param group needs a 'params' entry, got keys {sorted(group)}")
        named = _named(group["params"], start=len(names))
        names.update((id(param), name) for name, param in named)
        groups.append({**group, "params": [param for _, param in named]})
    if not names:
        raise ValueError("estimate_state_bytes got no parameters")
    return groups, names, given


def estimate_state_bytes(
    model: nn.Module | Iterable[Any], optimizer_name: str, **optimizer_kwargs: Any
) -> StateEstimate:
    """The optimizer-state bytes ``optimizer_name`` will hold for ``model``, without allocating them.

    The figure is the state after the first ``step()`` (and after any later one: none of our
    optimizers grows its state), counted as :func:`~coap_torch.utils.optimizer_state_nbytes`
    counts the real state, ``step`` counters excluded. Every trainable parameter is assumed to get
    a gradient.

    Args:
        model: an :class:`torch.nn.Module` (its parameters, by name), or what an optimizer
            takes as ``params``: tensors, ``(name, tensor)`` pairs (``named_parameters()``), or a
            list of param-group dicts whose ``params`` are either, with per-group options (e.g. a
            projected group and a ``{"params": ..., "coap": False}`` group). Parameters may be
            on the ``meta`` device.
        optimizer_name: one of :data:`OPTIMIZER_NAMES`: ``"coap_adamw"``, ``"coap_adamw8bit"``,
            ``"coap_adafactor"``, ``"coap_adafactor8bit"``.
        **optimizer_kwargs: the optimizer's own constructor arguments (``betas``, ``beta1``,
            ``rank_ratio_matrix``, ``min_conv_numel``, ``min_8bit_size`` ...), validated by its
            constructor.

    Returns:
        a :class:`StateEstimate`; ``int(estimate)`` or ``estimate.total`` is the byte count.

    Raises:
        ValueError: unknown ``optimizer_name`` (the estimates of other libraries' optimizers are
            ``coap-bench memory``'s), no parameters, or an option the optimizer refuses.
        TypeError: an argument the optimizer does not take.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
        >>> int(estimate_state_bytes(model, "coap_adamw", coap=False))  # dense: two fp32 moments per value
        67149824
        >>> coap = estimate_state_bytes(model, "coap_adamw", rank_ratio_matrix=4)
        >>> coap.per_parameter["0.weight"]  # P (1024, 256) + exp_avg, exp_avg_sq (4096, 256)
        9437184
    """
    if optimizer_name not in _OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer_name!r}; known: {', '.join(OPTIMIZER_NAMES)} (the "
            "estimates of other libraries' optimizers are in the benchmark suite: coap-bench memory)"
        )
    groups, names, _ = named_param_groups(model)
    try:
        optimizer = _OPTIMIZERS[optimizer_name](groups, **optimizer_kwargs)
    except TypeError as error:
        raise TypeError(f"{optimizer_name}: {error}") from None
    per_parameter: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for param in (param for group in optimizer.param_groups for param in group["params"]):
        planned = _planned_bytes(optimizer, param) if param.requires_grad else {}
        per_parameter[names[id(param)]] = sum(planned.values())
        for key, nbytes in planned.items():
            by_key[key] = by_key.get(key, 0) + nbytes
    return StateEstimate(optimizer_name, sum(per_parameter.values()), per_parameter, by_key)
