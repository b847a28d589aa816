"""Multi-process tests: one intra-op thread per test process (the workers set their own)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch.distributed")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this folder runs with one intra-op thread."""
