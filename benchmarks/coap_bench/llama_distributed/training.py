"""Training on every rank of a ``torchrun`` job, once per optimizer (:func:`run_llama_distributed`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from coap_torch.optim import LowRankOptimizer, enable_per_layer_updates

from .._quiet import gather_import_notes
from ..environment import hardware, versions
from ..llama import _BATCH_STREAM, LLAMA_PRESETS, LlamaConfig, _best, _loss, evaluate_heldout, run_settings
from ..llama import _fingerprint as llama_fingerprint
from ..llama_model import build_llama, projected_parameter_groups
from ..optimizers import OPTIMIZERS, build_optimizer
from ..runner import RunConfigurationError, compare_to_baseline, failed_result
from ..training import TrainingLoop, result_row, run_stem, start_measuring, sweep_lrs
from .checkpoint import DistributedCheckpoint
from .collectives import ENGINE_BYTES_METHOD, EngineCollectives
from .launch import check_options, launch_environment, start_process_group, wrap_model

__all__ = ["run_llama_distributed", "train_distributed"]


def _heldout_on_rank0(
    model: nn.Module, engine: str, config: LlamaConfig, vocab_size: int, windows: Tensor, device: torch.device
) -> float | None:
    """Held-out loss of the full model, computed on rank 0 (a collective under FSDP2: every rank calls it)."""
    if engine == "ddp":
        return evaluate_heldout(model.module, windows, config.batch_size) if dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    full = build_llama(LLAMA_PRESETS[config.preset], vocab_size, seed=config.seed, device=device)
    full.load_state_dict(state)
    return evaluate_heldout(full, windows, config.batch_size)


class _DistributedLoop(TrainingLoop):
    """The training loop on one rank: this rank's share of each global batch, the global batch's mean
    loss, the optimizer's collectives per step and the engine's on the last step."""

    def __init__(self, *args: Any, world_size: int, **kwargs: Any) -> None:
        super().__init__(*args, logs={"optimizer_bytes": []}, **kwargs)
        self.world_size = world_size
        self.comm = getattr(self.optimizer, "communication", None)
        self.engine: EngineCollectives | None = None
        self.engine_figures: dict[str, Any] | None = None  # the engine's bytes and ops, kept in checkpoints
        self._mark = 0

    def state_dict(self, step: int) -> dict[str, Any]:
        state = super().state_dict(step)
        state["communication"] = {"calls": self.comm.calls, "bytes": self.comm.bytes} if self.comm else None
        state["engine"] = self.engine_figures
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.comm is not None:  # not what the state's creation on loading logged
            self.comm.calls, self.comm.bytes = state["communication"]["calls"], state["communication"]["bytes"]
        self.engine_figures = state["engine"]

    def before_steps(self) -> None:
        self._mark = self.comm.bytes if self.comm is not None else 0

    def step_context(self, step: int) -> AbstractContextManager[Any]:
        if step != self.steps:  # the engine moves the same bytes every step: count one
            return contextlib.nullcontext()
        self.engine = EngineCollectives(self.optimizer)
        return self.engine

    def loss_value(self, loss: Tensor) -> float:
        # The mean of equal shares' mean losses is the global batch's mean loss.
        global_loss = loss.detach().reshape(1).clone()
        dist.all_reduce(global_loss)
        return global_loss.item() / self.world_size

    def after_step(self, step: int) -> None:
        total = self.comm.bytes if self.comm is not None else 0
        self.logs["optimizer_bytes"].append(total - self._mark)
        self._mark = total
        if step == self.steps:
            self.engine_figures = {"bytes": self.engine.bytes, "ops": self.engine.counted.ops}


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
    from ..text import TokenBatches

    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = OPTIMIZERS[name]
    settings = config.settings()
    start_measuring(device)
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device=device)
    model.train()
    model = wrap_model(model, config.distributed, device)
    split = projected_parameter_groups(model, config.recipe)
    optimizer = build_optimizer(name, [p for _, p in split.projected], [p for _, p in split.dense], lr, settings)
    batches = TokenBatches(data.train, config.batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM)
    share = config.batch_size // world_size
    loop = _DistributedLoop(
        model,
        optimizer,
        batches,
        lambda batch: _loss(model, batch),
        config=config,
        device=device,
        label=name if not config.lr_sweep else f"{name} lr={lr:g}",
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

    comm, engine = loop.comm, loop.engine_figures
    by_step = loop.logs["optimizer_bytes"]
    steady = [b for i, b in enumerate(by_step, start=1) if not spec.refreshes_at(i, settings)]
    result = result_row(
        name,
        spec,
        lr,
        per_layer=per_layer,
        **loop.measurements(
            spec, settings, items_per_step=config.batch_size * config.seq_len, throughput="tokens_per_s"
        ),
        heldout_loss=heldout,
        heldout_perplexity=None if heldout is None else math.exp(heldout) if heldout < 700 else float("inf"),
        workarounds=[],
        # Per-rank communication figures; rank 0 moves them into "ranks".
        optimizer_comm_calls=comm.calls if comm is not None else None,
        optimizer_comm_bytes=comm.bytes if comm is not None else None,
        optimizer_comm_bytes_per_step=comm.bytes / len(by_step) if comm is not None and by_step else None,
        optimizer_comm_steady_step_bytes=max(steady) if comm is not None and steady else None,
        optimizer_comm_bytes_by_step=by_step if comm is not None else None,
        engine_bytes_per_step=engine["bytes"] if engine is not None else 0,
        # The counted collectives by op (with per-layer updates, the optimizer's all-reduces in backward too).
        engine_collectives=engine["ops"] if engine is not None else {},
    )
    if device.type == "cpu":
        result["peak_memory_kind"] += " (since the rank's process started)"
    return result


#: Figures that differ per rank: kept per rank in ``ranks``, rank 0's at the top level of a result.
_PER_RANK = (
    "state_bytes",
    "peak_memory_bytes",
    "optimizer_comm_calls",
    "optimizer_comm_bytes",
    "optimizer_comm_bytes_per_step",
    "optimizer_comm_steady_step_bytes",
    "optimizer_comm_bytes_by_step",
    "engine_bytes_per_step",
    "engine_collectives",
    "iteration_ms",
    "step_ms",
    "process_id",
)


def _merge_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in per_rank if r.get("failed")]
    if failed:
        return failed[0]
    result = dict(per_rank[0])
    result["ranks"] = [{"rank": rank, **{key: r.get(key) for key in _PER_RANK}} for rank, r in enumerate(per_rank)]
    result["state_bytes_all_ranks"] = sum(r["state_bytes"] for r in per_rank)
    return result


def _guarded(name: str, lr: float, *args: Any) -> dict[str, Any]:
    # An optimizer that fails the same way on every rank (a peer that rejects DTensors) becomes a
    # failed row; a failure on one rank only leaves the others in a collective, and torchrun ends them.
    # A checkpoint of another configuration is refused on every rank: the user's error, raised.
    try:
        return train_distributed(name, lr, *args)
    except RunConfigurationError:
        raise
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
        lines = str(error).strip().splitlines()
        return failed_result(name, lr, f"{type(error).__name__}: {lines[0] if lines else ''}")


def run_llama_distributed(config: LlamaConfig) -> dict[str, Any] | None:
    """Train once per optimizer on every rank of a ``torchrun`` job; the run (as :func:`run_llama`'s) on rank 0.

    Other ranks return ``None``. The process group is created if needed, and then destroyed at the end.
    """
    from ..text import heldout_windows, load_token_data

    config = dataclasses.replace(config.resolved(), isolate=False)
    rank, world_size, _ = launch_environment()
    check_options(config, world_size)
    device, backend, started = start_process_group(config)
    try:

        def load() -> Any:
            return load_token_data(
                source="c4" if config.c4 else None,
                data_dir=config.data_dir,
                vocab_size=config.vocab_size,
                max_documents=config.max_documents,
            )

        # Rank 0 trains the tokenizer into the cache first; the others then read it.
        data = load() if rank == 0 else None
        dist.barrier()
        data = load() if data is None else data
        windows = heldout_windows(data, config.seq_len, config.max_heldout_windows)
        folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
        results = []
        for name in config.optimizers:
            runs = []
            for lr in sweep_lrs(config, name):
                checkpoint = folder / run_stem(name, lr, config.lr_sweep) if folder is not None else None
                mine = _guarded(name, lr, config, data, windows, device, checkpoint)
                gathered: list[Any] | None = [None] * world_size if rank == 0 else None
                dist.gather_object(mine, gathered, dst=0)
                if rank == 0:
                    runs.append(_merge_ranks(gathered))
            if rank == 0:
                results.append(_best(runs, config.lr_sweep))
        dist.barrier()  # no rank tears the group down while another still talks to it
        if rank != 0:
            return None
        compare_to_baseline(results)
        return {
            "config": _settings(config, data, windows, world_size, backend),
            "data": data.describe(),
            "versions": versions(),
            "hardware": hardware(device),
            "argv": list(config.argv),
            "results": results,
            "import_notes": gather_import_notes(results),
        }
    finally:
        if started:
            gc.collect()  # the runs' models and optimizers go before the process group (gloo can abort otherwise)
            dist.destroy_process_group()


def _settings(config: LlamaConfig, data: Any, windows: Tensor, world_size: int, backend: str) -> dict[str, Any]:
    return {
        **run_settings(config, data, windows),
        "world_size": world_size,
        "backend": backend,
        "engine": config.distributed,
        "batch_per_rank": config.batch_size // world_size,
        "engine_bytes_method": ENGINE_BYTES_METHOD,
    }
