"""The COAP optimizers."""

from ._base import COAP_DEFAULTS, LowRankOptimizer, layout_of
from ._layout import Layout
from ._sharded import CommunicationLog
from ._validation import SparseGradientError
from .adafactor import CoapAdafactor, CoapAdafactor8bit
from .adamw import CoapAdamW, CoapAdamW8bit
from .per_layer import PerLayerUpdates, enable_per_layer_updates

__all__ = [
    "COAP_DEFAULTS",
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "CommunicationLog",
    "Layout",
    "LowRankOptimizer",
    "PerLayerUpdates",
    "SparseGradientError",
    "enable_per_layer_updates",
    "layout_of",
]
