"""Running one training run of a benchmark: in a fresh process if asked, and never letting one crash
end the whole comparison.

:func:`run_guarded` returns the run's result, or a *failed* result (``failed: True`` and the
``error``) when it raised or its process died: a peer optimizer that does not work on this
machine is a row of the table, not a traceback. On the CPU, each run gets a fresh process so that
its peak RSS is its own (a process's peak only grows); that process ends when its parent dies
(:func:`_die_with_parent`), even by ``SIGKILL``. What peers printed while a run imported them comes
back with its result as notes (``import_notes``, see :mod:`~coap_bench._quiet`), never as
lines of its own. :func:`run_problems` is what makes a finished comparison a failure: an optimizer
that ended non-finite, or no optimizer that worked.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._quiet import import_notes
from .report import nonfinite_losses
from .text import _atomic_write

__all__ = [
    "CheckpointError",
    "RunConfigurationError",
    "atomic_save",
    "atomic_write_text",
    "check_checkpoint_archive",
    "check_fingerprint",
    "checkpoint_workarounds",
    "compare_to_baseline",
    "failed_result",
    "load_checkpoint",
    "ratio_to_baseline",
    "rng_state",
    "run_guarded",
    "run_problems",
    "set_rng_state",
    "unreadable_checkpoint",
]


class RunConfigurationError(ValueError):
    """A run cannot start as configured (e.g. a checkpoint of another configuration): the user's
    error, raised to them rather than reported as a failed optimizer."""


class CheckpointError(RunConfigurationError):
    """A checkpoint file that cannot be loaded (truncated, corrupted, or holding objects the
    allowlisted loader refuses): the user's file to remove, not a failure of the optimizer."""


def unreadable_checkpoint(path: Path, error: BaseException | str, run_folder: Path | None = None) -> CheckpointError:
    """The error for checkpoint ``path`` that failed to load with ``error`` (or for the reason given): one line
    naming the file and how to start over (delete it, or the ``run_folder`` it belongs to). Never torch's own
    text, which can advise ``weights_only=False`` (unsafe for a file of unknown origin)."""
    if isinstance(error, str):
        why = error
    elif isinstance(error, pickle.UnpicklingError):
        why = "it holds objects the checkpoint loader does not allow"
    elif isinstance(error, OSError):
        why = error.strerror or type(error).__name__
    else:
        why = f"it is truncated or corrupted ({type(error).__name__})"
    remove = "it" if run_folder is None else f"the run's folder {run_folder}"
    return CheckpointError(
        f"checkpoint {path} cannot be loaded: {why}; delete {remove} to start that run over, "
        "or use another --checkpoint-dir"
    )


#: Measurements every result has; a failed run has them all ``None``.
MEASUREMENTS = ("state_bytes", "peak_memory_bytes", "iteration_ms", "step_ms", "final_loss", "heldout_loss")


def failed_result(name: str, lr: float, error: str) -> dict[str, Any]:
    """The result of a run that did not finish: its name, lr and error, every measurement ``None``."""
    return {"name": name, "lr": lr, "failed": True, "error": error, **dict.fromkeys(MEASUREMENTS)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


#: Seconds between two checks of a run's process that its parent is still alive.
_PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)  # the parent is gone: nobody will read this run's result


def _die_with_parent(parent: int) -> None:
    """Initializer of a run's process: end it when process ``parent`` dies, so that a killed ``coap-bench``
    never leaves a run training, writing its checkpoint and holding its memory.

    On Linux the kernel sends ``SIGKILL`` (``prctl(PR_SET_PDEATHSIG)``; strictly, when the parent's
    thread that started this process ends: :func:`run_guarded`'s caller, which waits for the result);
    elsewhere, and as a second guard, a daemon thread exits once the parent process id changes (the
    orphan was re-parented).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl in this libc: the thread below still works
    if os.getppid() != parent:  # the parent died before the guard was in place
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="coap-bench-parent-watch", daemon=True).start()


def _with_import_notes(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` with the notes of the quiet imports it made (:mod:`~coap_bench._quiet`) in its
    result's ``import_notes``, or, when it raises, on the exception: they travel back from a run's process
    with what it returns."""
    before = len(import_notes())
    try:
        result = fn(*args)
    except BaseException as error:
        with contextlib.suppress(Exception):  # an exception without attributes travels without notes
            error.import_notes = import_notes()[before:]
        raise
    notes = import_notes()[before:]
    return {**result, "import_notes": notes} if notes else result


def run_guarded(
    fn: Callable[..., dict[str, Any]], args: Sequence[Any], *, name: str, lr: float, isolate: bool
) -> dict[str, Any]:
    """``fn(*args)``, in a fresh spawned process when ``isolate``; a failed result if it raises or dies.

    :class:`RunConfigurationError` (a checkpoint of another configuration, or one that cannot be
    loaded) is raised: it is the user's to fix, not a failure of the optimizer. What peers printed
    while the run imported them comes back as notes, in the result's ``import_notes``.
    """
    try:
        if not isolate:
            return _with_import_notes(fn, *args)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            return pool.submit(_with_import_notes, fn, *args).result()
    except concurrent.futures.process.BrokenProcessPool:
        return failed_result(name, lr, "the run's process died (a crash in native code, or out of memory)")
    except (KeyboardInterrupt, RunConfigurationError):
        raise
    except Exception as error:  # noqa: BLE001 - a peer that does not work here is reported, not fatal
        result = failed_result(name, lr, _first_line(error))
        result["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        if getattr(error, "import_notes", None):
            result["import_notes"] = list(error.import_notes)
        return result


def run_problems(results: list[dict[str, Any]]) -> list[str]:
    """Why a finished comparison failed, one line each: every optimizer that ended with a non-finite loss, and
    every optimizer failing. Empty when the comparison is usable (a single failed peer is a row of the table)."""
    problems = [
        f"{result['name']} ended with a non-finite loss ({nonfinite_losses(result)}) at lr "
        f"{result['lr']:g}; a lower --lr may help"
        for result in results
        if nonfinite_losses(result)
    ]
    if results and all(result.get("failed") for result in results):
        problems.append(
            f"every optimizer failed ({', '.join(result['name'] for result in results)}): see the table for why"
        )
    return problems


def compare_to_baseline(results: list[dict[str, Any]], baseline: str = "adamw") -> None:
    """Add ``*_ratio_to_<baseline>`` and the relative held-out difference to each finished result, in place."""
    base = next((r for r in results if r["name"] == baseline and not r.get("failed")), None)
    if base is None:
        return
    for result in results:
        if result.get("failed"):
            continue
        for key in ("state_bytes", "iteration_ms", "step_ms", "peak_memory_bytes"):
            if result.get(key) is not None and base.get(key):
                result[f"{key.removesuffix('_bytes').removesuffix('_ms')}_ratio_to_{baseline}"] = (
                    result[key] / base[key]
                )
        if result.get("heldout_loss") is not None and base.get("heldout_loss"):
            result[f"heldout_loss_minus_{baseline}"] = result["heldout_loss"] - base["heldout_loss"]
            result[f"heldout_loss_rel_to_{baseline}"] = result["heldout_loss"] / base["heldout_loss"] - 1
        ours, theirs = result.get("heldout_loss_per_seed"), base.get("heldout_loss_per_seed")
        if ours and theirs and result.get("seeds") == base.get("seeds"):
            # Seed by seed: the same initial weights and batches, so most of the noise cancels.
            result[f"heldout_loss_rel_to_{baseline}_per_seed"] = [a / b - 1 for a, b in zip(ours, theirs)]


def ratio_to_baseline(results: list[dict[str, Any]], key: str, baseline: str = "adamw") -> None:
    """Add ``<key>_ratio_to_<baseline>`` to each finished result, in place, when the baseline's ``key`` is
    non-zero (a job's own score beside :func:`compare_to_baseline`'s)."""
    base = next((r for r in results if r["name"] == baseline and not r.get("failed")), None)
    if base is None or not base.get(key):
        return
    for result in results:
        if not result.get("failed"):
            result[f"{key}_ratio_to_{baseline}"] = result[key] / base[key]


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states a training run may draw from (CPU, and CUDA when used)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: a killed run never leaves half a checkpoint."""
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, as :func:`atomic_save`."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def checkpoint_workarounds(spec: Any, checkpoint: Path | None) -> list[str]:
    """What checkpointing an optimizer of ``spec`` needs beyond plain tensors, for the run's output."""
    if not spec.state_classes or checkpoint is None:
        return []
    names = ", ".join(c.rpartition(".")[2] for c in spec.state_classes)
    note = (
        f"checkpoints allowlist {names} (an object the optimizer keeps in its state) for torch.load(weights_only=True)"
    )
    return [note]


def _differences(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [
            line
            for key in dict.fromkeys([*expected, *saved])
            for line in _differences(saved.get(key), expected.get(key), f"{prefix}{key}.")
        ]
    return [] if saved == expected else [f"{prefix.rstrip('.') or 'fingerprint'} {saved!r} there, {expected!r} here"]


def check_fingerprint(
    checkpoint: Path, saved_format: Any, saved_fingerprint: Any, checkpoint_format: int, fingerprint: dict[str, Any]
) -> None:
    """Raise :class:`RunConfigurationError` unless a checkpoint's format and fingerprint are this run's."""
    if saved_format == checkpoint_format and saved_fingerprint == fingerprint:
        return
    what = (
        _differences(saved_fingerprint, fingerprint)
        if saved_format == checkpoint_format
        else [f"checkpoint format {saved_format!r} there, {checkpoint_format!r} here"]
    )
    raise RunConfigurationError(
        f"checkpoint {str(checkpoint)!r} was saved by a different run configuration ({'; '.join(what)}); "
        "remove it or use another --checkpoint-dir"
    )


def check_checkpoint_archive(checkpoint: Path) -> None:
    """Raise :class:`CheckpointError` when ``checkpoint`` exists but is not a complete ``torch.save`` archive
    (a truncated or overwritten file): a look at its zip directory, cheap enough to do for every run before
    the first one trains. What the file holds is checked when it is loaded (:func:`load_checkpoint`)."""
    if not checkpoint.is_file():
        return
    try:
        with zipfile.ZipFile(checkpoint):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise unreadable_checkpoint(checkpoint, error) from None


def load_checkpoint(
    checkpoint: Path | None, spec: Any, fingerprint: dict[str, Any], checkpoint_format: int, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint a run saved (``None`` if there is none yet), loaded with ``weights_only=True``.

    The classes ``spec`` keeps in its optimizer state are allowlisted; a checkpoint of another
    format or configuration raises :class:`RunConfigurationError` (:func:`check_fingerprint`).
    """
    if checkpoint is None or not checkpoint.is_file():
        return None
    try:
        with torch.serialization.safe_globals(spec.safe_globals()):
            saved = torch.load(checkpoint, map_location=device, weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        raise unreadable_checkpoint(checkpoint, error) from None
    if not isinstance(saved, dict):
        raise unreadable_checkpoint(checkpoint, f"it holds a {type(saved).__name__}, not a coap-bench checkpoint")
    check_fingerprint(checkpoint, saved.get("format"), saved.get("fingerprint"), checkpoint_format, fingerprint)
    return saved
