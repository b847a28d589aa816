"""The COAP optimizers."""

from ._base import COAP_DEFAULTS, LowRankOptimizer, layout_of
from ._layout import Layout
from ._validation import SparseGradientError
from .adafactor import CoapAdafactor
from .adamw import CoapAdamW

__all__ = ["COAP_DEFAULTS", "CoapAdafactor", "CoapAdamW", "Layout", "LowRankOptimizer", "SparseGradientError", "layout_of"]
