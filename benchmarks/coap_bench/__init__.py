"""coap-bench: the benchmark suite of coap-torch, the ``coap-bench`` command.

It trains and measures the library's optimizers next to their peers (torch's AdamW, bitsandbytes,
GaLore, transformers' Adafactor, APOLLO when installed): ``digits``, ``llama`` and ``ddpm`` train a
model once per optimizer, ``memory`` estimates the state of the paper's models, and ``step``,
``quantization`` and ``loss-scale`` measure single operations. :mod:`coap_torch` never imports it,
and the packages the suite needs are imported only when a command runs.
"""

from __future__ import annotations

__all__: list[str] = []
