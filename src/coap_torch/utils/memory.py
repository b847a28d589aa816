"""Counting the bytes an optimizer's state holds.

Every tensor reachable from ``optimizer.state`` (also inside nested dicts, lists, tuples and the
attributes of helper objects) is counted once per *storage*: two views of one storage count once, and a small view that keeps a
larger storage alive counts the whole storage, since that is the memory the state actually pins.
Storages are told apart by ``(device, data_ptr)`` of :meth:`torch.Tensor.untyped_storage` and
measured with ``storage.nbytes()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["optimizer_state_nbytes", "state_nbytes_by_kind"]

_StorageKey = tuple[str, int]


def _tensors(value: object, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """The tensors in ``value``, depth first, in container order.

    Besides dicts, lists and tuples, the attributes of plain objects are walked too: some
    optimizers keep tensors inside helper objects in their state (GaLore's projector holds its
    projection matrix), and that memory is state all the same. ``seen`` guards against cycles.
    """
    if isinstance(value, torch.Tensor):
        # A DTensor (FSDP2 state) is counted by the shard this rank holds: per-rank bytes.
        yield value.to_local() if hasattr(value, "to_local") else value
        return
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)):
        return
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif hasattr(value, "__dict__") and not callable(value):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from _tensors(item, seen)


def _storage(tensor: torch.Tensor) -> tuple[_StorageKey, int]:
    """``((device, data_ptr), nbytes)`` of the storage behind ``tensor``."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    ptr = storage.data_ptr()
    if ptr == 0 and nbytes:
        # Meta tensors have sized storages without an address: tell them apart by the storage
        # object itself, which all views share (``_cdata``; negated to stay clear of addresses).
        ptr = -int(getattr(storage, "_cdata", id(storage)))
    return (str(tensor.device), ptr), nbytes


def _state_items(optimizer: torch.optim.Optimizer, *, include_step: bool) -> Iterator[tuple[str, object]]:
    """``(key, value)`` of every parameter's state, in a deterministic order.

    Parameters are visited in the order of ``optimizer.param_groups`` (the order ``state_dict``
    uses), then any state whose key is not a parameter of a group, in insertion order; keys
    within one parameter's state in insertion order.
    """
    seen: set[int] = set()
    keys: list[object] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state and id(param) not in seen:
                seen.add(id(param))
                keys.append(param)
    keys.extend(key for key in optimizer.state if id(key) not in seen)
    for param in keys:
        state = optimizer.state[param]
        if not isinstance(state, dict):
            yield "", state
            continue
        for key, value in state.items():
            if include_step or key != "step":
                yield str(key), value


def _attributed(optimizer: torch.optim.Optimizer, *, include_step: bool) -> Iterator[tuple[str, int]]:
    """``(state key, new bytes)`` for each state entry: the bytes of the storages it is the first
    to reach (0 when it reaches none, or only storages already counted)."""
    counted: set[_StorageKey] = set()
    for key, value in _state_items(optimizer, include_step=include_step):
        new = 0
        for tensor in _tensors(value):
            storage_key, nbytes = _storage(tensor)
            if storage_key not in counted:
                counted.add(storage_key)
                new += nbytes
        yield key, new


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer, *, include_step: bool = False) -> int:
    """Bytes of the storages behind every tensor in ``optimizer.state`` (any torch optimizer).

    Each storage counts once, with all its bytes (``untyped_storage().nbytes()``), however many
    tensors view it: two views of one buffer count once, and a narrow slice of a large buffer
    counts the whole buffer it keeps alive. Tensors inside nested dicts, lists, tuples and objects count.

    ``step`` counters are left out by default: they are scalars that every optimizer keeps, and
    leaving them out makes the figure comparable with the closed-form counts. With
    ``include_step=True`` they count too (a storage shared with another key still counts once).
    """
    return sum(nbytes for _, nbytes in _attributed(optimizer, include_step=include_step))


def state_nbytes_by_kind(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per state key (``exp_avg``, ``proj``, ...), without ``step``.

    Uses the same per-storage count as :func:`optimizer_state_nbytes` (``include_step=False``),
    so the values sum to it: a storage reached from several keys is attributed once, to the first
    key that reaches it, visiting parameters in ``param_groups`` order and each parameter's keys
    in insertion order. Every key (but ``step``) is listed, with 0 when it adds no new storage.
    """
    totals: dict[str, int] = {}
    for key, nbytes in _attributed(optimizer, include_step=False):
        totals[key] = totals.get(key, 0) + nbytes
    return totals
