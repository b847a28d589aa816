"""Per-layer updates: each parameter is updated during backward, as soon as its gradient is ready.

The gradient is freed right after its update, so the gradients of the whole model never exist at
once; that is where the memory profile of the paper comes from. One optimizer object does all
the updates, so learning-rate schedulers, ``state_dict`` and checkpoints work as usual, and
``optimizer.step()`` / ``zero_grad()`` stay valid calls that find nothing left to do.

Example:
    >>> import torch
    >>> from coap_torch import CoapAdamW
    >>> from coap_torch.optim import enable_per_layer_updates
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> opt = CoapAdamW(model.parameters(), lr=1e-3)
    >>> updates = enable_per_layer_updates(opt)
    >>> for step in range(4):                       # gradient accumulation over 2 micro-batches
    ...     with updates.no_update():               # where DDP code would say model.no_sync()
    ...         model(torch.randn(128, 32)).square().mean().backward()
    ...     model(torch.randn(128, 32)).square().mean().backward()   # updates happen here
    ...     opt.step()                              # nothing left to do: kept for schedulers
    >>> int(opt.state[model[0].weight]["step"]), model[0].weight.grad is None
    (4, True)
    >>> updates.remove()
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _placement as placement
from ._base import LowRankOptimizer

__all__ = ["PerLayerUpdates", "enable_per_layer_updates"]


class PerLayerUpdates:
    """The hooks that update ``optimizer``'s parameters during backward (see :func:`enable_per_layer_updates`)."""

    def __init__(self, optimizer: LowRankOptimizer, should_update: Callable[[], bool] | None = None) -> None:
        self.optimizer = optimizer
        self.should_update = should_update
        self._paused = 0
        self._where: dict[int, tuple[dict[str, Any], int]] = {}
        self._handles = [
            param.register_post_accumulate_grad_hook(self._hook)
            for group in optimizer.param_groups
            for param in group["params"]
            if param.requires_grad
        ]

    @contextlib.contextmanager
    def no_update(self) -> Iterator[None]:
        """Accumulate gradients without updating (the micro-batches before an accumulation boundary)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def remove(self) -> None:
        """Go back to regular ``optimizer.step()`` training."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _locate(self, param: Tensor) -> tuple[dict[str, Any], int]:
        # Built lazily and rebuilt on a miss: wrappers may swap parameters after enabling.
        if id(param) not in self._where:
            index = itertools.count()
            self._where = {
                id(p): (group, next(index)) for group in self.optimizer.param_groups for p in group["params"]
            }
            if id(param) not in self._where:
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} has a per-layer hook but is not in the optimizer"
                )
        return self._where[id(param)]

    @torch.no_grad()
    def _hook(self, param: Tensor) -> None:
        if self._paused or (self.should_update is not None and not self.should_update()) or param.grad is None:
            return
        group, index = self._locate(param)
        _refuse_unreduced_gradients(param, index)
        self.optimizer._check_engine()
        self.optimizer._step_param(param, group, index)  # alone: its collectives are not coalesced with others
        param.grad = None


def _refuse_unreduced_gradients(param: Tensor, index: int) -> None:
    if not placement.is_dtensor(param) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"per-layer updates: {placement.describe(param, index)} is a plain tensor in a process group of "
            f"{dist.get_world_size()} ranks. Under DistributedDataParallel its gradient is not yet averaged when "
            "its hook runs (DDP all-reduces later, in buckets), so a per-layer update would use this rank's "
            "gradient alone. Use FSDP2 (fully_shard), whose hooks see reduced gradients, or regular step() with DDP."
        )


def enable_per_layer_updates(
    optimizer: LowRankOptimizer,
    *,
    should_update: Callable[[], bool] | None = None,
    max_grad_norm: float | None = None,
) -> PerLayerUpdates:
    """Update each parameter of ``optimizer`` as soon as its gradient is accumulated, then free it.

    Enable it after wrapping the model (``fully_shard``, ``accelerator.prepare``): the hooks are
    registered on the parameters the optimizer holds now.

    Args:
        optimizer: a COAP optimizer.
        should_update: called at each hook; ``False`` keeps accumulating (e.g.
            ``lambda: accelerator.sync_gradients``). :meth:`PerLayerUpdates.no_update` does the
            same as a context manager.
        max_grad_norm: must be ``None``. Clipping by the norm of the whole model's gradient
            needs every gradient before the first update, which this mode never has; passing a
            norm (as configurations that always clip do) raises ``ValueError``.

    Returns:
        A :class:`PerLayerUpdates`; its ``remove()`` goes back to regular steps.

    Works on one process and under FSDP2 (its hooks run after the reduce-scatter, on the
    reduced gradient shard). Under DDP the hook would see an un-averaged gradient, so the first
    update raises ``RuntimeError``.
    """
    if not isinstance(optimizer, LowRankOptimizer):
        raise TypeError(f"per-layer updates need a COAP optimizer, got {type(optimizer).__name__}")
    if max_grad_norm is not None:
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r}: gradient clipping across the model cannot be combined with per-layer "
            "updates (each parameter is updated before the other gradients exist); pass max_grad_norm=None, or "
            "train with regular optimizer.step()"
        )
    return PerLayerUpdates(optimizer, should_update)
