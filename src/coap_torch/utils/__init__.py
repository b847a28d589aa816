"""Helpers around the optimizers."""

from .memory import optimizer_state_nbytes, state_nbytes_by_kind

__all__ = ["optimizer_state_nbytes", "state_nbytes_by_kind"]
