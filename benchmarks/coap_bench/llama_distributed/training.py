"""Training on every rank of a ``torchrun`` job, once per optimizer (:func:`run_llama_distributed`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from coap_torch.optim import LowRankOptimizer, enable_per_layer_updates

from ..distributed import (
    DistributedCheckpoint,
    DistributedLoop,
    distributed_settings,
    engine_estimate_bytes,
    full_model_on_rank0,
    process_group,
    train_every_optimizer,
)
from ..llama import (
    LLAMA_PRESETS,
    LlamaConfig,
    _best,
    build_llama_run,
    causal_lm_loop,
    evaluate_heldout,
    load_llama_data,
    run_settings,
    token_batches,
    token_measurements,
)
from ..llama import _fingerprint as llama_fingerprint
from ..llama_model import build_llama
from ..optimizers import OPTIMIZERS
from ..training import job_run, result_row, start_measuring
from .launch import check_options, launch_environment, wrap_llama

__all__ = ["run_llama_distributed", "train_distributed"]


def _heldout_on_rank0(
    model: nn.Module, engine: str, config: LlamaConfig, vocab_size: int, windows: Tensor, device: torch.device
) -> float | None:
    """Held-out loss of the full model, computed on rank 0 (a collective under FSDP2: every rank calls it)."""
    full = full_model_on_rank0(
        model,
        engine,
        lambda: build_llama(LLAMA_PRESETS[config.preset], vocab_size, seed=config.seed, device=device),
    )
    return evaluate_heldout(full, windows, config.batch_size) if full is not None else None


def _fingerprint(name: str, lr: float, config: LlamaConfig, data: Any, world_size: int) -> dict[str, Any]:
    """What must match for a distributed checkpoint to be continued: the one-process run's, and the layout."""
    return {
        **llama_fingerprint(name, lr, config, data),
        "engine": config.distributed,
        "world_size": world_size,
        "per_layer": config.per_layer,
    }


def train_distributed(
    name: str,
    lr: float,
    config: LlamaConfig,
    data: Any,
    windows: Tensor,
    device: torch.device,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """One optimizer's run on this rank (continuing ``checkpoint``, a folder, when it holds one); the
    held-out figures are filled in on rank 0 only."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = OPTIMIZERS[name]
    start_measuring(device)
    model, optimizer = build_llama_run(
        name, lr, config, data.vocab_size, device, lambda model: wrap_llama(model, config.distributed, device)
    )
    batches = token_batches(config, data.train)
    share = config.batch_size // world_size
    loop = causal_lm_loop(
        name,
        lr,
        config,
        model,
        optimizer,
        batches,
        device,
        DistributedLoop,
        next_batch=lambda: batches.next()[rank * share : (rank + 1) * share].to(device),
        show_progress=rank == 0,
        world_size=world_size,
    )
    # Loaded before per-layer updates are enabled: loading may step the optimizer once to create its state.
    loop.resume(
        DistributedCheckpoint(checkpoint, _fingerprint(name, lr, config, data, world_size))
        if checkpoint is not None
        else None
    )
    per_layer = config.per_layer and isinstance(optimizer, LowRankOptimizer)
    updates = enable_per_layer_updates(optimizer) if per_layer else None
    loop.run()
    if updates is not None:
        updates.remove()
    heldout = _heldout_on_rank0(model, config.distributed, config, data.vocab_size, windows, device)

    result = result_row(
        name,
        spec,
        lr,
        per_layer=per_layer,
        **token_measurements(loop, spec, config, heldout),
        workarounds=[],
        # Per-rank communication figures; rank 0 moves them into "ranks".
        **loop.communication(spec, config.settings(), engine_estimate_bytes(model, config.distributed)),
    )
    if device.type == "cpu":
        result["peak_memory_kind"] += " (since the rank's process started)"
    return result


def run_llama_distributed(config: LlamaConfig) -> dict[str, Any] | None:
    """Train once per optimizer on every rank of a ``torchrun`` job; the run (as :func:`run_llama`'s) on rank 0.

    Other ranks return ``None``. The process group is created if needed, and then destroyed at the end.
    """
    from ..text import heldout_windows

    config = dataclasses.replace(config.resolved(), isolate=False)
    rank, world_size, _ = launch_environment()
    check_options(config, world_size)
    with process_group(config.device) as (device, backend):
        # Rank 0 trains the tokenizer into the cache first; the others then read it.
        data = load_llama_data(config) if rank == 0 else None
        dist.barrier()
        data = load_llama_data(config) if data is None else data
        windows = heldout_windows(data, config.seq_len, config.max_heldout_windows)
        results = train_every_optimizer(
            config,
            lambda name, lr, checkpoint: train_distributed(name, lr, config, data, windows, device, checkpoint),
            lambda runs: _best(runs, config.lr_sweep),
        )
        if results is None:
            return None
        settings = {**run_settings(config, data, windows), **distributed_settings(config, world_size, backend)}
        return job_run(config, settings, data.describe(), results, device)
