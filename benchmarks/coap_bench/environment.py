"""What a benchmark result records about where it ran: package versions, hardware, the load of the machine,
memory peaks."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import torch

__all__ = [
    "current_rss_bytes",
    "hardware",
    "load_average",
    "load_averages_line",
    "package_version",
    "peak_memory",
    "platform_summary",
    "torch_threads",
    "usable_cpus",
    "versions",
]

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


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Python's version and those of :data:`RECORDED_PACKAGES`, read from the installed metadata."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch_build": torch.__version__}
    for name in RECORDED_PACKAGES:
        found[name] = package_version(name)
    return found


def platform_summary() -> dict[str, Any]:
    """The first keys of a micro-benchmark's ``meta``: torch and Python versions, platform, processor."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


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


def usable_cpus() -> int:
    """The number of CPUs this process may run on (the default of the micro-benchmarks' ``--threads``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the duration (nothing when ``count`` is ``None``)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def hardware(device: torch.device | str) -> dict[str, Any]:
    """The machine: CPU, cores usable by this process, torch threads, memory, and the CUDA device if used."""
    device = torch.device(device)
    found: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
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


def load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _format_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def load_averages_line(before: float | None, after: float | None) -> str:
    """The line that closes a micro-benchmark: the 1-minute load average before and after it."""
    return f"load average (1 min): {_format_load(before)} before, {_format_load(after)} after ({os.cpu_count()} CPUs)"


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
