"""How state is kept between steps: in full precision, in bfloat16, or block-wise quantized to 8 bits.

A storage turns a parameter's stored state into the moments the moment rule works on
(:meth:`unpack`), writes them back after the step (:meth:`pack`), and says what a moment of a
given shape is stored as (:meth:`stored`, for the planned state). It knows each moment's kind
from the rule's rotation kinds: ``"linear"`` moments (first moments) are signed, the others
(second moments, Adafactor's accumulators) non-negative.

**8-bit** (:class:`Int8Blockwise`): a moment ``key`` with at least ``min_8bit_size`` entries is
stored as ``{key}_codes`` (uint8, the moment's shape) and ``{key}_absmax`` (float32, one per
block of ``block_size`` entries): plain tensors, so the state dict loads with
``weights_only=True``, and :meth:`LowRankOptimizer.load_state_dict` never casts them. First
moments use the signed dynamic code map, the others the unsigned one. Projections stay in full
precision.

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

**bfloat16** (the group option ``state_dtype=torch.bfloat16``, with either storage): every
floating-point entry that is not 8-bit (``P``, first moments, second moments, Adafactor's
accumulators) is kept in bfloat16 and widened to the compute dtype for the step. First moments
and projections are rounded to nearest; non-negative accumulators (second moments, Adafactor's
row and column sums) are rounded stochastically (:func:`~coap_torch.functional.stochastic_round_to_bfloat16`),
because round-to-nearest stalls them: ``v * 0.999`` rounds back to ``v``. The random bits come
from a generator seeded with ``(seed, parameter index, step, key)``, never from the global RNG,
so training is reproducible and a resumed run continues bitwise without saving any RNG state.
Measured on an Adam second moment over 4000 steps of gradients whose scale shrinks tenfold
(``beta2 = 0.999``): round-to-nearest ends 6.3x too large, round-to-nearest of ``sqrt(v)`` (the
8-bit path's storage) 5.0x, stochastic rounding of ``sqrt(v)`` has a 7.6% median error, and
stochastic rounding of ``v`` a 5.1% median error with no bias (+0.02%): the scheme used.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..functional.quantization import DEFAULT_BLOCK_SIZE, dequantize_blockwise, quantize_blockwise_
from ..functional.rounding import round_to_bfloat16, stochastic_round_to_bfloat16
from . import _validation as check
from ._placement import RowShard, moment_name

__all__ = [
    "FLOAT32",
    "INT8_BLOCKWISE",
    "STATE_DTYPES",
    "Int8Blockwise",
    "Int8Options",
    "LazyMoments",
    "MomentStorage",
    "parse_state_dtype",
    "rounding_seed",
    "stored_dtype",
]

#: The values of the group option ``state_dtype``, by the names it also accepts.
STATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_state_dtype(value: Any) -> torch.dtype:
    """The ``state_dtype`` option as a dtype: ``torch.float32`` or ``torch.bfloat16``, or one of
    their names in :data:`STATE_DTYPES`; anything else raises ``ValueError``."""
    if isinstance(value, str) and value in STATE_DTYPES:
        return STATE_DTYPES[value]
    if value in (torch.float32, torch.bfloat16):
        return value
    raise ValueError(
        f"Invalid state_dtype: {value!r} (must be torch.float32 or torch.bfloat16, or one of {tuple(STATE_DTYPES)})"
    )


def stored_dtype(group: dict[str, Any], compute: torch.dtype) -> torch.dtype:
    """The dtype of a group's floating-point state between steps: bfloat16 when the group asks
    for it, else the compute dtype (float32; float64 for float64 parameters)."""
    return torch.bfloat16 if group["state_dtype"] == torch.bfloat16 else compute


def rounding_seed(seed: int, index: int, step: int) -> int:
    """The seed of the stochastic rounding of parameter ``index``'s state after ``step``."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 7) % (2**63)


def _narrowed(key: str, value: Any, rotations: dict[str, str], shard: RowShard | None, seed: int) -> Any:
    """A floating-point state entry as a bfloat16 group keeps it (see the module docstring)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype == torch.bfloat16:
        return value
    if rotations.get(key, "linear") == "linear":  # projections and first moments
        return round_to_bfloat16(value)
    # Streams per key; a row shard's own rows get their own stream, replicated entries the same
    # one on every rank (they must stay equal).
    offset = 0 if shard is None or shard.replicates(key) else shard.offset
    key_seed = (seed + zlib.crc32(key.encode()) * 0xD6E8FEB86659FD93 + offset) % (2**63)
    generator = torch.Generator(device=value.device).manual_seed(key_seed)
    return stochastic_round_to_bfloat16(value, generator)


def _widened(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``state`` with its floating-point tensors in ``dtype`` (itself when they all are)."""
    if all(not isinstance(v, Tensor) or not v.is_floating_point() or v.dtype == dtype for v in state.values()):
        return state
    return {
        key: value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value
        for key, value in state.items()
    }


#: Moments with fewer entries stay float32, as in bitsandbytes: the absmax and bookkeeping
#: would outweigh the saving.
DEFAULT_MIN_8BIT_SIZE = 4096

#: Sharded moments whose row-aligned blocks would be smaller stay float32 (the absmax would
#: cost more than an eighth of the codes).
MIN_SHARDED_BLOCK = 32

_CODES, _ABSMAX = "_codes", "_absmax"


class MomentStorage:
    """State kept as the rule makes it (float32, or float64 for float64 parameters), or in
    bfloat16 when the group's ``state_dtype`` asks for it."""

    #: A dataclass of the storage's own group options, or ``None``.
    options: ClassVar[type | None] = None

    def check(self, group: dict[str, Any]) -> None:
        """Refuse out-of-range storage options, naming the option and the value."""

    def unpack(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        rotations: dict[str, str],
        shard: RowShard | None,
        dtype: torch.dtype,
    ) -> dict[str, Any]:
        """The state as the moment rule works on it, in the compute ``dtype`` (the stored state
        itself when it is already)."""
        return _widened(state, dtype)

    def pack(
        self,
        work: dict[str, Any],
        state: dict[str, Any],
        group: dict[str, Any],
        rotations: dict[str, str],
        shard: RowShard | None,
        seed: int = 0,
    ) -> None:
        """Store what :meth:`unpack` returned back into ``state`` after the step (``seed``: of
        the stochastic rounding, see :func:`rounding_seed`)."""
        if group["state_dtype"] == torch.bfloat16:
            for key, value in work.items():
                state[key] = _narrowed(key, value, rotations, shard, seed)
        elif work is not state:
            state.update(work.items())

    def stored(
        self, key: str, moment: Tensor, group: dict[str, Any], rotations: dict[str, str], shard: RowShard | None
    ) -> dict[str, Tensor]:
        """The tensors (``meta``) a moment of this (global) shape is kept as between steps
        (``shard``: a global-shaped one for a parameter sharded on dim 0)."""
        return {key: moment}

    def chunk_views(self, state: dict[str, Any], begin: int, stop: int, group: dict[str, Any]) -> dict[str, Tensor]:
        """Views of a dense parameter's stored moments for its flat entries ``[begin, stop)``
        (``step`` left out); :meth:`unpack` and :meth:`pack` take them like a whole state."""
        return {key: value.view(-1)[begin:stop] for key, value in state.items() if key != "step"}


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """The group options of the 8-bit storage."""

    block_size: int = DEFAULT_BLOCK_SIZE
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE


def _row_block_size(row_length: int, block_size: int) -> int:
    """The largest divisor of ``row_length`` that is at most ``block_size``."""
    return max(d for d in range(1, min(row_length, block_size) + 1) if row_length % d == 0)


class Int8Blockwise(MomentStorage):
    """Moments of at least ``min_8bit_size`` entries stored block-wise quantized to 8 bits."""

    options = Int8Options

    def check(self, group: dict[str, Any]) -> None:
        check.positive_int("block_size", group["block_size"])
        check.non_negative_int("min_8bit_size", group["min_8bit_size"])

    def chunk_views(self, state: dict[str, Any], begin: int, stop: int, group: dict[str, Any]) -> dict[str, Tensor]:
        # ``begin`` is a multiple of the block size: the chunk's blocks are whole blocks of the tensor.
        block = group["block_size"]
        views = {}
        for key, value in state.items():
            if key.endswith(_ABSMAX):
                views[key] = value.view(-1)[begin // block : -(-stop // block)]
            elif key != "step":
                views[key] = value.view(-1)[begin:stop]
        return views

    @staticmethod
    def _block_size(key: str, shape: tuple[int, ...], group: dict[str, Any], shard: RowShard | None) -> int | None:
        """Entries per block of a moment of (local) ``shape``, or ``None`` to keep it float32."""
        if shard is None or shard.replicates(key):
            numel = torch.Size(shape).numel()
            return group["block_size"] if numel >= group["min_8bit_size"] else None
        row = torch.Size(shape[1:]).numel()
        if row * shard.global_shape[0] < group["min_8bit_size"]:  # the same decision on every rank
            return None
        block = _row_block_size(row, group["block_size"])
        return block if block >= min(MIN_SHARDED_BLOCK, group["block_size"]) else None

    def stored(
        self, key: str, moment: Tensor, group: dict[str, Any], rotations: dict[str, str], shard: RowShard | None
    ) -> dict[str, Tensor]:
        shard = shard if moment.dim() > 0 else None
        block = self._block_size(key, tuple(moment.shape), group, shard) if key in rotations else None
        if block is None:
            return {key: moment}
        codes = torch.empty(moment.shape, dtype=torch.uint8, device="meta")
        if shard is not None and not shard.replicates(key):  # a row of blocks per row (see pack)
            absmax_shape: tuple[int, ...] = (moment.shape[0], moment[0].numel() // block)
        else:
            absmax_shape = (-(-moment.numel() // block),)
        return {key + _CODES: codes, key + _ABSMAX: torch.empty(absmax_shape, dtype=torch.float32, device="meta")}

    def unpack(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        rotations: dict[str, str],
        shard: RowShard | None,
        dtype: torch.dtype,
    ) -> dict[str, Any]:
        work: dict[str, Any] = {}
        for key, value in state.items():
            if key.endswith(_CODES):
                name = key[: -len(_CODES)]
                signed = rotations[name] == "linear"
                block = (
                    self._block_size(name, tuple(value.shape), group, shard)
                    if shard is not None
                    else group["block_size"]
                )
                absmax = state[name + _ABSMAX].reshape(-1)
                decoded = dequantize_blockwise(value, absmax, signed=signed, block_size=block, dtype=dtype)
                work[name] = decoded if signed else decoded.square_()
            elif not key.endswith(_ABSMAX):
                work[key] = value
        return _widened(work, dtype)

    def pack(
        self,
        work: dict[str, Any],
        state: dict[str, Any],
        group: dict[str, Any],
        rotations: dict[str, str],
        shard: RowShard | None,
        seed: int = 0,
    ) -> None:
        narrow = group["state_dtype"] == torch.bfloat16
        for key, value in work.items():
            block = self._block_size(key, tuple(value.shape), group, shard) if key in rotations else None
            if block is None and shard is None and key + _CODES in state:  # a chunk of a quantized moment
                block = group["block_size"]
            if block is not None and isinstance(value, Tensor):
                codes, absmax = state.get(key + _CODES), state.get(key + _ABSMAX)
                blocks = -(-value.numel() // block)
                if codes is None or codes.shape != value.shape or absmax is None or absmax.numel() != blocks:
                    codes = value.new_empty(value.shape, dtype=torch.uint8)
                    absmax = value.new_empty(blocks, dtype=torch.float32)
                signed = rotations[key] == "linear"
                stored = value if signed else value.sqrt()
                # sqrt(v) >= 0 by construction: skip the sign check and its host sync.
                flat_absmax = absmax.reshape(-1)
                quantize_blockwise_(codes, flat_absmax, stored, signed=signed, block_size=block, check_sign=False)
                if shard is not None and not shard.replicates(key):  # a row of blocks per row: shards with the moment
                    flat_absmax = flat_absmax.view(value.shape[0], -1)
                state[key + _CODES], state[key + _ABSMAX] = codes, flat_absmax
                state.pop(key, None)
            else:
                state[key] = _narrowed(key, value, rotations, shard, seed) if narrow else value


#: The two storages (stateless, shared by every optimizer of their kind).
FLOAT32 = MomentStorage()
INT8_BLOCKWISE = Int8Blockwise()


class LazyMoments(dict):
    """A parameter's state as its step works on it, each entry unpacked (8-bit moments decoded)
    at its first use and only then.

    Under FSDP2 a step waits at its collectives while the other parameters reach theirs (see
    :func:`~coap_torch.optim._sharded.run_coalesced`); a moment read only after them (Adafactor's
    first moment, full-size for a dense parameter) is then not held decoded meanwhile. Used for
    dense row shards only: elsewhere the moments are low-rank or nothing waits, and unpacking
    everything at once costs less. :meth:`items` lists the entries unpacked so far: those are
    what :meth:`MomentStorage.pack` stores back; the others stay as they were stored.
    """

    def __init__(self, stored: dict[str, Any], unpack: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        super().__init__()
        self._unpack = unpack
        self._packed: dict[str, dict[str, Any]] = {}
        for key, value in stored.items():
            self._packed.setdefault(moment_name(key), {})[key] = value

    def __missing__(self, key: str) -> Any:
        packed = self._packed.pop(key, None)
        if packed is None:
            raise KeyError(key)
        for name, value in self._unpack(packed).items():
            dict.__setitem__(self, name, value)
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._packed

    def __setitem__(self, key: str, value: Any) -> None:
        self._packed.pop(key, None)
        dict.__setitem__(self, key, value)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default
