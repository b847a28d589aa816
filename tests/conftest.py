"""Fixtures shared by the library's test folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread per test module: the tensors are small, and on a 2-core machine extra
    threads only add synchronization (and spin badly when another process holds the other core).
    Restored afterwards. Multi-process tests set their workers' threads themselves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
