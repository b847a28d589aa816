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

A moment sharded on dim 0 (FSDP2) is quantized in blocks that never cross a row, so they never
cross a shard boundary either and the state reshards with the weight: the block size is the
largest divisor of the row length (``numel / rows``) not above ``block_size``, and a moment whose
rows are too short for blocks of :data:`MIN_SHARDED_BLOCK` entries stays float32 (1-D ones).
One process with that ``block_size`` stores the same codes.

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
from ._placement import RowShard, replicated

#: Moments with fewer entries stay float32, as in bitsandbytes: the absmax and bookkeeping
#: would outweigh the saving.
DEFAULT_MIN_8BIT_SIZE = 4096

#: Sharded moments whose row-aligned blocks would be smaller stay float32 (the absmax would
#: cost more than an eighth of the codes).
MIN_SHARDED_BLOCK = 32

_CODES, _ABSMAX = "_codes", "_absmax"


def _row_block_size(row_length: int, block_size: int) -> int:
    """The largest divisor of ``row_length`` that is at most ``block_size``."""
    return max(d for d in range(1, min(row_length, block_size) + 1) if row_length % d == 0)


class Int8MomentsMixin:
    """Stores the moments of the optimizer it is mixed into block-wise quantized to 8 bits."""

    moment_rotations: dict[str, str]
    _bulk_dense = False  # 8-bit moments are decoded and encoded per tensor
    storage_options = ("block_size", "min_8bit_size")

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

    def _block_size(self, key: str, shape: tuple[int, ...], group: dict[str, Any], shard: RowShard | None) -> int | None:
        """Entries per block of a moment of (local) ``shape``, or ``None`` to keep it float32."""
        if shard is None or replicated(key):
            numel = torch.Size(shape).numel()
            return group["block_size"] if numel >= group["min_8bit_size"] else None
        row = torch.Size(shape[1:]).numel()
        if row * shard.global_shape[0] < group["min_8bit_size"]:  # the same decision on every rank
            return None
        block = _row_block_size(row, group["block_size"])
        return block if block >= min(MIN_SHARDED_BLOCK, group["block_size"]) else None

    def _stored_moment(self, key: str, moment: Tensor, group: dict[str, Any], sharded: bool) -> dict[str, Tensor]:
        """The codes and absmax a moment of this (global) shape is stored as, or the moment itself."""
        shard = RowShard(None, tuple(moment.shape), 0, moment.shape[0]) if sharded and moment.dim() > 0 else None
        block = self._block_size(key, tuple(moment.shape), group, shard) if key in self.moment_rotations else None
        if block is None:
            return {key: moment}
        codes = torch.empty(moment.shape, dtype=torch.uint8, device="meta")
        if shard is not None and not replicated(key):  # a row of blocks per row (see _pack)
            absmax_shape: tuple[int, ...] = (moment.shape[0], moment[0].numel() // block)
        else:
            absmax_shape = (-(-moment.numel() // block),)
        return {key + _CODES: codes, key + _ABSMAX: torch.empty(absmax_shape, dtype=torch.float32, device="meta")}

    def _unpack(
        self, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        work = {}
        for key, value in state.items():
            if key.endswith(_CODES):
                name = key[: -len(_CODES)]
                signed = self._signed(name)
                block = self._block_size(name, tuple(value.shape), group, shard) if shard is not None else group["block_size"]
                absmax = state[name + _ABSMAX].reshape(-1)
                decoded = dequantize_blockwise(value, absmax, signed=signed, block_size=block, dtype=dtype)
                work[name] = decoded if signed else decoded.square_()
            elif not key.endswith(_ABSMAX):
                work[key] = value
        return work

    def _pack(self, work: dict[str, Any], state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None) -> None:
        for key, value in work.items():
            block = self._block_size(key, tuple(value.shape), group, shard) if key in self.moment_rotations else None
            if block is not None and isinstance(value, Tensor):
                codes, absmax = state.get(key + _CODES), state.get(key + _ABSMAX)
                blocks = -(-value.numel() // block)
                if codes is None or codes.shape != value.shape or absmax is None or absmax.numel() != blocks:
                    codes = value.new_empty(value.shape, dtype=torch.uint8)
                    absmax = value.new_empty(blocks, dtype=torch.float32)
                signed = self._signed(key)
                stored = value if signed else value.sqrt()
                # sqrt(v) >= 0 by construction: skip the sign check and its host sync.
                flat_absmax = absmax.reshape(-1)
                quantize_blockwise_(codes, flat_absmax, stored, signed=signed, block_size=block, check_sign=False)
                if shard is not None and not replicated(key):  # a row of blocks per row: shards with the moment
                    flat_absmax = flat_absmax.view(value.shape[0], -1)
                state[key + _CODES], state[key + _ABSMAX] = codes, flat_absmax
                state.pop(key, None)
            else:
                state[key] = value

