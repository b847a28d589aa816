"""What a ``coap-bench`` command writes: its paths checked before it loads data or trains, then its
table, JSON and plots once the job is done, and the exit status they make.

A ``--json`` file that cannot be written, or a ``--plots`` / ``--checkpoint-dir`` folder that is a
file, would otherwise be found only when the results are written, after the whole run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["OutputPathError", "check_output_paths", "run_and_report", "write_json_reported"]


class OutputPathError(ValueError):
    """An output path given on the command line cannot be written."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a ``mkdir -p`` would start from)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _probe(flag: str, path: Path, folder: Path) -> None:
    """Raise unless a file can be created in ``folder``. The probe file has no name (``O_TMPFILE`` where the
    system has it) and is removed on close, so nothing is left behind."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputPathError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error})") from None


def check_folder(flag: str, folder: Path, given: Path | None = None) -> None:
    """``folder`` is, or can be created as, a folder this process can write in; ``given`` (default
    ``folder``) is the path the messages name."""
    given = folder if given is None else given
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        what = "it is" if existing == given else f"{existing} is"
        raise OutputPathError(f"{flag} {given}: {what} a file, not a folder")
    _probe(flag, given, existing)


def check_file(flag: str, path: Path) -> None:
    """``path`` can be written as a file: not a folder, in a folder that is or can be created and written in."""
    if path.is_dir():
        raise OutputPathError(f"{flag} {path}: it is a folder; give a file name")
    check_folder(flag, path.parent, path)
    if path.exists():
        try:
            with open(path, "ab"):  # opened for appending, not written: the file is unchanged
                pass
        except OSError as error:
            raise OutputPathError(f"{flag} {path}: cannot write it ({error.strerror or error})") from None


def _writes_reports(args: argparse.Namespace) -> bool:
    """Whether this process writes ``--json`` and ``--plots``: in a ``--distributed`` job, rank 0 only."""
    return not getattr(args, "distributed", None) or os.environ.get("RANK", "0") == "0"


def check_output_paths(args: argparse.Namespace) -> None:
    """Raise :class:`OutputPathError` (one line naming the flag, the path and why) unless every output path of
    the parsed command line can be written: ``--json`` a file, ``--plots`` and ``--checkpoint-dir`` folders."""
    if _writes_reports(args):
        if getattr(args, "json", None):
            check_file("--json", Path(args.json))
        if getattr(args, "plots", None):
            check_folder("--plots", Path(args.plots))
    if getattr(args, "checkpoint_dir", None):
        check_folder("--checkpoint-dir", Path(args.checkpoint_dir).expanduser())


def write_json_reported(run: dict, path: str) -> bool:
    """Write the run's JSON and say where, or say why it could not be written; whether it was."""
    from .report import write_json

    try:
        print(f"results written to {write_json(run, path)}", file=sys.stderr)
    except OSError as error:
        print(f"coap-bench: error: --json {path}: results not written ({error.strerror or error})", file=sys.stderr)
        return False
    return True


def _write_plots_reported(run: dict, directory: str, write_plots: Callable[..., Any]) -> bool:
    try:
        paths = write_plots(run, directory)
    except OSError as error:
        print(f"coap-bench: error: --plots {directory}: plots not written ({error.strerror or error})", file=sys.stderr)
        return False
    if paths is None:
        print("no plots written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    else:
        paths = paths if isinstance(paths, list) else [paths]
        print(f"plots written to {', '.join(map(str, paths))}", file=sys.stderr)
    return True


def run_and_report(
    run_job: Callable[[], dict],
    args: argparse.Namespace,
    format_table: Callable[[dict], str],
    write_plots: Callable[..., Any] | None,
) -> int:
    """Run a job, print its table, write the JSON and plots it was asked for; the exit status.

    The status is 1 when an output could not be written, when an optimizer ended with a non-finite
    loss, or when every optimizer failed (:func:`~coap_bench.runner.run_problems`), each said
    on stderr after the table and the files are written, so that no result is lost.
    """
    from .runner import run_problems

    started = time.perf_counter()
    run = run_job()
    run["config"]["total_seconds"] = time.perf_counter() - started
    print(format_table(run), flush=True)
    written = True
    if args.json:
        written &= write_json_reported(run, args.json)
    if args.plots:
        written &= _write_plots_reported(run, args.plots, write_plots)
    problems = run_problems(run["results"])
    for problem in problems:
        print(f"coap-bench: error: {problem}", file=sys.stderr)
    return 0 if written and not problems else 1
