"""Timing, shared by every ``coap-bench`` command: one timed training step (:func:`timed_step`), and the
samples of an operation (:class:`Timer`, :class:`Timing`), several operations timed round-robin so that
load from other processes hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["Case", "Timer", "Timing", "round_robin", "timed_step"]

T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(
    compute_loss: Callable[[], Tensor], optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[Tensor, float, float]:
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


@dataclass
class Timing:
    """Wall-clock samples of one operation, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    def to_json(self) -> dict[str, Any]:
        return {"median_ms": self.median, "min_ms": self.min, "samples_ms": self.samples_ms}


def round_robin(items: Sequence[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """``(index, order)`` for each of ``rounds`` rounds: every round visits all ``items`` once, in
    an order that rotates by one from round to round, so that background load on a shared machine
    hits all of them alike and their ratios stay meaningful."""
    items = list(items)
    for index in range(rounds):
        shift = index % len(items)
        yield index, items[shift:] + items[:shift]


@dataclass
class Case:
    """One operation to time; ``None`` fields take the :class:`Timer`'s settings."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None = None
    repeats: int | None = None
    warmup: int | None = None
    inner: int | None = None


class Timer:
    """Medians of wall-clock times; synchronizes CUDA around every timed call."""

    def __init__(self, device: torch.device, *, repeats: int, warmup: int, inner: int) -> None:
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.inner = inner

    def sync(self) -> None:
        _sync(self.device)

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        setup: Callable[[], object] | None = None,
        repeats: int | None = None,
        warmup: int | None = None,
        inner: int | None = None,
    ) -> Timing:
        """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` samples, each the mean of
        ``inner`` calls. ``setup`` runs before every call, outside the timed region."""
        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        inner = self.inner if inner is None else inner
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        self.sync()
        timing = Timing()
        for _ in range(repeats):
            total = 0.0
            for _ in range(inner):
                if setup is not None:
                    setup()
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                total += time.perf_counter() - start
            timing.samples_ms.append(total / inner * 1e3)
        return timing

    def interleaved(self, cases: dict[str, Case]) -> dict[str, Timing]:
        """Time several operations round-robin: every round takes one sample of each case (the
        order rotating from round to round), so that background load on a shared machine hits
        all of them alike and their ratios stay meaningful."""
        names = list(cases)
        for name in names:
            case = cases[name]
            for _ in range(self.warmup if case.warmup is None else case.warmup):
                if case.setup is not None:
                    case.setup()
                case.fn()
        self.sync()
        timings = {name: Timing() for name in names}
        rounds = max(self.repeats if c.repeats is None else c.repeats for c in cases.values())
        for index, order in round_robin(names, rounds):
            for name in order:
                case = cases[name]
                if index >= (self.repeats if case.repeats is None else case.repeats):
                    continue
                inner = self.inner if case.inner is None else case.inner
                total = 0.0
                for _ in range(inner):
                    if case.setup is not None:
                        case.setup()
                    self.sync()
                    start = time.perf_counter()
                    case.fn()
                    self.sync()
                    total += time.perf_counter() - start
                timings[name].samples_ms.append(total / inner * 1e3)
        return timings
