"""Starting a rank of a ``torchrun`` job: its environment, the options it accepts, its process group and
device, and the model wrapped by the engine (DDP or FSDP2)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..llama import LlamaConfig

__all__ = ["ENGINES", "check_options", "launch_environment", "start_process_group", "wrap_model"]

#: Values of ``--distributed``.
ENGINES = ("ddp", "fsdp2")


def launch_environment() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the variables ``torchrun`` sets; ``ValueError`` without them."""
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise ValueError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); launch it as "
            "`torchrun --nproc-per-node 2 -m coap_bench.cli llama --distributed fsdp2 ...`"
        )
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def check_options(config: LlamaConfig, world_size: int) -> None:
    if config.distributed not in ENGINES:
        raise ValueError(f"unknown --distributed {config.distributed!r}; choose from {', '.join(ENGINES)}")
    if config.per_layer and config.distributed == "ddp":
        raise ValueError(
            "--per-layer cannot be combined with --distributed ddp: DDP averages gradients after the per-layer "
            "hooks run, so each rank would update with its own gradient; use --distributed fsdp2"
        )
    if config.batch_size % world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the world size {world_size}")


def start_process_group(config: LlamaConfig) -> tuple[torch.device, str, bool]:
    """This rank's device, the backend, and whether this call initialised the process group."""
    local_rank = launch_environment()[2]
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend)
    return device, dist.get_backend(), started


def wrap_model(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm and lm_head
    return model
