"""``coap-bench llama`` on several processes (DDP or FSDP2), and per-layer updates during backward.

Distributed runs are started by ``torchrun``::

    torchrun --nproc-per-node 2 -m coap_torch.bench.cli llama --distributed fsdp2 --preset micro --steps 20

Every rank builds the same model (:func:`~coap_torch.bench.llama_model.build_llama`, same seed),
wraps it (``DistributedDataParallel``, or ``fully_shard`` on each decoder layer and on the root)
and trains on its slice of each global batch: the global batch is ``--batch-size`` sequences, the
same batches a single-process run draws, split evenly across ranks. Runs stay in the ranks'
processes (no per-run subprocess). Backend and device follow ``--device``: gloo on the CPU,
NCCL and ``cuda:LOCAL_RANK`` on GPUs.

Each rank measures its optimizer-state bytes (a DTensor state counts by its local shard), the
optimizer's own collectives (``optimizer.communication`` of a COAP optimizer; other optimizers
keep no such log and show ``n/a``) and the collectives the engine issues during one step's
forward and backward. Rank 0 gathers the figures, evaluates the held-out loss on the full model and prints
the table.

Collective bytes are *payloads*: the size of each collective's full tensor (the output of an
all-gather, the input of a reduce-scatter, the buffer of an all-reduce), as
:class:`~coap_torch.optim.CommunicationLog` counts the optimizer's all-reduces. What a rank
actually sends is a fraction of that: ``(W - 1) / W`` for all-gather and reduce-scatter, twice
that for a ring all-reduce.

With ``--checkpoint-dir DIR``, each run saves everything every ``--checkpoint-every`` steps to
``DIR/<optimizer>/`` with ``torch.distributed.checkpoint`` (:class:`DistributedCheckpoint`: the
model and optimizer state dicts, each rank its shards under FSDP2, plus every rank's RNG, batch
stream, scheduler and logs; ``latest.json``, written by rank 0 last, names the complete
checkpoint) and continues from there when the job is started again with the same options and
number of ranks, ending with the numbers of a job that never stopped. ``DIR`` must be a folder
every rank sees (one machine, or a shared file system).

``--per-layer`` updates each parameter during backward (:func:`~coap_torch.optim.enable_per_layer_updates`)
in single-process and FSDP2 runs, and :func:`measure_per_layer_saving` measures what it saves: the
peak of allocated tensor bytes of a few training steps with and without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import shutil
import textwrap
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..optim import LowRankOptimizer, enable_per_layer_updates
from ..utils.allocations import PeakAllocations
from ._quiet import gather_import_notes
from .environment import hardware, versions
from .llama import (
    _BATCH_STREAM,
    LLAMA_PRESETS,
    LlamaConfig,
    _best,
    _loss,
    evaluate_heldout,
    format_llama_table,
    run_settings,
)
from .llama import _fingerprint as llama_fingerprint
from .llama_model import build_llama, projected_parameter_groups
from .optimizers import OPTIMIZERS, build_optimizer
from .report import format_bytes, markdown_table
from .runner import (
    RunConfigurationError,
    atomic_save,
    atomic_write_text,
    check_fingerprint,
    compare_to_baseline,
    failed_result,
    unreadable_checkpoint,
)
from .text import remove_stale_temporaries
from .training import TrainingLoop, result_row, run_stem, start_measuring, sweep_lrs

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = [
    "ENGINES",
    "CollectiveBytes",
    "DistributedCheckpoint",
    "EngineCollectives",
    "format_distributed_table",
    "measure_per_layer_saving",
    "run_llama_command",
    "run_llama_distributed",
]

#: Values of ``--distributed``.
ENGINES = ("ddp", "fsdp2")
#: How the engine's bytes are obtained (written to the JSON and the table notes).
ENGINE_BYTES_METHOD = (
    "counted: the payloads of the c10d collectives of the last step's forward and backward, seen by a "
    "TorchDispatchMode, less any the optimizer logs itself (per-layer updates run inside backward)"
)
#: Steps of :func:`measure_per_layer_saving` after its warm-up step.
PER_LAYER_STEPS = 2
#: Format of the checkpoints of distributed runs (``latest.json`` and the folders it points to).
_CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------- collectives


class CollectiveBytes(TorchDispatchMode):
    """Context manager: calls and payload bytes of every c10d collective issued inside it, per op.

    ProcessGroup methods dispatch through ``c10d::*`` ops, so this sees what DDP's reducer and
    FSDP2's hooks issue as well as direct ``torch.distributed`` calls. The payload of an op is the
    larger of its first two tensor arguments (output and input of ``_allgather_base_`` /
    ``_reduce_scatter_base_``; the buffers of ``allreduce_``): the full tensor either way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, dict[str, int]] = {}
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name.startswith("c10d.") and not self.paused:
            sides = [_tensor_bytes(arg) for arg in args[:2]]
            entry = self.ops.setdefault(name.removeprefix("c10d.").removesuffix(".default"), {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += max(sides, default=0)
        return func(*args, **(kwargs or {}))

    @property
    def bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.ops.values())


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, Tensor))


class EngineCollectives:
    """Context manager: the collectives the engine (DDP, FSDP2) issues in a region of training.

    Counts every c10d collective (:class:`CollectiveBytes`) except those of ``optimizer.step()``
    (paused by step hooks: a peer's DTensor ops may communicate there) and those a COAP optimizer
    logs in ``optimizer.communication`` outside ``step()`` (per-layer updates run inside backward).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.counted = CollectiveBytes()
        self._log = getattr(optimizer, "communication", None)
        self._outside_step = 0  # optimizer-logged bytes counted by ``counted``

    def _logged(self) -> int:
        return self._log.bytes if self._log is not None else 0

    def __enter__(self) -> Self:
        self._handles = [self.optimizer.register_step_pre_hook(self._pause),
                         self.optimizer.register_step_post_hook(self._resume)]
        self._mark = self._logged()
        self.counted.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.counted.__exit__(*exc)
        self._outside_step += self._logged() - self._mark
        for handle in self._handles:
            handle.remove()

    def _pause(self, *_: Any) -> None:
        self.counted.paused = True
        self._outside_step += self._logged() - self._mark

    def _resume(self, *_: Any) -> None:
        self.counted.paused = False
        self._mark = self._logged()

    @property
    def bytes(self) -> int:
        return self.counted.bytes - self._outside_step


# --------------------------------------------------------------------------------------- launching


def launch_environment() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the variables ``torchrun`` sets; ``ValueError`` without them."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise ValueError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); launch it as "
            "`torchrun --nproc-per-node 2 -m coap_torch.bench.cli llama --distributed fsdp2 ...`"
        )
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _check(config: LlamaConfig, world_size: int) -> None:
    if config.distributed not in ENGINES:
        raise ValueError(f"unknown --distributed {config.distributed!r}; choose from {', '.join(ENGINES)}")
    if config.per_layer and config.distributed == "ddp":
        raise ValueError(
            "--per-layer cannot be combined with --distributed ddp: DDP averages gradients after the per-layer "
            "hooks run, so each rank would update with its own gradient; use --distributed fsdp2"
        )
    if config.batch_size % world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the world size {world_size}")


def _setup(config: LlamaConfig) -> tuple[torch.device, str, bool]:
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


def _wrap(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
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


def _heldout_on_rank0(model: nn.Module, engine: str, config: LlamaConfig, vocab_size: int, windows: Tensor,
                      device: torch.device) -> float | None:
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


# ---------------------------------------------------------------------------------------- training


def _read_marker(path: Path) -> dict[str, Any] | str:
    """A run's ``latest.json``, or why it cannot be read."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"it is truncated or corrupted ({type(error).__name__})"
    if not isinstance(marker, dict) or not isinstance(marker.get("directory"), str):
        return "it names no checkpoint folder"
    return marker


class DistributedCheckpoint:
    """A run's checkpoints under ``folder`` (one folder per optimizer and lr), with ``torch.distributed.checkpoint``.

    Every ``checkpoint_every`` steps, all ranks write ``step-NNNNNNNN/``: the model and optimizer
    state dicts (``get_state_dict``, then ``dcp.save``: each rank its shards, under FSDP2) and
    ``rank-R.pt``, what :meth:`~coap_torch.bench.training.TrainingLoop.state_dict` holds on rank
    ``R`` (scheduler, batch stream, RNG, loss and time logs, communication counts). After a
    barrier, rank 0 points ``latest.json`` at the folder (written through a rename) and removes
    the older ones: a save that never finished is never loaded. ``latest.json`` also holds the
    run's fingerprint (its options, world size and engine); a checkpoint of another configuration
    raises :class:`~coap_torch.bench.runner.RunConfigurationError` on every rank.
    """

    MARKER = "latest.json"

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        # JSON holds lists where the fingerprint has tuples: compare what the marker reads back.
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def _latest(self) -> dict[str, Any] | None:
        """The marker, read on rank 0 and broadcast (so every rank takes the same decision); one that cannot be
        read raises :class:`~coap_torch.bench.runner.CheckpointError` on every rank."""
        path = self.folder / self.MARKER
        marker: list[Any] = [None]
        if dist.get_rank() == 0:
            remove_stale_temporaries(path)  # left by a save that was killed
            if path.is_file():
                marker[0] = _read_marker(path)
        dist.broadcast_object_list(marker, src=0)
        if isinstance(marker[0], str):
            raise unreadable_checkpoint(path, marker[0], self.folder)
        return marker[0]

    def load(self, loop: TrainingLoop) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        latest = self._latest()
        if latest is None:
            return
        check_fingerprint(self.folder, latest.get("format"), latest.get("fingerprint"), _CHECKPOINT_FORMAT,
                          self.fingerprint)
        directory = self.folder / latest["directory"]
        # On an optimizer without state yet, get_state_dict creates it (a step on zero gradients, at lr 0).
        model_state, optimizer_state = get_state_dict(loop.model, loop.optimizer)
        try:
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
        except Exception as error:  # noqa: BLE001 - missing or damaged shards; DCP raises on every rank
            raise unreadable_checkpoint(directory, error, self.folder) from None
        set_state_dict(loop.model, loop.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        rank_file = directory / f"rank-{dist.get_rank()}.pt"
        try:
            saved = torch.load(rank_file, map_location=loop.device, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
            raise unreadable_checkpoint(rank_file, error, self.folder) from None
        loop.load_state_dict(saved)

    def save(self, loop: TrainingLoop, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rank = dist.get_rank()
        directory = self.folder / f"step-{step:08d}"
        if rank == 0 and directory.exists():  # left by a save that was interrupted
            shutil.rmtree(directory)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(loop.model, loop.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
        atomic_save(loop.state_dict(step), directory / f"rank-{rank}.pt")
        dist.barrier()  # every rank's files are complete
        if rank != 0:
            return
        marker = {"format": _CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
                  "directory": directory.name, "world_size": dist.get_world_size()}
        atomic_write_text(json.dumps(marker, indent=1), self.folder / self.MARKER)
        for old in self.folder.glob("step-*"):
            if old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)


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
    return {**llama_fingerprint(name, lr, config, data), "engine": config.distributed, "world_size": world_size,
            "per_layer": config.per_layer}


def train_distributed(name: str, lr: float, config: LlamaConfig, data: Any, windows: Tensor,
                      device: torch.device, checkpoint: Path | None = None) -> dict[str, Any]:
    """One optimizer's run on this rank (continuing ``checkpoint``, a folder, when it holds one); the
    held-out figures are filled in on rank 0 only."""
    from .text import TokenBatches

    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = OPTIMIZERS[name]
    settings = config.settings()
    start_measuring(device)
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device=device)
    model.train()
    model = _wrap(model, config.distributed, device)
    split = projected_parameter_groups(model, config.recipe)
    optimizer = build_optimizer(name, [p for _, p in split.projected], [p for _, p in split.dense], lr, settings)
    batches = TokenBatches(data.train, config.batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM)
    share = config.batch_size // world_size
    loop = _DistributedLoop(model, optimizer, batches, lambda batch: _loss(model, batch), config=config,
                            device=device, label=name if not config.lr_sweep else f"{name} lr={lr:g}",
                            next_batch=lambda: batches.next()[rank * share : (rank + 1) * share].to(device),
                            show_progress=rank == 0, world_size=world_size)
    # Loaded before per-layer updates are enabled: loading may step the optimizer once to create its state.
    loop.resume(DistributedCheckpoint(checkpoint, _fingerprint(name, lr, config, data, world_size))
                if checkpoint is not None else None)
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
        name, spec, lr, per_layer=per_layer,
        **loop.measurements(spec, settings, items_per_step=config.batch_size * config.seq_len,
                            throughput="tokens_per_s"),
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
_PER_RANK = ("state_bytes", "peak_memory_bytes", "optimizer_comm_calls", "optimizer_comm_bytes",
             "optimizer_comm_bytes_per_step", "optimizer_comm_steady_step_bytes", "optimizer_comm_bytes_by_step",
             "engine_bytes_per_step", "engine_collectives", "iteration_ms", "step_ms", "process_id")


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
    from .text import heldout_windows, load_token_data

    config = dataclasses.replace(config.resolved(), isolate=False)
    rank, world_size, _ = launch_environment()
    _check(config, world_size)
    device, backend, started = _setup(config)
    try:
        def load() -> Any:
            return load_token_data(source="c4" if config.c4 else None, data_dir=config.data_dir,
                                   vocab_size=config.vocab_size, max_documents=config.max_documents)

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
        return {"config": _settings(config, data, windows, world_size, backend), "data": data.describe(),
                "versions": versions(), "hardware": hardware(device), "argv": list(config.argv), "results": results,
                "import_notes": gather_import_notes(results)}
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


# ------------------------------------------------------------------------------------------ report

_RANK_HEADER = ["optimizer", "rank", "state", "opt comm/step", "opt comm steady", "engine/step", "opt / engine"]


def _maybe_bytes(value: float | None) -> str:
    return "n/a" if value is None else format_bytes(round(value))


def _rank_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result.get("ranks", []):
        share = r["optimizer_comm_bytes_per_step"]
        ratio = "n/a" if share is None or not r["engine_bytes_per_step"] else f"{share / r['engine_bytes_per_step']:.2%}"
        rows.append([result["name"], str(r["rank"]), format_bytes(r["state_bytes"]), _maybe_bytes(share),
                     _maybe_bytes(r["optimizer_comm_steady_step_bytes"]), _maybe_bytes(r["engine_bytes_per_step"]),
                     ratio])
    return rows


def format_distributed_table(run: dict[str, Any]) -> str:
    """:func:`~coap_torch.bench.llama.format_llama_table`, then the per-rank state and communication table."""
    config = run["config"]
    text = [format_llama_table(run, notes=True)]
    per_layer = [r["name"] for r in run["results"] if r.get("per_layer")]
    if per_layer:
        remark = (f"per-layer updates: {', '.join(per_layer)} updated each parameter inside backward, so their "
                  "step ms is the empty optimizer.step() and iter ms includes the updates")
        text += ["", remark]
    if "per_layer_saving" in run:
        text += ["", format_per_layer_saving(run["per_layer_saving"])]
    if config.get("engine") is None:
        return "\n".join(text)
    rows = [row for result in run["results"] for row in _rank_rows(result)]
    title = (f"per rank: {config['engine']} on {config['world_size']} ranks ({config['backend']}), "
             f"{config['batch_per_rank']} sequences per rank and step")
    text += ["", title, ""]
    text += markdown_table(_RANK_HEADER, rows)
    notes = (
        "state: the rank's optimizer-state bytes (DTensor state counted by its local shard); opt comm/step: the "
        "optimizer's own collectives (optimizer.communication), payload bytes per step amortised over the run, n/a "
        "for optimizers without their own collectives; opt comm steady: the largest step without a projection "
        "refresh; engine/step: what the engine moved in one step (DDP: gradient all-reduce and buffer broadcast; "
        "FSDP2: parameter all-gathers and gradient reduce-scatters), "
        f"{ENGINE_BYTES_METHOD}. Payload = the full tensor of each collective (what a rank sends is (W-1)/W of it, "
        "twice that for a ring all-reduce)."
    )
    text += ["", *textwrap.wrap(notes, width=120)]
    return "\n".join(text)


def format_per_layer_saving(saving: dict[str, Any]) -> str:
    """One line per optimizer: peak allocated tensor bytes of training steps without and with per-layer updates."""
    lines = [f"per-layer updates ({saving['kind']}, {saving['steps']} steps after a warm-up step):"]
    for row in saving["results"]:
        lines.append(
            f"  {row['name']}, batch {row['batch_size']} x {saving['seq_len']}: peak "
            f"{format_bytes(row['regular_peak_bytes'])} -> "
            f"{format_bytes(row['per_layer_peak_bytes'])} with per-layer updates (saves "
            f"{format_bytes(row['saving_bytes'])}; the gradients are {format_bytes(row['gradient_bytes'])}); "
            f"largest loss difference {row['max_loss_difference']:.2e}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- per-layer


def _train_measured(name: str, config: LlamaConfig, data: Any, per_layer: bool, steps: int,
                    batch_size: int) -> tuple[int, list[float]]:
    from .text import TokenBatches

    device = torch.device(config.device)
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device=device)
    model.train()
    split = projected_parameter_groups(model, config.recipe)
    optimizer = build_optimizer(name, [p for _, p in split.projected], [p for _, p in split.dense],
                                config.lr_for(name), config.settings())
    batches = TokenBatches(data.train, batch_size, config.seq_len, seed=config.seed + _BATCH_STREAM, device=device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, batches.next())
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step()]  # the optimizer state exists before the measured steps in both modes
    updates = enable_per_layer_updates(optimizer) if per_layer else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        losses += [step() for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with PeakAllocations() as allocations:
            losses += [step() for _ in range(steps)]
        peak = allocations.peak_bytes
    if updates is not None:
        updates.remove()
    return peak, losses


def measure_per_layer_saving(config: LlamaConfig, names: tuple[str, ...] | None = None, *,
                             steps: int = PER_LAYER_STEPS, batch_sizes: tuple[int, ...] | None = None,
                             data: Any = None) -> dict[str, Any]:
    """Peak allocated tensor bytes of ``steps`` training steps without and with per-layer updates.

    For each COAP optimizer of ``names`` (default: those of ``config.optimizers``) and each batch
    size (default: the run's and a single sequence), trains the model of ``config`` from its
    initial weights on its first batches twice, in this process: a warm-up step (so the optimizer
    state exists in both modes), then ``steps`` measured steps. Per-layer updates save the
    gradients, so the saving shows where gradients rather than activations set the peak: at small
    batches, or with large matrices.
    The peak is the most tensor memory the measured steps held on top of the model and the state:
    :class:`~coap_torch.utils.allocations.PeakAllocations` on the CPU,
    ``torch.cuda.max_memory_allocated`` minus what was allocated before on a GPU. Both modes see
    the same batches, so their loss curves agree (``max_loss_difference``).
    """
    from .text import load_token_data

    config = config.resolved()
    if data is None:
        data = load_token_data(source="c4" if config.c4 else None, data_dir=config.data_dir,
                               vocab_size=config.vocab_size, max_documents=config.max_documents)
    names = tuple(n for n in (names or config.optimizers) if OPTIMIZERS[n].family == "coap")
    batch_sizes = tuple(dict.fromkeys(batch_sizes or (config.batch_size, 1)))
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device="meta")
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rows = []
    for name, batch_size in itertools.product(names, batch_sizes):
        with warnings.catch_warnings():
            # A single sequence's first gradient has a low numerical rank; the optimizer says so,
            # but this measures memory, not the subspace.
            warnings.filterwarnings("ignore", message=".*numerical rank", category=RuntimeWarning)
            regular, regular_losses = _train_measured(name, config, data, False, steps, batch_size)
            per_layer, per_layer_losses = _train_measured(name, config, data, True, steps, batch_size)
        rows.append({
            "name": name,
            "batch_size": batch_size,
            "regular_peak_bytes": regular,
            "per_layer_peak_bytes": per_layer,
            "saving_bytes": regular - per_layer,
            "gradient_bytes": gradient_bytes,
            "regular_losses": regular_losses,
            "per_layer_losses": per_layer_losses,
            "max_loss_difference": max(abs(a - b) for a, b in zip(regular_losses, per_layer_losses)),
        })
    kind = ("torch.cuda.max_memory_allocated" if torch.device(config.device).type == "cuda"
            else "peak allocated tensor bytes, PeakAllocations")
    return {"steps": steps, "seq_len": config.seq_len, "kind": kind, "results": rows}


# ------------------------------------------------------------------------------------------- command


def run_llama_command(config: LlamaConfig, args: argparse.Namespace,
                      run_and_report: Callable[..., int]) -> int:
    """``coap-bench llama`` with ``--distributed`` and/or ``--per-layer``; ``run_and_report`` prints and writes."""
    from .llama import run_llama, write_llama_plots

    if config.distributed is None:  # --per-layer on one process: the usual runs, then the saving
        def job() -> dict[str, Any]:
            run = run_llama(config)
            run["per_layer_saving"] = measure_per_layer_saving(config)
            return run

        return run_and_report(job, args, format_distributed_table, write_llama_plots)
    rank, _, _ = launch_environment()
    if rank != 0:
        run_llama_distributed(config)
        return 0
    return run_and_report(lambda: run_llama_distributed(config), args, format_distributed_table, write_llama_plots)

