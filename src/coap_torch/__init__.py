"""coap-torch: memory-efficient training with correlation-aware gradient projection (COAP)."""

from . import functional
from .optim import CoapAdafactor, CoapAdamW
from .utils import optimizer_state_nbytes

__version__ = "0.1.0"

__all__ = ["CoapAdafactor", "CoapAdamW", "__version__", "functional", "optimizer_state_nbytes"]
