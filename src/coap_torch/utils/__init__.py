"""Helpers around the optimizers."""

from .communication import CommunicationEstimate, estimate_fsdp2_communication
from .estimate import StateEstimate, estimate_state_bytes
from .memory import optimizer_state_nbytes, state_nbytes_by_kind

__all__ = [
    "CommunicationEstimate",
    "StateEstimate",
    "estimate_fsdp2_communication",
    "estimate_state_bytes",
    "optimizer_state_nbytes",
    "state_nbytes_by_kind",
]
