"""Multi-process tests need torch.distributed."""

from __future__ import annotations

import pytest

pytest.importorskip("torch.distributed")
