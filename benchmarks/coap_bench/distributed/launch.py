"""Starting a rank of a ``torchrun`` job: its environment, its process group and device, and a model wrapped
by the engine (DDP, or FSDP2 on given blocks and the root)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ENGINES",
    "check_engine",
    "launch_environment",
    "process_group",
    "start_process_group",
    "wrap_model",
]

#: Values of ``--distributed``.
ENGINES = ("ddp", "fsdp2")
#: What ``torchrun`` sets for each rank.
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_environment(command: str = "llama") -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the variables ``torchrun`` sets; ``ValueError`` without them
    (naming how to launch ``coap-bench COMMAND --distributed``)."""
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); launch it as "
            f"`torchrun --nproc-per-node 2 -m coap_bench.cli {command} --distributed fsdp2 ...`"
        )
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def check_engine(engine: str | None, batch_size: int, world_size: int, unit: str = "--batch-size") -> None:
    """``ValueError`` unless ``engine`` is one of :data:`ENGINES` and the global batch splits evenly over the ranks."""
    if engine not in ENGINES:
        raise ValueError(f"unknown --distributed {engine!r}; choose from {', '.join(ENGINES)}")
    if batch_size % world_size:
        raise ValueError(f"{unit} {batch_size} must be a multiple of the world size {world_size}")


def start_process_group(device_name: str) -> tuple[torch.device, str, bool]:
    """This rank's device (``cuda:LOCAL_RANK`` for a CUDA ``device_name``), the backend (NCCL on GPUs, gloo
    on the CPU), and whether this call initialised the process group."""
    local_rank = launch_environment()[2]
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend)
    return device, dist.get_backend(), started


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[tuple[torch.device, str]]:
    """:func:`start_process_group` for the block; on leaving it, the group this call started is destroyed.

    The runs' models and optimizers must be gone by then: ``gc.collect()`` runs first, since gloo
    can abort when a process group is destroyed while tensors of a sharded model still hold it.
    """
    device, backend, started = start_process_group(device_name)
    try:
        yield device, backend
    finally:
        if started:
            gc.collect()
            dist.destroy_process_group()


def wrap_model(model: nn.Module, engine: str, device: torch.device, blocks: Iterable[nn.Module]) -> nn.Module:
    """``model`` for ``engine``: ``DistributedDataParallel`` around it, or FSDP2 (``fully_shard`` on a 1-D
    mesh of every rank) on each of ``blocks``, then on the root, which keeps the parameters of no block."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
