"""Where a parameter lives, detected at each step (never cached: wrappers swap parameters).

* a plain tensor: one process, or DDP (whose gradients arrive averaged and identical on every
  rank, so the optimizer needs no communication of its own);
* a DTensor replicated on a 1-D mesh: its local tensor is the whole parameter, as under DDP;
* a DTensor sharded on dim 0 of a 1-D mesh (FSDP2's ``fully_shard``): :class:`RowShard`.

Everything else raises at the first step, naming the engine or placement: DeepSpeed ZeRO and
FSDP1 hand the optimizer flattened 1-D partitions (matrices can no longer be projected), and
tensor parallelism or 2-D meshes shard the projected side.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED = "use DistributedDataParallel, or FSDP2 (fully_shard) on a 1-D device mesh"

#: A :attr:`RowShard.replicated` that replicates every state entry.
ALL_STATE = frozenset({"*"})


def moment_name(key: str) -> str:
    """The state entry that stored ``key`` belongs to: ``exp_avg`` for ``exp_avg_codes`` and ``exp_avg_absmax``."""
    return key.removesuffix("_codes").removesuffix("_absmax")


@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[offset, offset + rows)`` of a parameter of ``global_shape`` sharded on dim 0.

    ``replicated`` names the state entries that are the same on every rank (the others shard
    like the weight); it depends on the layout (see :func:`~coap_torch.optim._sharding.replicated_state`).
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    global_shape: tuple[int, ...]
    offset: int
    rows: int
    replicated: frozenset[str] = frozenset({"step"})

    @property
    def group(self) -> Any:
        return self.mesh.get_group()

    def replicates(self, key: str) -> bool:
        """Whether state ``key`` (``exp_avg_sq_col_codes`` counts as ``exp_avg_sq_col``) is the same on every rank."""
        return self.replicated is ALL_STATE or key == "step" or moment_name(key) in self.replicated


_DTENSOR: list[type] = []  # DTensor, once imported


def _dtensor_type() -> type | None:
    if _DTENSOR:
        return _DTENSOR[0]
    if "torch.distributed.tensor" not in sys.modules and "torch.distributed._tensor" not in sys.modules:
        return None  # nobody made a DTensor: skip the import on the hot path
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    _DTENSOR.append(DTensor)
    return DTensor


def is_dtensor(tensor: Tensor) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The local tensor of a DTensor, or ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def sharded_on_rows(param: Tensor) -> bool:
    """Whether ``param`` is a DTensor sharded on dim 0 of a 1-D mesh (FSDP2's layout)."""
    if not is_dtensor(param):
        return False
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0


def describe_shape(shape: tuple[int, ...], index: int) -> str:
    return f"parameter {index} of shape {tuple(shape)}"


def describe(param: Tensor, index: int) -> str:
    return describe_shape(tuple(param.shape), index)


def engine_managed(param: Tensor) -> bool:
    """Whether a flattening engine (FSDP1, DeepSpeed ZeRO) manages ``param``: :func:`refuse_flattened` refuses it."""
    return (
        getattr(param, "_is_flat_param", False)
        or getattr(param, "_fsdp_flattened", False)
        or hasattr(param, "ds_id")
        or hasattr(param, "ds_tensor")
    )


def refuse_flattened(param: Tensor, index: int) -> None:
    """Refuse parameters that an engine flattened (their matrices are gone)."""
    if getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False):
        raise ValueError(
            f"{describe(param, index)} is managed by FSDP1 (FullyShardedDataParallel), which flattens "
            f"parameters into 1-D shards, so matrices cannot be projected; {SUPPORTED}"
        )
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise ValueError(
            f"{describe(param, index)} is partitioned by DeepSpeed ZeRO, which hands the optimizer flat "
            f"1-D partitions, so matrices cannot be projected; {SUPPORTED}"
        )


def placement_of(param: Tensor, index: int) -> RowShard | None:
    """``None`` for a parameter whose local tensor is all of it, a :class:`RowShard` for FSDP2."""
    refuse_flattened(param, index)
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1:
        raise ValueError(
            f"{describe(param, index)} is a DTensor on a {mesh.ndim}-D device mesh with placements {placements!r} "
            f"(HSDP or FSDP with tensor parallelism); 2-D meshes are not supported: {SUPPORTED}"
        )
    placement = placements[0]
    if isinstance(placement, Replicate):
        return None
    if isinstance(placement, Shard) and placement.dim == 0:
        world, rank = mesh.size(), mesh.get_local_rank()
        total = param.shape[0]
        chunk = -(-total // world)  # torch.chunk's split, which Shard(0) uses
        offset = min(rank * chunk, total)
        return RowShard(mesh, tuple(param.shape), offset, min(chunk, total - offset))
    raise ValueError(
        f"{describe(param, index)} is a DTensor with placement {placement!r} (tensor parallelism?); only "
        f"Shard(0) (FSDP2) and Replicate() are supported: {SUPPORTED}"
    )


def refuse_flattening_engine(had_matrices: bool, params: list[Tensor]) -> None:
    """An optimizer built over matrices that now sees only 1-D tensors was re-wrapped by an
    engine that flattens parameters (DeepSpeed ZeRO-1/2 replaces every group's parameters by
    one flat partition after the optimizer is built)."""
    if had_matrices and params and all(p.dim() <= 1 for p in params):
        engine = "DeepSpeed ZeRO" if "deepspeed" in sys.modules else "an engine that flattens parameters"
        raise ValueError(
            f"the optimizer was built over matrices but its parameters are now flat 1-D tensors "
            f"({engine} partitions parameters this way), so nothing can be projected; {SUPPORTED}"
        )


def to_dtensor_like(local_tensor: Tensor, shard: RowShard, global_rows: int) -> Tensor:
    """Wrap this rank's rows of a state tensor as a DTensor sharded on dim 0, as the weight is."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (global_rows, *local_tensor.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, shard.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def store_sharded(stored: dict[str, Any], state: dict[str, Any], shard: RowShard) -> None:
    """Write a row shard's ``state`` back: what shards like the weight as DTensors (so that
    ``torch.distributed.checkpoint`` can reshard it), what is the same on every rank (the step
    counter; ``P`` and the moments where the layout replicates them) as plain tensors."""
    stored.clear()
    for key, value in state.items():
        if shard.replicates(key) or not isinstance(value, Tensor) or value.dim() == 0:
            stored[key] = value
        else:
            stored[key] = to_dtensor_like(value, shard, shard.global_shape[0])
