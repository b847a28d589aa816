"""Checkpoints of distributed runs, with ``torch.distributed.checkpoint`` (:class:`DistributedCheckpoint`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..runner import atomic_save, atomic_write_text, check_fingerprint, unreadable_checkpoint
from ..text import remove_stale_temporaries
from ..training import TrainingLoop

__all__ = ["DistributedCheckpoint"]

#: Format of the checkpoints of distributed runs (``latest.json`` and the folders it points to); 2 since
#: the loop also logs the optimizer's calls per step.
_CHECKPOINT_FORMAT = 2


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
    ``rank-R.pt``, what :meth:`~coap_bench.training.TrainingLoop.state_dict` holds on rank
    ``R`` (scheduler, batch stream, RNG, loss and time logs, communication counts). After a
    barrier, rank 0 points ``latest.json`` at the folder (written through a rename) and removes
    the older ones: a save that never finished is never loaded. ``latest.json`` also holds the
    run's fingerprint (its options, world size and engine); a checkpoint of another configuration
    raises :class:`~coap_bench.runner.RunConfigurationError` on every rank.
    """

    MARKER = "latest.json"

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        # JSON holds lists where the fingerprint has tuples: compare what the marker reads back.
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def _latest(self) -> dict[str, Any] | None:
        """The marker, read on rank 0 and broadcast (so every rank takes the same decision); one that cannot be
        read raises :class:`~coap_bench.runner.CheckpointError` on every rank."""
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
        check_fingerprint(
            self.folder, latest.get("format"), latest.get("fingerprint"), _CHECKPOINT_FORMAT, self.fingerprint
        )
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
        marker = {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": step,
            "directory": directory.name,
            "world_size": dist.get_world_size(),
        }
        atomic_write_text(json.dumps(marker, indent=1), self.folder / self.MARKER)
        for old in self.folder.glob("step-*"):
            if old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)
