"""Counting the bytes an optimizer's state holds."""

from __future__ import annotations

from collections import Counter

import torch


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer, *, include_step: bool = False) -> int:
    """Bytes of every tensor in ``optimizer.state`` (works for any torch optimizer).

    ``step`` counters are left out by default: they are scalars that every optimizer keeps, and
    leaving them out makes the figure comparable with the closed-form counts.
    """
    return sum(
        _tensor_bytes(value)
        for state in optimizer.state.values()
        for key, value in state.items()
        if include_step or key != "step"
    )


def state_nbytes_by_kind(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per state key (``exp_avg``, ``proj``, ...), without ``step``."""
    totals: Counter[str] = Counter()
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step":
                totals[str(key)] += _tensor_bytes(value)
    return dict(totals)
