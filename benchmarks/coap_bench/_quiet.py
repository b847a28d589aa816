"""Imports that print nothing: what a package writes while ``coap-bench`` imports it becomes a short note.

Some packages talk when imported. bitsandbytes 0.50 with ``kernels`` installed, on a CPU with
AVX-512 BF16, logs that it could not load an optional 4-bit kernel from the Hugging Face Hub and
advises enabling remote code: a failure that does not concern a benchmark, and advice nobody
should follow from here. :func:`quiet_import` imports a module with everything it writes diverted:
writes to ``sys.stdout`` / ``sys.stderr``, ``logging`` records, ``warnings``, and writes to file
descriptors 1 and 2 (native code). What was diverted becomes a note (:func:`describe`): a plain
sentence naming the package and whether it affected the run, never the text as printed, and never
advice to enable remote code. An import that fails still raises, as before.

Notes collect in the process that imported (:func:`import_notes`); a run in a process of its own
sends its notes back with its result (:mod:`~coap_bench.runner`), and every table shows them
once, below the table (:func:`import_note_lines`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import re
import sys
import tempfile
import textwrap
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any, TextIO

__all__ = ["describe", "gather_import_notes", "import_note_lines", "import_notes", "quiet_import"]

#: Sentences that advise loading or trusting remote code: never shown, whoever wrote them.
_REMOTE_CODE = re.compile(r"trust_remote_code|remote[ -]code|allowlist|untrusted", re.IGNORECASE)

#: Messages we know, by a pattern of their text: (pattern, package, what it means for a benchmark run).
_KNOWN: tuple[tuple[re.Pattern[str], str, str], ...] = (
    # bitsandbytes' CPU backend tries kernels-community's 4-bit GEMM when it is imported; no benchmark
    # runs a 4-bit layer, so the kernel would never be called.
    (
        re.compile(r"gemm_4bit_forward|kernels-community/quantization-bitsandbytes"),
        "bitsandbytes",
        "could not load an optional CPU 4-bit kernel; not used here",
    ),
)

_NOTES: list[str] = []  # this process's notes, in the order they came
_LOCK = threading.RLock()


# ------------------------------------------------------------------------------------------ the notes


def _unique(notes: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(note for note in notes if note and not _REMOTE_CODE.search(note)))


def _sanitized(text: str) -> str:
    """The first line of ``text`` without its sentences about remote code, shortened."""
    lines = text.strip().splitlines()
    sentences = re.split(r"(?<=[.!?])\s+", lines[0] if lines else "")
    kept = " ".join(s for s in sentences if not _REMOTE_CODE.search(s))
    return textwrap.shorten(kept, 160, placeholder=" ...")


def describe(package: str, messages: Sequence[tuple[str | None, str]], *, imported: bool = True) -> list[str]:
    """Notes for what was written while ``package`` was imported: ``messages`` are ``(source, text)``
    (``source``: the package that wrote it, when known). A known message becomes its sentence; the
    others of one source become one note with their first line (remote-code advice removed), saying
    whether the import went on (``imported``)."""
    notes, unknown = [], {}
    for source, text in messages:
        known = next(((name, meaning) for pattern, name, meaning in _KNOWN if pattern.search(text)), None)
        if known is not None:
            notes.append(f"{known[0]} {known[1]}")
        else:
            unknown.setdefault(source or package, []).append(text)
    outcome = "which did not stop the run" if imported else "and then failed to import"
    for source, texts in unknown.items():
        summary = next((line for line in map(_sanitized, texts) if line), "")
        if summary:
            more = f" (and {len(texts) - 1} more)" if len(texts) > 1 else ""
            notes.append(f"{source} printed a message while being imported, {outcome}: {summary}{more}")
    return _unique(notes)


def import_notes() -> list[str]:
    """The notes of every quiet import of this process so far."""
    with _LOCK:
        return list(_NOTES)


def _result_notes(results: Iterable[dict[str, Any]]) -> list[str]:
    return [note for result in results for note in result.get("import_notes") or ()]


def gather_import_notes(results: Iterable[dict[str, Any]]) -> list[str]:
    """The notes of a job: those its ``results`` brought back from their processes, then this process's."""
    return _unique([*_result_notes(results), *import_notes()])


def import_note_lines(run: dict[str, Any]) -> list[str]:
    """The lines below a table about what packages printed while imported: the notes of ``run`` and of its
    results, each once."""
    return [f"note: {note}" for note in _unique([*run.get("import_notes", ()), *_result_notes(run.get("results", ()))])]


# ------------------------------------------------------------------------------------------ the capture


class _Keep(logging.Handler):
    """Keeps the records logged during an import (that would otherwise reach logging's last-resort print)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _StandIn:
    """Stands for ``sys.stdout`` or ``sys.stderr`` during an import: keeps what is written, and once
    released writes through to the stream it stood for, so that a logging handler the package made
    during the import (which holds on to it) keeps working."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.kept: list[str] | None = []

    def write(self, text: str) -> int:
        if self.kept is None:
            return self._stream.write(text)
        self.kept.append(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.kept is None:
            self._stream.flush()

    def release(self) -> str:
        text, self.kept = "".join(self.kept or ()), None
        return text

    def __getattr__(self, name: str) -> Any:
        stream = self.__dict__.get("_stream")
        if stream is None:
            raise AttributeError(name)
        return getattr(stream, name)


def _flush_all() -> None:
    """Flush Python's streams and C's stdio buffers: text written before a switch of file descriptors
    must land on the side it was written for."""
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s}.values():
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _file_descriptors_to(sink: int) -> Iterator[None]:
    """File descriptors 1 and 2 point to ``sink`` inside the block (those that are open), then back."""
    _flush_all()
    saved = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                continue  # closed: nothing written there would be seen anyway
            os.dup2(sink, fd)
        yield
    finally:
        _flush_all()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _streams_replaced() -> Iterator[list[str]]:
    """``sys.stdout`` and ``sys.stderr`` replaced by stand-ins; yields the list their text is added to."""
    kept: list[str] = []
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    stand_ins = {name: _StandIn(stream) for name, stream in originals.items() if stream is not None}
    for name, stand_in in stand_ins.items():
        setattr(sys, name, stand_in)
    try:
        yield kept
    finally:
        for name, stand_in in stand_ins.items():
            if getattr(sys, name) is stand_in:  # a package that set its own stream keeps it (it writes through)
                setattr(sys, name, originals[name])
            kept.append(stand_in.release())


@contextlib.contextmanager
def _diverted(messages: list[tuple[str | None, str]]) -> Iterator[None]:
    """Everything written inside the block, added to ``messages`` as ``(source, text)`` when it ends."""
    keep = _Keep()
    root = logging.getLogger()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        root.addHandler(keep)
        try:
            with _file_descriptors_to(sink.fileno()), _streams_replaced() as written:
                yield
        finally:
            root.removeHandler(keep)
            sink.seek(0)
            messages += [(_logger_package(record), _record_text(record)) for record in keep.records]
            messages += [(None, f"{w.category.__name__}: {w.message}") for w in caught]
            text = "".join(written) + sink.read().decode(errors="replace")
            messages += [(None, line) for line in text.splitlines() if line.strip()]


def _record_text(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a record whose arguments do not fit its format
        return str(record.msg)


def _logger_package(record: logging.LogRecord) -> str | None:
    top = record.name.split(".")[0]
    return top if top in sys.modules else None  # "root", "py.warnings": the imported package is named instead


def _unresolved(module: ModuleType | None, names: Sequence[str]) -> list[str]:
    return list(names) if module is None else [name for name in names if name not in vars(module)]


def quiet_import(module: str, *, package: str | None = None, names: Sequence[str] = ()) -> ModuleType:
    """``importlib.import_module(module)``, with what the import writes kept as notes (:func:`import_notes`)
    instead of printed; ``package`` names the package the notes are about (default: ``module``'s top level).

    ``names`` are attributes to resolve inside the same capture: transformers and diffusers import a
    class's module when it is first looked up (diffusers' models import bitsandbytes then). A failed
    look-up is left for the caller's own, so that its error is the usual one. A module already imported,
    with ``names`` resolved, is returned at once; an import that fails raises, its notes still kept.
    """
    loaded = sys.modules.get(module)
    pending = _unresolved(loaded, names)
    if loaded is not None and not pending:
        return loaded
    package = package or module.split(".")[0]
    messages: list[tuple[str | None, str]] = []
    imported = False
    with _LOCK:
        try:
            with _diverted(messages):
                found = importlib.import_module(module)
                for name in pending:
                    with contextlib.suppress(Exception):
                        getattr(found, name)
            imported = True
            return found
        finally:
            _NOTES[:] = _unique([*_NOTES, *describe(package, messages, imported=imported)])
