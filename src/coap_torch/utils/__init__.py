"""Helpers around the optimizers."""

from .estimate import StateEstimate, estimate_state_bytes
from .memory import optimizer_state_nbytes, state_nbytes_by_kind

__all__ = ["StateEstimate", "estimate_state_bytes", "optimizer_state_nbytes", "state_nbytes_by_kind"]
