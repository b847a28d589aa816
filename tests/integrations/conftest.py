"""Shared settings for the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this folder runs with one intra-op thread."""
