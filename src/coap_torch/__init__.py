"""coap-torch: memory-efficient training with correlation-aware gradient projection (COAP)."""

from . import functional
from .optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from .utils import PeakEstimate, StateEstimate, estimate_peak_bytes, estimate_state_bytes, optimizer_state_nbytes

__version__ = "0.1.0"

__all__ = [
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "PeakEstimate",
    "StateEstimate",
    "__version__",
    "estimate_peak_bytes",
    "estimate_state_bytes",
    "functional",
    "optimizer_state_nbytes",
]
