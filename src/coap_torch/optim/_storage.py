"""8-bit block-wise storage of optimizer moments, as a mixin over any COAP optimizer.

Between two steps a moment ``key`` with at least ``min_8bit_size`` entries is stored as
``{key}_codes`` (uint8, the moment's shape) and ``{key}_absmax`` (float32, one per block of
``block_size`` entries): plain tensors, so the state dict loads with ``weights_only=True``, and
:meth:`LowRankOptimizer.load_state_dict` never casts them. First moments use the signed dynamic
code map, second moments (and Adafactor's accumulators) the unsigned one. Projections stay in
full precision.

Second moments are stored as their square roots. The dynamic map resolves about seven decades
below a block's maximum; Adam's ``v`` spans twice the decades of ``m`` (it is a mean of squares),
so its small entries would round to zero while the matching ``m`` does not, and
``m / (sqrt(v) + eps)`` would explode (the zero-point problem of 8-bit second moments).
``sqrt(v)`` has the dynamic range of ``m``, and reading it back costs one square.

During a step the moments are dequantized to float32, go through exactly the code of the
32-bit optimizer (moment rule, refresh and change of basis included), and are re-quantized:
one code path for both precisions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional.quantization import DEFAULT_BLOCK_SIZE, dequantize_blockwise, quantize_blockwise_
from . import _validation as check

#: Moments with fewer entries stay float32, as in bitsandbytes: the absmax and bookkeeping
#: would outweigh the saving.
DEFAULT_MIN_8BIT_SIZE = 4096

_CODES, _ABSMAX = "_codes", "_absmax"


class Int8MomentsMixin:
    """Stores the moments of the optimizer it is mixed into block-wise quantized to 8 bits."""

    moment_rotations: dict[str, str]

    def __init__(
        self, params: Any, *args: Any, block_size: int = DEFAULT_BLOCK_SIZE, min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE, **kwargs: Any
    ) -> None:
        self._quantization_defaults = {"block_size": block_size, "min_8bit_size": min_8bit_size}
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]

    def _extra_defaults(self) -> dict[str, Any]:
        defaults = getattr(self, "_quantization_defaults", None) or {
            "block_size": DEFAULT_BLOCK_SIZE,
            "min_8bit_size": DEFAULT_MIN_8BIT_SIZE,
        }
        return {**super()._extra_defaults(), **defaults}  # type: ignore[misc]

    def _validate_group(self, group: dict[str, Any]) -> None:
        check.positive_int("block_size", group["block_size"])
        check.non_negative_int("min_8bit_size", group["min_8bit_size"])
        super()._validate_group(group)  # type: ignore[misc]

    def _signed(self, key: str) -> bool:
        return self.moment_rotations[key] == "linear"

    def _unpack(self, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        work = {}
        for key, value in state.items():
            if key.endswith(_CODES):
                name = key[: -len(_CODES)]
                signed = self._signed(name)
                decoded = dequantize_blockwise(value, state[name + _ABSMAX], signed=signed, block_size=group["block_size"])
                work[name] = decoded if signed else decoded.square_()
            elif not key.endswith(_ABSMAX):
                work[key] = value
        return work

    def _pack(self, work: dict[str, Any], state: dict[str, Any], group: dict[str, Any]) -> None:
        for key, value in work.items():
            if key in self.moment_rotations and isinstance(value, Tensor) and value.numel() >= group["min_8bit_size"]:
                codes, absmax = state.get(key + _CODES), state.get(key + _ABSMAX)
                blocks = -(-value.numel() // group["block_size"])
                if codes is None or codes.shape != value.shape or absmax is None or absmax.numel() != blocks:
                    codes = value.new_empty(value.shape, dtype=torch.uint8)
                    absmax = value.new_empty(blocks)
                signed = self._signed(key)
                stored = value if signed else value.sqrt()
                # sqrt(v) >= 0 by construction: skip the sign check and its host sync.
                quantize_blockwise_(codes, absmax, stored, signed=signed, block_size=group["block_size"], check_sign=False)
                state[key + _CODES], state[key + _ABSMAX] = codes, absmax
                state.pop(key, None)
            else:
                state[key] = value

