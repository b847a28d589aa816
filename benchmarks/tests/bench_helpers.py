"""What the benchmark suite's tests share: the quick ``coap-bench ddpm`` options, a clean environment for
the ``coap-bench`` processes they start, and ``torchrun`` jobs of a command (run, read back, or faked).

pytest puts this folder on ``sys.path`` before it imports the tests in it (its default ``prepend`` import
mode), so they import this module as ``bench_helpers``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

#: The variables ``torchrun`` sets in its workers: a process started without them is not a rank.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: ``coap-bench ddpm`` in seconds: the micro preset on one thread, a short COAP refresh schedule
#: (T_u 2, lambda 2) so that a few steps include Eq. 2 updates and SVDs, a quick feature classifier.
DDPM_QUICK = [
    "--preset",
    "micro",
    "--threads",
    "1",
    "--update-interval",
    "2",
    "--reproject-factor",
    "2",
    "--classifier-steps",
    "40",
    "--no-progress",
]


def process_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`TORCHRUN_VARS`, with ``extra`` set: for a child ``coap-bench``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(extra)
    return env


def launch_torchrun(
    folder: Path, job: Sequence[str], *args: str, timeout: float, nproc: int = 2, **env: str
) -> tuple[int, str, Path]:
    """``coap-bench JOB --json PATH ARGS`` on ``nproc`` CPU ranks under ``torchrun`` (one thread each, ``env``
    set): exit status, output (stdout and stderr) and PATH, a new file in ``folder``. Killed with its workers
    after ``timeout`` s, which fails the test."""
    path = folder / f"run{len(list(folder.glob('*.json')))}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "coap_bench.cli",
        *job,
        "--json",
        str(path),
        *args,
    ]
    proc = subprocess.Popen(
        command,
        env=process_env(**env, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s")
    return proc.returncode, out, path


def torchrun_json(
    folder: Path, job: Sequence[str], *args: str, timeout: float, shows: Sequence[str] = (), **env: str
) -> dict[str, Any]:
    """:func:`launch_torchrun` on 2 ranks, which must succeed and print the per-rank table (and ``shows``);
    the JSON rank 0 wrote."""
    returncode, out, path = launch_torchrun(folder, job, *args, timeout=timeout, **env)
    assert returncode == 0, "\n".join(line for line in out.splitlines() if "Warning" not in line)[-6000:]
    assert all(text in out for text in ("per rank:", "engine/step", *shows)), out[-4000:]
    return json.loads(path.read_text())


def by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results of ``run``, by optimizer name."""
    return {r["name"]: r for r in run["results"]}


def without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as one started by hand: none of :data:`TORCHRUN_VARS` set."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def as_rank_0_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as rank 0 of a 2-rank ``torchrun`` job (whose rendezvous nobody listens to)."""
    for name, value in zip(TORCHRUN_VARS, ("0", "2", "0", "127.0.0.1", "1"), strict=True):
        monkeypatch.setenv(name, value)
