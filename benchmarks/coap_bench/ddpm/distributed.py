"""``coap-bench ddpm`` on several processes (DDP or FSDP2): :func:`run_ddpm_distributed`.

Distributed runs are started by ``torchrun``::

    torchrun --nproc-per-node 2 -m coap_bench.cli ddpm --distributed fsdp2 --preset micro --steps 20

Every rank builds the same UNet (:func:`~coap_bench.ddpm.build_unet`, same seed) and wraps it:
``DistributedDataParallel``, or FSDP2 with ``fully_shard`` on each down block, the mid block and
each up block of the ``UNet2DModel``, then on the root (``conv_in``, the time embedding, the
output norm and convolution). The optimizers see the parameters as the one-process job hands them over
(every parameter offered for projection), sharded on dim 0 under FSDP2: matrices, Tucker-2 3x3
kernels, 1x1 convolutions and dense tensors alike.

Each step, every rank draws the global batch a one-process run draws (:class:`ImageBatches`:
the same images, noise and timesteps) and trains on its slice of it: ``--batch-size`` images
split evenly over the ranks, so a DDP run follows the loss curve of a one-process run. The
learning-rate schedule, the held-out set and the sampling noise are the one-process job's.

The rank's :class:`~coap_bench.distributed.DistributedLoop` logs the optimizer's own collectives
per step (``optimizer.communication``) and counts the engine's on the last step. Rank 0 gathers
the trained model whole (the full state dict under FSDP2) and scores it as the one-process job
does: held-out denoising loss, then samples, clf-FD and, with ``--fid``, FID. It prints the ddpm
table, then per rank the optimizer state and the communication table
(:func:`format_ddpm_distributed_table`). ``--checkpoint-dir`` saves and resumes runs with
``torch.distributed.checkpoint`` (:class:`~coap_bench.distributed.DistributedCheckpoint`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import (
    PER_RANK,
    DistributedCheckpoint,
    DistributedLoop,
    check_engine,
    distributed_settings,
    engine_estimate_bytes,
    format_rank_table,
    full_model_on_rank0,
    launch_environment,
    process_group,
    train_every_optimizer,
    wrap_model,
)
from ..environment import torch_threads
from ..optimizers import OPTIMIZERS, build_optimizer
from ..training import HeldoutLoop, best_of_sweep, run_label, run_recording_warnings, start_measuring
from .data import ImageBatches
from .model import build_unet, denoising_loss, evaluate_heldout, noise_scheduler
from .presets import DDPM_PRESETS, DdpmConfig
from .report import format_ddpm_table
from .training import (
    _BATCH_STREAM,
    _SWEEP_KEYS,
    DdpmInputs,
    ddpm_result,
    load_inputs,
    score_samples,
    summarize_run,
)
from .training import _fingerprint as ddpm_fingerprint

__all__ = ["format_ddpm_distributed_table", "run_ddpm_distributed", "unet_blocks", "wrap_unet"]

#: The per-rank figures of a result: the shared ones and the state by kind.
_RANK_KEYS = (*PER_RANK, "state_bytes_by_kind")


def unet_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a ``UNet2DModel`` that FSDP2 shards one by one: each down block, the mid block, each up block."""
    mid = [model.mid_block] if getattr(model, "mid_block", None) is not None else []
    return [*model.down_blocks, *mid, *model.up_blocks]


def wrap_unet(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """``model`` under DDP, or FSDP2 on each block (:func:`unet_blocks`) and on the root."""
    return wrap_model(model, engine, device, unet_blocks(model))


class _DistributedDdpmLoop(HeldoutLoop, DistributedLoop):
    """The loop of one rank, with the one-process job's held-out evaluations before and during training
    (every ``eval_every`` steps) on rank 0; ``evaluate()`` is called on every rank (a collective under FSDP2)."""


def _fingerprint(name: str, lr: float, config: DdpmConfig, inputs: DdpmInputs, world_size: int) -> dict[str, Any]:
    """What must match for a distributed checkpoint to be continued: the one-process run's, and the layout."""
    return {**ddpm_fingerprint(name, lr, config, inputs.data), "engine": config.distributed, "world_size": world_size}


def _train_rank(
    name: str, lr: float, config: DdpmConfig, inputs: DdpmInputs, device: torch.device, checkpoint: Path | None
) -> dict[str, Any]:
    """One optimizer's run on this rank (continuing ``checkpoint``, a folder, when it holds one); the held-out
    and sample figures are filled in on rank 0 only."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = OPTIMIZERS[name]
    settings = config.settings()
    preset = DDPM_PRESETS[config.preset]
    baseline_rss = start_measuring(device)
    model = build_unet(preset, seed=config.seed, device=device)
    model.train()
    model = wrap_unet(model, config.distributed, device)
    noise = noise_scheduler()
    optimizer = build_optimizer(name, list(model.parameters()), [], lr, settings)
    batches = ImageBatches(
        inputs.data.train, config.batch_size, noise.config.num_train_timesteps, seed=config.seed + _BATCH_STREAM
    )
    share = config.batch_size // world_size
    mine = slice(rank * share, (rank + 1) * share)
    label = run_label(name, lr, config.lr_sweep)

    def whole() -> nn.Module | None:
        return full_model_on_rank0(
            model, config.distributed, lambda: build_unet(preset, seed=config.seed, device=device)
        )

    def evaluate() -> float | None:
        full = whole()
        return evaluate_heldout(full, noise, inputs.heldout, config.eval_batch_size) if full is not None else None

    loop = _DistributedDdpmLoop(
        model,
        optimizer,
        batches,
        lambda batch: denoising_loss(model, noise, *batch),
        evaluate=evaluate,
        config=config,
        device=device,
        label=label,
        # The one-process job's batch (images, noise, timesteps), this rank's slice of it.
        next_batch=lambda: tuple(t[mine].to(device) for t in batches.next()),
        show_progress=rank == 0,
        world_size=world_size,
    )
    loop.resume(
        DistributedCheckpoint(checkpoint, _fingerprint(name, lr, config, inputs, world_size))
        if checkpoint is not None
        else None
    )
    messages = run_recording_warnings(loop)
    full = whole()
    heldout_loss, scores = None, {}
    if full is not None:  # rank 0: scored as the one-process job scores its model
        heldout_loss = evaluate_heldout(full, noise, inputs.heldout, config.eval_batch_size)
        loop.logs["heldout_curve"].append({"step": len(loop.losses), "loss": heldout_loss})
        scores = score_samples(full, name, lr, config, inputs.scorer, inputs.fid_reference, label)
    del full
    result = ddpm_result(
        name,
        lr,
        config,
        loop,
        baseline_rss,
        heldout_loss,
        scores,
        workarounds=[],
        messages=messages,
        # Per-rank communication figures; rank 0 moves them into "ranks".
        **loop.communication(spec, settings, engine_estimate_bytes(model, config.distributed)),
    )
    if device.type == "cpu":
        result["peak_memory_kind"] += " (since the rank's process started)"
    return result


def run_ddpm_distributed(config: DdpmConfig) -> dict[str, Any] | None:
    """Train once per optimizer on every rank of a ``torchrun`` job; the run (as :func:`run_ddpm`'s, with the
    distributed settings and each result's ``ranks``) on rank 0.

    Other ranks return ``None``. The process group is created if needed, and then destroyed at the end.
    """
    config = dataclasses.replace(config.resolved(), isolate=False)
    rank, world_size, _ = launch_environment("ddpm")
    check_engine(config.distributed, config.batch_size, world_size)
    with torch_threads(config.threads), process_group(config.device) as (device, backend):
        # Rank 0 first: it may fill a dataset cache, and it alone trains the sample scorer (it scores the samples).
        inputs = load_inputs(config) if rank == 0 else None
        dist.barrier()
        inputs = load_inputs(config, scoring=False) if inputs is None else inputs
        results = train_every_optimizer(
            config,
            lambda name, lr, checkpoint: _train_rank(name, lr, config, inputs, device, checkpoint),
            lambda runs: best_of_sweep(runs, config.lr_sweep, _SWEEP_KEYS),
            _RANK_KEYS,
        )
        if results is None:
            return None
        run = summarize_run(config, inputs, results, device)
        run["config"].update(distributed_settings(config, world_size, backend))
        return run


def format_ddpm_distributed_table(run: dict[str, Any]) -> str:
    """:func:`~coap_bench.ddpm.format_ddpm_table`, then the per-rank state and communication table."""
    return "\n".join([format_ddpm_table(run), "", *format_rank_table(run, "images")])
