"""Measurements the benchmarks take around ``optimizer.step()``, shared by every ``coap-bench`` job.

* :class:`Eq2Probe`: how far each Eq. 2 (correlation-aware) step moves a projection,
  ``|P_new - P_old|_F / |P_old|_F``, for the parameters whose coming step is an Eq. 2 refresh.
* :func:`refresh_time`: the time spent in projection refreshes, from per-step times: what the
  refresh steps took beyond a steady step (the median of the other steps).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PROJECTION_KEYS", "Eq2Probe", "refresh_time"]

#: State keys of COAP's projection matrices (``proj`` for matrices, ``proj_out`` / ``proj_in`` for Tucker-2).
PROJECTION_KEYS = ("proj", "proj_out", "proj_in")


class Eq2Probe:
    """Relative change of every projection at its Eq. 2 steps.

    Call :meth:`before_step` before ``optimizer.step()`` and :meth:`after_step` after it. Only
    parameters whose coming step is a multiple of ``update_interval`` but not of
    ``update_interval * reproject_factor`` are copied (those get the SVD instead), so the probe
    costs a copy of a few projections every ``update_interval`` steps. Optimizers without these
    group options, and parameters without projections, give nothing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[Tensor, str]) -> None:
        self.optimizer = optimizer
        self.names = names
        self.changes: list[dict[str, Any]] = []
        self._taken: list[tuple[Tensor, str, Tensor]] = []

    def before_step(self) -> None:
        self._taken = []
        for group in self.optimizer.param_groups:
            interval, factor = group.get("update_interval"), group.get("reproject_factor")
            if interval is None or factor is None or not group.get("coap", True):
                continue
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if not state or "step" not in state:
                    continue
                coming = int(state["step"]) + 1
                if coming > 1 and coming % interval == 0 and coming % (interval * factor) != 0:
                    self._taken.extend((param, key, state[key].clone()) for key in PROJECTION_KEYS if key in state)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        for param, key, old in self._taken:
            new = self.optimizer.state[param][key]
            change = (torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old)).item()
            self.changes.append({"step": step, "param": self.names.get(param, "?"), "key": key, "rel_change": change})
        self._taken = []

    def median(self) -> float | None:
        values = [c["rel_change"] for c in self.changes]
        return statistics.median(values) if values else None


def refresh_time(step_seconds: Sequence[float], refreshes_at: Callable[[int], bool]) -> dict[str, Any] | None:
    """Time spent refreshing projections, from the time of each ``optimizer.step()`` (1-based steps).

    A refresh step's cost is its time beyond the median of the other steps. Returns ``None``
    when no step (or every step) refreshes, else ``count``, ``total_ms``, ``mean_ms`` and
    ``share`` (the refresh total over the total optimizer-step time).
    """
    refresh = [t for i, t in enumerate(step_seconds, start=1) if refreshes_at(i)]
    steady = [t for i, t in enumerate(step_seconds, start=1) if not refreshes_at(i)]
    if not refresh or not steady:
        return None
    base = statistics.median(steady)
    extra = [max(0.0, t - base) for t in refresh]
    total = sum(extra)
    return {
        "count": len(refresh),
        "total_ms": total * 1e3,
        "mean_ms": total * 1e3 / len(refresh),
        "share": total / sum(step_seconds) if sum(step_seconds) > 0 else None,
    }
