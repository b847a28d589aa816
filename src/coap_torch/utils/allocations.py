"""Peak bytes of tensors allocated in a region of code, on CPU as well as on CUDA.

CUDA has an allocator that counts (``torch.cuda.max_memory_allocated``); the CPU has none, so
:class:`PeakAllocations` watches every op through a ``TorchDispatchMode`` (backward included:
on the CPU it runs on the calling thread) and tracks the storages of the tensors those ops
return while they are alive. Tensors that existed before the region (weights, earlier optimizer
state) are not counted: the figure is the peak of what the region added on top. Tensors passed as
``existing`` are counted from the start until they are freed: a region that replaces them (an
optimizer step that rebuilds its state) then shows the memory it really holds, not the new tensors
on top of old ones that are gone.

Example:
    >>> import torch
    >>> from coap_torch.utils.allocations import PeakAllocations
    >>> with PeakAllocations() as peak:
    ...     a = torch.zeros(1024)                  # 4 KiB
    ...     b = torch.zeros(2048); del b           # 8 KiB, freed
    >>> peak.peak_bytes
    12288
    >>> state = {"m": torch.zeros(1024)}           # 4 KiB, there before the region
    >>> with PeakAllocations(existing=state.values()) as peak:
    ...     state["m"] = torch.ones(1024)          # replaced: the old 4 KiB is freed
    >>> peak.peak_bytes, peak.live_bytes
    (8192, 4096)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakAllocations"]


class PeakAllocations(TorchDispatchMode):
    """Context manager: ``peak_bytes`` (and ``live_bytes``) of storages created inside it, and of the
    ``existing`` tensors' storages (each once) while they live."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, int] = {}  # storage address -> live tensors viewing it
        self._sizes: dict[int, int] = {}
        self._seen_before: set[int] = set()
        for tensor in existing:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor, set())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address == 0:
            return
        if address not in self._refs:
            if address in inputs:  # a view or in-place result on memory that existed before
                return
            self._refs[address] = 0
            self._sizes[address] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[address] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        if address not in self._refs:
            return
        self._refs[address] -= 1
        if self._refs[address] == 0:
            del self._refs[address]
            self.live_bytes -= self._sizes.pop(address)
