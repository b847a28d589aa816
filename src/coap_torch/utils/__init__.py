"""Helpers around the optimizers."""

from .communication import CommunicationEstimate, estimate_fsdp2_communication
from .estimate import StateEstimate, estimate_state_bytes
from .memory import optimizer_state_nbytes, state_nbytes_by_kind
from .peak import PeakEstimate, estimate_peak_bytes

__all__ = [
    "CommunicationEstimate",
    "PeakEstimate",
    "StateEstimate",
    "estimate_fsdp2_communication",
    "estimate_peak_bytes",
    "estimate_state_bytes",
    "optimizer_state_nbytes",
    "state_nbytes_by_kind",
]
