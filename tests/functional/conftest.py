"""Shared settings for the tests of the pure functions."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The matrices here are tiny: intra-op threads only add synchronization overhead, which
    # becomes large on a busy machine. Restored afterwards for the other test folders.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
