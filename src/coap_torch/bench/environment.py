"""What a benchmark result records about where it ran: package versions, hardware, memory peaks."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Any

import torch

__all__ = ["current_rss_bytes", "hardware", "peak_memory", "versions"]

#: Distributions whose versions every benchmark result records (``None`` when not installed).
RECORDED_PACKAGES = (
    "coap-torch",
    "torch",
    "transformers",
    "tokenizers",
    "diffusers",
    "bitsandbytes",
    "galore-torch",
    "apollo-torch",
    "numpy",
    "scikit-learn",
    "tqdm",
    "matplotlib",
)


def versions() -> dict[str, str | None]:
    """Python's version and those of :data:`RECORDED_PACKAGES`, read from the installed metadata."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch_build": torch.__version__}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware(device: torch.device | str) -> dict[str, Any]:
    """The machine: CPU, cores usable by this process, torch threads, memory, and the CUDA device if used."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    found: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory_bytes(),
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        found.update(
            gpu=props.name,
            gpu_memory_bytes=int(props.total_memory),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return found


def current_rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), or ``None`` where unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, what was measured)``: CUDA's peak allocation on a GPU, the process's peak RSS on a CPU.

    The RSS peak is the process's since it started: it only describes one training run when that
    run had the process to itself (the benchmarks run each one in a fresh process on the CPU).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(rss), "peak RSS of the run's process (ru_maxrss)"
