"""One timed training step, shared by every ``coap-bench`` job."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(compute_loss: Callable[[], Tensor], optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[Tensor, float, float]:
    """Zero the gradients, backpropagate ``compute_loss()`` and step.

    Returns ``(loss, iteration seconds, optimizer.step() seconds)``; on CUDA the device is
    synchronized around each phase so the times are those of the work, not of the launches.
    """
    _sync(device)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    _sync(device)
    backward_done = time.perf_counter()
    optimizer.step()
    _sync(device)
    finished = time.perf_counter()
    return loss, finished - started, finished - backward_done
