"""The integration tests reuse the optimizer table and small nets of tests/optim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this folder runs with one intra-op thread."""
