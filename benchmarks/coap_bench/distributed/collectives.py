"""Counting collectives: every c10d collective issued in a region (:class:`CollectiveBytes`), and those the
engine (DDP, FSDP2) issues in training, apart from the optimizer's own (:class:`EngineCollectives`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["ENGINE_BYTES_METHOD", "CollectiveBytes", "EngineCollectives"]

#: How the engine's bytes are obtained (written to the JSON and the table notes).
ENGINE_BYTES_METHOD = (
    "counted: the payloads of the c10d collectives of the last step's forward and backward, seen by a "
    "TorchDispatchMode, less any the optimizer logs itself (per-layer updates run inside backward)"
)


class CollectiveBytes(TorchDispatchMode):
    """Context manager: calls and payload bytes of every c10d collective issued inside it, per op.

    ProcessGroup methods dispatch through ``c10d::*`` ops, so this sees what DDP's reducer and
    FSDP2's hooks issue as well as direct ``torch.distributed`` calls. The payload of an op is the
    larger of its first two tensor arguments (output and input of ``_allgather_base_`` /
    ``_reduce_scatter_base_``; the buffers of ``allreduce_``): the full tensor either way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, dict[str, int]] = {}
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name.startswith("c10d.") and not self.paused:
            sides = [_tensor_bytes(arg) for arg in args[:2]]
            entry = self.ops.setdefault(name.removeprefix("c10d.").removesuffix(".default"), {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += max(sides, default=0)
        return func(*args, **(kwargs or {}))

    @property
    def bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.ops.values())


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, Tensor))


class EngineCollectives:
    """Context manager: the collectives the engine (DDP, FSDP2) issues in a region of training.

    Counts every c10d collective (:class:`CollectiveBytes`) except those of ``optimizer.step()``
    (paused by step hooks: a peer's DTensor ops may communicate there) and those a COAP optimizer
    logs in ``optimizer.communication`` outside ``step()`` (per-layer updates run inside backward).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.counted = CollectiveBytes()
        self._log = getattr(optimizer, "communication", None)
        self._outside_step = 0  # optimizer-logged bytes counted by ``counted``

    def _logged(self) -> int:
        return self._log.bytes if self._log is not None else 0

    def __enter__(self) -> Self:
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pause),
            self.optimizer.register_step_post_hook(self._resume),
        ]
        self._mark = self._logged()
        self.counted.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.counted.__exit__(*exc)
        self._outside_step += self._logged() - self._mark
        for handle in self._handles:
            handle.remove()

    def _pause(self, *_: Any) -> None:
        self.counted.paused = True
        self._outside_step += self._logged() - self._mark

    def _resume(self, *_: Any) -> None:
        self.counted.paused = False
        self._mark = self._logged()

    @property
    def bytes(self) -> int:
        return self.counted.bytes - self._outside_step
