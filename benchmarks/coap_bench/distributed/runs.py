"""What every distributed job does around its model: the training loop of one rank (:class:`DistributedLoop`),
its communication figures, the trained model whole on rank 0, and the runs of every optimizer gathered on
rank 0 (:func:`train_every_optimizer`)."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..runner import RunConfigurationError, compare_to_baseline, failed_result
from ..training import TrainingLoop, run_stem, sweep_lrs
from .collectives import ENGINE_BYTES_METHOD, EngineCollectives

__all__ = [
    "ENGINE_ESTIMATE_METHOD",
    "PER_RANK",
    "DistributedLoop",
    "distributed_settings",
    "engine_estimate_bytes",
    "full_model_on_rank0",
    "merge_ranks",
    "train_every_optimizer",
]

#: How the engine's bytes are estimated from the model (written to the JSON and the table notes).
ENGINE_ESTIMATE_METHOD = (
    "from the parameter bytes P: FSDP2 all-gathers the parameters in forward and in backward and "
    "reduce-scatters the gradients (3 P); DDP all-reduces the gradients once (P)"
)


class DistributedLoop(TrainingLoop):
    """The training loop on one rank: this rank's share of each global batch (``next_batch``), the global
    batch's mean loss, the optimizer's collectives per step (calls and payload bytes, from
    ``optimizer.communication``) and the engine's on the last step (:class:`EngineCollectives`).

    ``logs`` are further logs of a subclass, as for :class:`~coap_bench.training.TrainingLoop`.
    """

    def __init__(self, *args: Any, world_size: int, logs: dict[str, list[Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, logs={"optimizer_bytes": [], "optimizer_calls": [], **(logs or {})}, **kwargs)
        self.world_size = world_size
        self.comm = getattr(self.optimizer, "communication", None)
        self.engine: EngineCollectives | None = None
        self.engine_figures: dict[str, Any] | None = None  # the engine's bytes and ops, kept in checkpoints
        self._mark = (0, 0)

    def _counts(self) -> tuple[int, int]:
        return (self.comm.calls, self.comm.bytes) if self.comm is not None else (0, 0)

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
        self._mark = self._counts()

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
        calls, total = self._counts()
        self.logs["optimizer_calls"].append(calls - self._mark[0])
        self.logs["optimizer_bytes"].append(total - self._mark[1])
        self._mark = (calls, total)
        if step == self.steps:
            self.engine_figures = {"bytes": self.engine.bytes, "ops": self.engine.counted.ops}

    def communication(self, spec: Any, settings: Any, engine_estimate: int) -> dict[str, Any]:
        """This rank's communication figures of the run (the keys of :data:`PER_RANK` they fill).

        Steps are split by ``spec.refreshes_at``: steady steps (their largest payload) and projection
        refreshes (their mean payload); ``engine_estimate`` is :func:`engine_estimate_bytes`.
        """
        comm, engine = self.comm, self.engine_figures
        by_step, calls = self.logs["optimizer_bytes"], self.logs["optimizer_calls"]
        refreshes = [spec.refreshes_at(i, settings) for i in range(1, len(by_step) + 1)]
        steady = [b for b, refresh in zip(by_step, refreshes, strict=True) if not refresh]
        refreshing = [b for b, refresh in zip(by_step, refreshes, strict=True) if refresh]
        logged = comm is not None
        per_step = logged and bool(by_step)
        engine_bytes = engine["bytes"] if engine is not None else 0
        share = comm.bytes / len(by_step) if per_step else None
        return {
            "optimizer_comm_calls": comm.calls if logged else None,
            "optimizer_comm_bytes": comm.bytes if logged else None,
            "optimizer_comm_calls_per_step": comm.calls / len(by_step) if per_step else None,
            "optimizer_comm_bytes_per_step": share,
            "optimizer_comm_steady_step_bytes": max(steady) if logged and steady else None,
            "optimizer_comm_refresh_step_bytes": statistics.fmean(refreshing) if logged and refreshing else None,
            "optimizer_comm_calls_by_step": calls if logged else None,
            "optimizer_comm_bytes_by_step": by_step if logged else None,
            "engine_bytes_per_step": engine_bytes,
            "engine_estimate_bytes_per_step": engine_estimate,
            "optimizer_to_engine": share / engine_bytes if share is not None and engine_bytes else None,
            # The counted collectives by op (with per-layer updates, the optimizer's all-reduces in backward too).
            "engine_collectives": engine["ops"] if engine is not None else {},
        }


def engine_estimate_bytes(model: nn.Module, engine: str) -> int:
    """The engine's payload bytes per step estimated from the trainable parameters' bytes ``P`` (the whole
    model's, however it is sharded): ``3 P`` under FSDP2, ``P`` under DDP (:data:`ENGINE_ESTIMATE_METHOD`)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * nbytes if engine == "fsdp2" else nbytes


def full_model_on_rank0(model: nn.Module, engine: str, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The trained ``model`` whole on rank 0, ``None`` on the other ranks.

    Under DDP, the wrapped module; under FSDP2, ``build()`` (a fresh model of the same shapes) loaded
    with the full state dict gathered to rank 0's CPU: a collective, so every rank calls it.
    """
    if engine == "ddp":
        return model.module if dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    full = build()
    full.load_state_dict(state)
    return full


#: Figures that differ per rank: kept per rank in ``ranks``, rank 0's at the top level of a result.
PER_RANK = (
    "state_bytes",
    "peak_memory_bytes",
    "optimizer_comm_calls",
    "optimizer_comm_bytes",
    "optimizer_comm_calls_per_step",
    "optimizer_comm_bytes_per_step",
    "optimizer_comm_steady_step_bytes",
    "optimizer_comm_refresh_step_bytes",
    "optimizer_comm_calls_by_step",
    "optimizer_comm_bytes_by_step",
    "engine_bytes_per_step",
    "engine_estimate_bytes_per_step",
    "optimizer_to_engine",
    "engine_collectives",
    "iteration_ms",
    "step_ms",
    "process_id",
)


def merge_ranks(per_rank: list[dict[str, Any]], keys: Sequence[str] = PER_RANK) -> dict[str, Any]:
    """One result from every rank's: rank 0's, with ``ranks`` (each rank's ``keys``) and the state bytes of
    all ranks together; the first failed rank's result if any failed."""
    failed = [r for r in per_rank if r.get("failed")]
    if failed:
        return failed[0]
    result = dict(per_rank[0])
    result["ranks"] = [{"rank": rank, **{key: r.get(key) for key in keys}} for rank, r in enumerate(per_rank)]
    result["state_bytes_all_ranks"] = sum(r["state_bytes"] for r in per_rank)
    return result


def _guarded(train: Callable[..., dict[str, Any]], name: str, lr: float, checkpoint: Path | None) -> dict[str, Any]:
    # An optimizer that fails the same way on every rank (a peer that rejects DTensors) becomes a
    # failed row; a failure on one rank only leaves the others in a collective, and torchrun ends them.
    # A checkpoint of another configuration is refused on every rank: the user's error, raised.
    try:
        return train(name, lr, checkpoint)
    except RunConfigurationError:
        raise
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
        lines = str(error).strip().splitlines()
        return failed_result(name, lr, f"{type(error).__name__}: {lines[0] if lines else ''}")


def train_every_optimizer(
    config: Any,
    train: Callable[[str, float, Path | None], dict[str, Any]],
    best: Callable[[list[dict[str, Any]]], dict[str, Any]],
    keys: Sequence[str] = PER_RANK,
) -> list[dict[str, Any]] | None:
    """Every optimizer of ``config``, at every lr of its sweep, trained on every rank: on rank 0 the results.

    ``train(name, lr, checkpoint)`` runs on every rank; ``checkpoint`` is the run's folder under
    ``config.checkpoint_dir`` (:func:`~coap_bench.training.run_stem`) or ``None``. Rank 0 gathers the
    ranks' results into one (:func:`merge_ranks` with ``keys``), keeps ``best(runs)`` of each
    optimizer's lrs and compares them with AdamW; the other ranks return ``None``.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
    results = []
    for name in config.optimizers:
        runs = []
        for lr in sweep_lrs(config, name):
            checkpoint = folder / run_stem(name, lr, config.lr_sweep) if folder is not None else None
            mine = _guarded(train, name, lr, checkpoint)
            gathered: list[Any] | None = [None] * world_size if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank == 0:
                runs.append(merge_ranks(gathered, keys))
        if rank == 0:
            results.append(best(runs))
    dist.barrier()  # no rank tears the group down while another still talks to it
    if rank != 0:
        return None
    compare_to_baseline(results)
    return results


def distributed_settings(config: Any, world_size: int, backend: str) -> dict[str, Any]:
    """What a distributed run adds to the ``config`` of its result."""
    return {
        "world_size": world_size,
        "backend": backend,
        "engine": config.distributed,
        "batch_per_rank": config.batch_size // world_size,
        "engine_bytes_method": ENGINE_BYTES_METHOD,
        "engine_estimate_method": ENGINE_ESTIMATE_METHOD,
    }
