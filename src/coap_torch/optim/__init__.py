"""The COAP optimizers."""

from ._base import COAP_DEFAULTS, LowRankOptimizer, layout_of
from ._layout import Layout
from ._validation import SparseGradientError
from .adafactor import CoapAdafactor, CoapAdafactor8bit
from .adamw import CoapAdamW, CoapAdamW8bit

__all__ = ["COAP_DEFAULTS", "CoapAdafactor", "CoapAdafactor8bit", "CoapAdamW", "CoapAdamW8bit", "Layout", "LowRankOptimizer", "SparseGradientError", "layout_of"]
