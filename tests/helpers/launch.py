"""Run a function on N CPU processes (gloo) under a hard timeout, and collect what each returns.

A hang (a collective one rank never joins) fails the test after ``timeout`` seconds instead of
blocking the suite; a worker's exception fails it with that worker's traceback.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder, f"rank{rank}.pt"))
        del result
        dist.barrier()
        # Whatever fn built (DDP reducers, DTensors) goes before the process group does: tearing
        # gloo down under a live DDP can abort the process at exit.
        gc.collect()
        dist.destroy_process_group()
    except BaseException:
        Path(folder, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def launch(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, run in ``world_size`` spawned processes.

    ``fn`` must be importable (a module-level function) and return something ``torch.save`` can
    write; the process group is initialised before it runs.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, port, folder, args)) for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        errors = [path.read_text() for path in sorted(Path(folder).glob("*.err"))]
        if errors:
            raise AssertionError("a worker failed:\n" + "\n".join(errors))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout} s (a collective that never completed?)")
        failed = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            raise AssertionError(f"ranks {failed} exited with codes {[procs[r].exitcode for r in failed]}")
        return [torch.load(Path(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
