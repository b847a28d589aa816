"""Running one training run of a benchmark: in a fresh process if asked, and never letting one crash
end the whole comparison.

:func:`run_guarded` returns the run's result, or a *failed* result (``failed: True`` and the
``error``) when it raised or its process died: a peer optimizer that does not work on this
machine is a row of the table, not a traceback. On the CPU, each run gets a fresh process so that
its peak RSS is its own (a process's peak only grows).
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .text import _atomic_write

__all__ = [
    "RunConfigurationError",
    "atomic_save",
    "atomic_write_text",
    "check_fingerprint",
    "checkpoint_workarounds",
    "compare_to_baseline",
    "failed_result",
    "load_checkpoint",
    "rng_state",
    "run_guarded",
    "set_rng_state",
]


class RunConfigurationError(ValueError):
    """A run cannot start as configured (e.g. a checkpoint of another configuration): the user's
    error, raised to them rather than reported as a failed optimizer."""


#: Measurements every result has; a failed run has them all ``None``.
MEASUREMENTS = ("state_bytes", "peak_memory_bytes", "iteration_ms", "step_ms", "final_loss", "heldout_loss")


def failed_result(name: str, lr: float, error: str) -> dict[str, Any]:
    """The result of a run that did not finish: its name, lr and error, every measurement ``None``."""
    return {"name": name, "lr": lr, "failed": True, "error": error, **dict.fromkeys(MEASUREMENTS)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_guarded(fn: Callable[..., dict[str, Any]], args: Sequence[Any], *, name: str, lr: float,
                isolate: bool) -> dict[str, Any]:
    """``fn(*args)``, in a fresh spawned process when ``isolate``; a failed result if it raises or dies."""
    try:
        if not isolate:
            return fn(*args)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(fn, *args).result()
    except concurrent.futures.process.BrokenProcessPool:
        return failed_result(name, lr, "the run's process died (a crash in native code, or out of memory)")
    except (KeyboardInterrupt, RunConfigurationError):
        raise
    except Exception as error:  # noqa: BLE001 - a peer that does not work here is reported, not fatal
        result = failed_result(name, lr, _first_line(error))
        result["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        return result


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
    note = f"checkpoints allowlist {names} (an object the optimizer keeps in its state) for torch.load(weights_only=True)"
    return [note]


def _differences(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [line for key in dict.fromkeys([*expected, *saved])
                for line in _differences(saved.get(key), expected.get(key), f"{prefix}{key}.")]
    return [] if saved == expected else [f"{prefix.rstrip('.') or 'fingerprint'} {saved!r} there, {expected!r} here"]


def check_fingerprint(checkpoint: Path, saved_format: Any, saved_fingerprint: Any, checkpoint_format: int,
                      fingerprint: dict[str, Any]) -> None:
    """Raise :class:`RunConfigurationError` unless a checkpoint's format and fingerprint are this run's."""
    if saved_format == checkpoint_format and saved_fingerprint == fingerprint:
        return
    what = (_differences(saved_fingerprint, fingerprint) if saved_format == checkpoint_format
            else [f"checkpoint format {saved_format!r} there, {checkpoint_format!r} here"])
    raise RunConfigurationError(
        f"checkpoint {str(checkpoint)!r} was saved by a different run configuration ({'; '.join(what)}); "
        "remove it or use another --checkpoint-dir"
    )


def load_checkpoint(checkpoint: Path | None, spec: Any, fingerprint: dict[str, Any], checkpoint_format: int,
                    device: torch.device) -> dict[str, Any] | None:
    """The checkpoint a run saved (``None`` if there is none yet), loaded with ``weights_only=True``.

    The classes ``spec`` keeps in its optimizer state are allowlisted; a checkpoint of another
    format or configuration raises :class:`RunConfigurationError` (:func:`check_fingerprint`).
    """
    if checkpoint is None or not checkpoint.is_file():
        return None
    with torch.serialization.safe_globals(spec.safe_globals()):
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
    check_fingerprint(checkpoint, saved.get("format"), saved.get("fingerprint"), checkpoint_format, fingerprint)
    return saved
