r"""Block-wise 8-bit quantization of optimizer moments with a dynamic (non-linear) code map.

A tensor ``x`` is flattened and cut into blocks of ``block_size`` consecutive elements (the last
block is padded with zeros). Each block ``b`` keeps one float32 scale, its absolute maximum
``a_b = max |x_i|``, and each element keeps one uint8 code: the index of the entry of a 256-value
code map ``Q`` (sorted ascending, within ``[-1, 1]``) nearest to ``x_i / a_b``. Dequantization is
``Q[code_i] * a_b``. This is the scheme of Dettmers et al., *8-bit Optimizers via Block-wise
Quantization* (ICLR 2022), with its "dynamic tree" code map: signed for first moments (values in
``[-1, 1]``), unsigned for second moments (values in ``[0, 1]``, one more bit of resolution).

Codes are indices into the *sorted* map, not the bit patterns that define its values, so the
order of codes is the order of values.

Error bound
-----------
Rounding to the nearest code gives, for every element of block ``b``,

.. math::
    |x_i - \mathrm{deq}(q(x))_i| \le a_b \, \tfrac{1}{2} \max_j (Q_{j+1} - Q_j)

up to float32 rounding of the division and the product (a relative ``~1e-7`` of ``a_b``). The
largest gap is ``0.9 / 64`` for the signed map and ``0.9 / 128`` for the unsigned one (both in
the top decade), so the error is at most ``0.0070 a_b`` (signed) and ``0.0035 a_b`` (unsigned).
Small values are represented much more finely: an element with ``|x_i| <= 10^{-k} a_b`` sits in
a decade where the gaps are at most ``(2/10)^k`` times the top ones (each decade is ten times
narrower and has one fraction bit less), down to the smallest non-zero codes, ``1e-6``
(signed) / ``1e-7`` (unsigned) of ``a_b``; smaller magnitudes round to those or to zero. The
block's largest element (``+-a_b``) and zeros are reproduced exactly.

Memory: 1 byte per element plus 4 bytes per block (``4 / 256`` bytes per element by default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "dequantize_blockwise",
    "dynamic_code_map",
    "quantize_blockwise",
    "quantize_blockwise_",
]

#: Elements per block (one float32 absmax each), as in bitsandbytes' 8-bit optimizers.
DEFAULT_BLOCK_SIZE = 256

_BITS = 8

#: (signed, device) -> (code map (256,), midpoints between consecutive codes (255,)), float32.
#: A module-level constant table: derived from ``signed`` alone, never part of optimizer state.
_CODE_MAPS: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}


def _tree_magnitudes(bits: int) -> list[float]:
    """The positive values of a dynamic-tree code on ``bits`` magnitude bits (no sign bit).

    A non-zero pattern reads: ``k`` leading zero bits give the exponent ``10^-k``, the first one
    bit is the indicator, and the ``f = bits - 1 - k`` bits after it are a linear fraction
    ``j`` in ``[0, 2^f)``. The decade ``(10^-(k+1), 10^-k]`` is cut into ``2^f`` equal steps and
    the pattern takes the top of step ``j``:

        value = 10^-k * (0.1 + 0.9 * (j + 1) / 2^f)

    so decade ``k = 0`` ends exactly at 1, and consecutive decades join with the same step as
    inside the lower one. There are ``2^bits - 1`` such values (the all-zero pattern is left to
    the caller).
    """
    values = []
    for k in range(bits):
        f = bits - 1 - k
        steps = 2**f
        values.extend(10.0**-k * (0.1 + 0.9 * (j + 1) / steps) for j in range(steps))
    return values


def _build_code_map(signed: bool) -> list[float]:
    if signed:
        # 1 sign bit + 7 magnitude bits. The all-zero magnitude is 0 for the positive sign; for
        # the negative sign (which would duplicate 0) the run of 7 zeros is read as the exponent
        # 10^-7 with no fraction bits left, i.e. -1e-7, as the unsigned tree does on 8 bits.
        magnitudes = _tree_magnitudes(_BITS - 1)
        values = [0.0, -(10.0 ** -(_BITS - 1))] + magnitudes + [-m for m in magnitudes]
    else:
        # No sign: the sign bit becomes one more bit of the tree (one more fraction bit in each
        # decade, and one more decade). The all-zero pattern is 0.
        values = [0.0] + _tree_magnitudes(_BITS)
    return sorted(values)


def _tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (bool(signed), device)
    tables = _CODE_MAPS.get(key)
    if tables is None:
        code = torch.tensor(_build_code_map(bool(signed)), dtype=torch.float64)
        # Midpoints from the float32 codes, so that "nearest" refers to the stored values.
        code32 = code.to(torch.float32).to(torch.float64)
        midpoints = (code32[:-1] + code32[1:]) / 2
        tables = (code.to(device=device, dtype=torch.float32), midpoints.to(device=device, dtype=torch.float32))
        _CODE_MAPS[key] = tables
    return tables


#: Elements encoded per chunk (1 MiB of float32): small enough for the encoder's temporaries to
#: stay in cache, large enough that the per-chunk overhead is negligible.
_CHUNK_ELEMENTS = 1 << 18

_ENCODERS: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}


def _encoder_tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two tables indexed by float16 bit patterns: the lowest code of the values that round to
    that float16 (uint8), and the one midpoint between codes among those values (+inf if none).

    ``torch.bucketize`` (a binary search per element) would dominate quantization time. Instead
    the value is rounded to float16, whose 16-bit pattern indexes the tables, and one comparison
    with the bucket's midpoint finishes the job: ``code = low[p] + (x > threshold[p])``. That is
    exact: the float32 values that round to one float16 span at most 2^-10 of its magnitude (or
    6e-8 near zero), less than the distance between two midpoints (0.7% relative, 1e-7 absolute),
    so at most one midpoint lies among them. A midpoint belongs to the bucket of pattern ``p``
    exactly when it rounds to that float16 itself.
    """
    key = (bool(signed), device)
    tables = _ENCODERS.get(key)
    if tables is None:
        _, midpoints = _tables(signed, torch.device("cpu"))
        patterns = torch.arange(1 << 16, dtype=torch.int32)
        patterns = torch.where(patterns >= 1 << 15, patterns - (1 << 16), patterns).to(torch.int16)
        halves = patterns.view(torch.float16)
        values = halves.float().nan_to_num(0.0, 1.0, -1.0).clamp(-1.0, 1.0)
        nearest = torch.bucketize(values, midpoints)  # the code of the float16 value itself
        last = midpoints.numel() - 1
        below = midpoints[(nearest - 1).clamp(0, last)]  # the largest midpoint under it
        above = midpoints[nearest.clamp(0, last)]  # the smallest at or over it
        below_inside = (nearest > 0) & (below.half() == halves)
        above_inside = (nearest <= last) & (above.half() == halves)
        low = (nearest - below_inside.long()).to(torch.uint8)
        inf = torch.full_like(values, float("inf"))
        threshold = torch.where(below_inside, below, torch.where(above_inside, above, inf))
        tables = (low.to(device), threshold.to(device))
        _ENCODERS[key] = tables
    return tables


def _encode_(codes: Tensor, normalized: Tensor, signed: bool) -> None:
    """Write into ``codes`` (uint8) the index of the nearest code (ties go down, as
    ``torch.bucketize``) of each value of ``normalized`` (in [-1, 1])."""
    low, threshold = _encoder_tables(signed, normalized.device)
    pattern = normalized.to(torch.float16).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    torch.index_select(low, 0, pattern, out=codes)
    codes += torch.index_select(threshold, 0, pattern) < normalized


def _normalize_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dynamic_code_map(signed: bool, *, device: torch.device | str | None = None) -> Tensor:
    """The 256-value dynamic-tree code map (float32, sorted ascending, shape (256,)).

    ``signed=True`` (first moments): 1 sign bit, then the tree on 7 bits; values in ``[-1, 1]``,
    127 positive magnitudes from ``1e-6`` to ``1``, their negatives, ``0`` and ``-1e-7`` (the
    slot of the redundant negative zero). ``signed=False`` (non-negative second moments): the
    tree on all 8 bits; ``0`` and 255 values from ``1e-7`` to ``1``, twice the resolution of the
    signed map in every decade.

    In each decade ``(10^-(k+1), 10^-k]`` the values are evenly spaced, with ``2^(6-k)`` steps
    (signed) or ``2^(7-k)`` steps (unsigned); the largest gap, in the top decade, is
    ``0.9 / 64`` (signed) and ``0.9 / 128`` (unsigned).

    The tensor is cached per ``(signed, device)`` and shared between callers: do not modify it
    in place.
    """
    return _tables(signed, _normalize_device(device))[0]


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def quantize_blockwise_(
    codes: Tensor,
    absmax: Tensor,
    x: Tensor,
    *,
    signed: bool,
    block_size: int = DEFAULT_BLOCK_SIZE,
    check_sign: bool = True,
) -> tuple[Tensor, Tensor]:
    """In-place :func:`quantize_blockwise`: write the codes of ``x`` into ``codes`` and ``absmax``.

    ``check_sign=False`` skips the check that ``x >= 0`` for ``signed=False`` (one host sync on
    CUDA), for callers whose values are non-negative by construction; negative values then
    encode as 0.

    ``codes`` must be uint8 with ``x``'s shape and ``absmax`` float32 of shape
    ``(ceil(x.numel() / block_size),)``, both on ``x``'s device (e.g. the tensors returned by an
    earlier call, reused by an optimizer step). Nothing is written when an error is raised.
    Returns ``(codes, absmax)``.
    """
    _check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    n = x.numel()
    nb = _num_blocks(n, block_size)
    if codes.dtype != torch.uint8 or codes.shape != x.shape or codes.device != x.device:
        raise ValueError(
            f"codes must be uint8 of shape {tuple(x.shape)} on {x.device}, "
            f"got {codes.dtype} of shape {tuple(codes.shape)} on {codes.device}"
        )
    if absmax.dtype != torch.float32 or absmax.shape != (nb,) or absmax.device != x.device:
        raise ValueError(
            f"absmax must be float32 of shape ({nb},) on {x.device}, "
            f"got {absmax.dtype} of shape {tuple(absmax.shape)} on {absmax.device}"
        )
    if n == 0:
        return codes, absmax

    flat = x.reshape(-1).to(torch.float32)
    full = n // block_size
    # Non-negative values taken on trust need only the block maxima (one reduction, not two).
    trusted = not signed and not check_sign
    # Two plain reductions: several times faster than ``torch.aminmax`` on the CPU.
    reduce = (
        (lambda t, **kw: torch.amax(t, **kw).clamp_min(0))
        if trusted
        else (lambda t, **kw: (torch.amin(t, **kw), torch.amax(t, **kw)))
    )
    parts = []
    if full:
        parts.append(reduce(flat[: full * block_size].view(full, block_size), dim=1))
    if full < nb:
        parts.append(reduce(flat[full * block_size :].view(1, -1), dim=1))
    if trusted:
        torch.cat(parts, out=absmax)
    else:
        lo = torch.cat([part[0] for part in parts])
        hi = torch.cat([part[1] for part in parts])
        if not signed and lo.min() < 0:  # a host sync: second moments must be checked, not clamped
            raise ValueError(
                f"signed=False needs non-negative values (e.g. second moments), but min(x) = {lo.min().item():.6g}"
            )
        torch.maximum(hi, lo.neg(), out=absmax)
    # An infinite entry (a finite gradient of 1e25 squares to inf in float32, as in torch's
    # AdamW) would make its block's scale inf, and 0 * inf = NaN would then decode the whole
    # block as NaN. With the scale capped at the largest float32, the infinite entry takes the
    # top code and decodes to +-3.4e38 (whose square, for a second moment stored as its root, is
    # inf again), and the block's finite entries decode to 0: nothing non-finite appears that
    # the input did not have. NaN stays NaN (a NaN input makes its block NaN).
    absmax.clamp_(max=torch.finfo(torch.float32).max)
    # An all-zero block has absmax 0: divide by 1 instead, its codes then all map to 0.
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))

    # Normalize and encode a chunk of blocks at a time: the temporaries of the encoder then stay
    # in cache and are recycled by the allocator instead of being page-faulted in per call.
    out = codes.view(-1) if codes.is_contiguous() else torch.empty(n, dtype=torch.uint8, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // block_size) * block_size
    for begin in range(0, n, chunk):
        stop = min(begin + chunk, n)
        first, last = begin // block_size, -(-stop // block_size)
        values = flat[begin:stop]
        whole = (stop - begin) // block_size
        normalized = torch.empty_like(values)
        if whole:
            torch.div(
                values[: whole * block_size].view(whole, block_size),
                divisor[first : first + whole].unsqueeze(1),
                out=normalized[: whole * block_size].view(whole, block_size),
            )
        if first + whole < last:
            torch.div(values[whole * block_size :], divisor[last - 1], out=normalized[whole * block_size :])
        _encode_(out[begin:stop], normalized, signed)
    if out.data_ptr() != codes.data_ptr():
        codes.copy_(out.view(x.shape))
    return codes, absmax


def quantize_blockwise(
    x: Tensor,
    *,
    signed: bool,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` block-wise to 8-bit codes of the dynamic code map.

    Args:
        x: any shape, any floating dtype (the computation is in float32), CPU or CUDA.
        signed: ``True`` for values of either sign (first moments), ``False`` for non-negative
            values (second moments; a negative element raises ``ValueError``).
        block_size: elements per block; ``x`` is flattened in its logical (row-major) order and
            the last block is padded with zeros.

    Returns:
        ``(codes, absmax)``: ``codes`` uint8 with ``x``'s shape, the index into
        :func:`dynamic_code_map` of the code nearest to ``x_i / absmax_b``; ``absmax`` float32 of
        shape ``(ceil(x.numel() / block_size),)``, the per-block maximum of ``|x|`` (0 for a
        block of zeros, whose codes all map to 0).

    The round trip error is at most ``absmax_b * 0.9 / 128`` (signed) or ``absmax_b * 0.9 / 256``
    (unsigned) per element, plus float32 rounding; see the module docstring.
    """
    _check_block_size(block_size)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(_num_blocks(x.numel(), block_size), dtype=torch.float32, device=x.device)
    return quantize_blockwise_(codes, absmax, x, signed=signed, block_size=block_size)


def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    *,
    signed: bool,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values ``dynamic_code_map(signed)[codes] * absmax_b``, with ``codes``' shape and ``dtype``.

    Args:
        codes: uint8, any shape, as returned by :func:`quantize_blockwise`.
        absmax: float32 of shape ``(ceil(codes.numel() / block_size),)``, on ``codes``' device.
        signed, block_size: as given to :func:`quantize_blockwise`.
        dtype: floating dtype of the result (the product is computed in float32).
    """
    _check_block_size(block_size)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    n = codes.numel()
    nb = _num_blocks(n, block_size)
    if absmax.shape != (nb,) or absmax.device != codes.device:
        raise ValueError(
            f"absmax must have shape ({nb},) on {codes.device}, got {tuple(absmax.shape)} on {absmax.device}"
        )
    if n == 0:
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)

    code_map = _tables(signed, codes.device)[0]
    values = torch.index_select(code_map, 0, codes.reshape(-1).to(torch.int32))
    scale = absmax.to(torch.float32)
    full = n // block_size
    if full:
        values[: full * block_size].view(full, block_size).mul_(scale[:full].unsqueeze(1))
    if full < nb:
        values[full * block_size :].mul_(scale[full])
    return values.view(codes.shape).to(dtype)
