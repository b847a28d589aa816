"""The llama job's side of starting a rank: the options it accepts, and its model wrapped by the engine
(DDP, or FSDP2 on each decoder layer and the root)."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import ENGINES, check_engine, launch_environment, wrap_model
from ..llama import LlamaConfig

__all__ = ["ENGINES", "check_options", "launch_environment", "wrap_llama"]


def check_options(config: LlamaConfig, world_size: int) -> None:
    check_engine(config.distributed, config.batch_size, world_size)
    if config.per_layer and config.distributed == "ddp":
        raise ValueError(
            "--per-layer cannot be combined with --distributed ddp: DDP averages gradients after the per-layer "
            "hooks run, so each rank would update with its own gradient; use --distributed fsdp2"
        )


def wrap_llama(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """``model`` under DDP, or FSDP2 on each decoder layer and on the root (embeddings, final norm, lm_head)."""
    return wrap_model(model, engine, device, model.model.layers)
