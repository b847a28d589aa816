"""The COAP optimizers."""

from ._base import LowRankOptimizer
from ._layout import Layout, layout_of
from ._options import COAP_DEFAULTS, CoapOptions
from ._rule import MomentRule, Update
from ._sharded import CommunicationLog
from ._storage import Int8Options
from ._validation import SparseGradientError
from .adafactor import AdafactorRule, CoapAdafactor, CoapAdafactor8bit
from .adamw import AdamRule, CoapAdamW, CoapAdamW8bit
from .per_layer import PerLayerUpdates, enable_per_layer_updates

__all__ = [
    "COAP_DEFAULTS",
    "AdafactorRule",
    "AdamRule",
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "CoapOptions",
    "CommunicationLog",
    "Int8Options",
    "Layout",
    "LowRankOptimizer",
    "MomentRule",
    "PerLayerUpdates",
    "SparseGradientError",
    "Update",
    "enable_per_layer_updates",
    "layout_of",
]
