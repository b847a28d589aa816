"""Block-wise 8-bit quantization with the dynamic code map: the map, the round trip, the edges."""

from __future__ import annotations

import math

import pytest
import torch

from coap_torch.functional.quantization import (
    DEFAULT_BLOCK_SIZE,
    dequantize_blockwise,
    dynamic_code_map,
    quantize_blockwise,
    quantize_blockwise_,
)

F32 = torch.float32
SIGNS = [True, False]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _half_max_gap(signed: bool) -> float:
    return dynamic_code_map(signed).diff().max().item() / 2


def _round_trip(x, *, signed, block_size=DEFAULT_BLOCK_SIZE, dtype=F32):
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size)
    return codes, absmax, dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)


def _per_element_absmax(absmax, numel, block_size=DEFAULT_BLOCK_SIZE):
    return absmax.repeat_interleave(block_size)[:numel]


def _assert_within_bound(x, absmax, y, signed, block_size=DEFAULT_BLOCK_SIZE):
    """|x - y| <= absmax_b * (half the largest gap), allowing float32 rounding; returns the max
    error in units of absmax_b * half_gap (at most 1)."""
    x = x.reshape(-1).to(F32)
    y = y.reshape(-1).to(F32)
    a = _per_element_absmax(absmax, x.numel(), block_size)
    bound = a * _half_max_gap(signed)
    err = (x - y).abs()
    assert torch.all(err <= bound * (1 + 1e-5) + a * 1e-7), (err - bound).max()
    ratio = err / torch.where(bound > 0, bound, torch.ones_like(bound))
    return ratio.max().item()


# --------------------------------------------------------------------------------------------
# the code map
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", SIGNS)
def test_map_has_256_sorted_unique_values_with_zero_and_one(signed):
    code = dynamic_code_map(signed)
    assert code.shape == (256,) and code.dtype == F32 and code.device.type == "cpu"
    assert torch.all(code.diff() > 0)
    assert len(set(code.tolist())) == 256
    values = set(code.tolist())
    assert 0.0 in values and 1.0 in values
    assert code.max().item() == 1.0
    if signed:
        assert -1.0 in values and code.min().item() == -1.0
    else:
        assert code.min().item() == 0.0 and torch.all(code >= 0)


def test_signed_map_is_symmetric_up_to_one_extra_negative_code():
    code = dynamic_code_map(True)
    positive = code[code > 0]
    negative = code[code < 0]
    assert positive.numel() == 127 and negative.numel() == 128
    # Every positive code has its mirror; the one extra is the tiny -1e-7.
    assert set((-positive).tolist()) <= set(negative.tolist())
    extra = set(negative.tolist()) - set((-positive).tolist())
    assert len(extra) == 1 and math.isclose(extra.pop(), -1e-7, rel_tol=1e-6)


@pytest.mark.parametrize("signed", SIGNS)
def test_map_is_a_dynamic_tree(signed):
    # Decade k, (10^-(k+1), 10^-k], holds 2^(f) evenly spaced values ending at 10^-k, with f
    # fraction bits: 6 - k of the 7 magnitude bits (signed), 7 - k of 8 bits (unsigned).
    code = dynamic_code_map(signed).double()
    magnitude_bits = 7 if signed else 8
    for k in range(magnitude_bits):
        top, bottom = 10.0**-k, 10.0 ** -(k + 1)
        in_decade = code[(code > bottom * (1 + 1e-6)) & (code <= top * (1 + 1e-6))]
        steps = 2 ** (magnitude_bits - 1 - k)
        assert in_decade.numel() == steps, k
        expected = top * (0.1 + 0.9 * torch.arange(1, steps + 1, dtype=torch.float64) / steps)
        torch.testing.assert_close(in_decade, expected, rtol=1e-6, atol=0)
    # Below the last decade: 0, and in the signed map the spare slot -1e-7.
    floor = 10.0**-magnitude_bits
    rest = code[code.abs() <= floor * (1 + 1e-6)]
    torch.testing.assert_close(rest, torch.tensor([-1e-7, 0.0] if signed else [0.0], dtype=torch.float64))


def test_largest_gaps_are_the_documented_ones():
    assert math.isclose(2 * _half_max_gap(True), 0.9 / 64, rel_tol=1e-5)
    assert math.isclose(2 * _half_max_gap(False), 0.9 / 128, rel_tol=1e-5)


def test_map_is_cached_per_sign_and_device():
    assert dynamic_code_map(True) is dynamic_code_map(True, device="cpu")
    assert dynamic_code_map(False) is dynamic_code_map(False, device=torch.device("cpu"))
    assert dynamic_code_map(True) is not dynamic_code_map(False)


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------


def _data(kind: str, shape, seed: int) -> torch.Tensor:
    g = _gen(seed)
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "cauchy":
        x = torch.empty(n).cauchy_(generator=g)
    elif kind == "log-uniform":  # magnitudes spanning 1e-6 .. 1e2, random signs
        x = 10 ** (torch.rand(n, generator=g) * 8 - 6)
        x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    else:
        raise AssertionError(kind)
    return x.view(shape)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("kind", ["normal", "cauchy", "log-uniform"])
def test_round_trip_error_is_within_half_the_largest_gap(kind, signed):
    x = _data(kind, (67, 301), seed=1)
    if not signed:
        x = x.abs()
    _codes, absmax, y = _round_trip(x, signed=signed)
    ratio = _assert_within_bound(x, absmax, y, signed)
    assert 0.5 < ratio <= 1 + 1e-5  # the bound is reached, not loose
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, absmax.numel() * DEFAULT_BLOCK_SIZE - x.numel()))
    torch.testing.assert_close(absmax, blocks.view(-1, DEFAULT_BLOCK_SIZE).abs().amax(dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("signed", SIGNS)
def test_codes_are_the_nearest_entries_of_the_map(signed):
    x = _data("log-uniform", (40, 100), seed=2)
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=64)
    code = dynamic_code_map(signed)
    normalized = x.reshape(-1) / _per_element_absmax(absmax, x.numel(), 64)
    distance = (normalized.unsqueeze(1) - code).abs()
    ours = distance.gather(1, codes.reshape(-1, 1).long()).squeeze(1)
    best = distance.min(dim=1).values
    assert torch.all(ours <= best + 1e-7)


@pytest.mark.parametrize("signed", SIGNS)
def test_small_values_get_the_finer_steps_of_their_decade(signed):
    # In a block of absmax 1, a value in decade k, (10^-(k+1), 10^-k], is off by at most half
    # that decade's step 10^-k * 0.9 / 2^f: far below the block-wide bound for small values.
    magnitude_bits = 7 if signed else 8
    decades = range(magnitude_bits - 1)
    x = torch.zeros(DEFAULT_BLOCK_SIZE)
    x[0] = 1.0
    values = torch.tensor([3.3 * 10.0 ** -(k + 1) for k in decades])
    x[1 : 1 + len(values)] = values
    _, _, y = _round_trip(x, signed=signed)
    err = (y[1 : 1 + len(values)] - values).abs()
    for k in decades:
        half_step = 10.0**-k * 0.9 / 2 ** (magnitude_bits - 1 - k) / 2
        assert err[k].item() <= half_step * (1 + 1e-5), k


@pytest.mark.parametrize("signed", SIGNS)
def test_codes_times_absmax_are_exact(signed):
    g = _gen(3)
    code = dynamic_code_map(signed)
    n_blocks, block = 9, DEFAULT_BLOCK_SIZE
    index = torch.randint(0, 256, (n_blocks, block), generator=g)
    index[:, 0] = 255  # the code 1.0, so that each block's absmax is its scale
    scale = 10 ** (torch.rand(n_blocks, 1, generator=g) * 6 - 3)
    x = code[index] * scale
    codes, absmax, y = _round_trip(x, signed=signed)
    torch.testing.assert_close(absmax, scale.squeeze(1), rtol=0, atol=0)
    assert torch.equal(codes.long(), index)
    assert torch.equal(y, x)


@pytest.mark.parametrize("signed", SIGNS)
def test_block_size_one_is_exact(signed):
    x = _data("log-uniform", (5, 7), seed=4)
    if not signed:
        x = x.abs()
    _codes, absmax, y = _round_trip(x, signed=signed, block_size=1)
    assert absmax.shape == (35,)
    assert torch.equal(y, x)


@pytest.mark.parametrize("signed", SIGNS)
def test_zeros_stay_zero_and_a_zero_block_has_zero_absmax(signed):
    x = _data("normal", (4, 256), seed=5)
    if not signed:
        x = x.abs()
    x[1] = 0.0  # a whole block of zeros
    x[2, ::3] = 0.0
    x[3, 1::5] = -0.0
    codes, absmax, y = _round_trip(x, signed=signed)
    zero_index = int(torch.nonzero(dynamic_code_map(signed) == 0).item())
    assert absmax[1].item() == 0.0 and torch.all(absmax[[0, 2, 3]] > 0)
    assert torch.all(codes[1] == zero_index)
    assert torch.all(y[x == 0] == 0)
    assert not torch.any(torch.isnan(y))
    _assert_within_bound(x, absmax, y, signed)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize(
    "shape", [(0,), (0, 5), (), (1,), (255,), (256,), (257,), (3, 1000), (2, 3, 5, 7), (4, 8, 3, 3)]
)
def test_shapes_sizes_and_output_dtypes(shape, signed):
    x = torch.randn(shape, generator=_gen(6))
    if not signed:
        x = x.abs()
    codes, absmax, y = _round_trip(x, signed=signed)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == (math.ceil(x.numel() / DEFAULT_BLOCK_SIZE),) and absmax.dtype == F32
    assert y.shape == x.shape and y.dtype == F32
    if x.numel():
        _assert_within_bound(x, absmax, y, signed)


@pytest.mark.parametrize("block_size", [64, 100, 2048])
def test_other_block_sizes(block_size):
    x = _data("cauchy", (33, 129), seed=7)
    _codes, absmax, y = _round_trip(x, signed=True, block_size=block_size)
    assert absmax.shape == (math.ceil(x.numel() / block_size),)
    _assert_within_bound(x, absmax, y, True, block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_are_computed_in_float32(dtype):
    x = torch.randn(3, 300, generator=_gen(8)).to(dtype)
    codes, absmax = quantize_blockwise(x, signed=True)
    ref_codes, ref_absmax = quantize_blockwise(x.float(), signed=True)
    assert codes.dtype == torch.uint8 and absmax.dtype == F32
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    y = dequantize_blockwise(codes, absmax, signed=True, dtype=dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y, dequantize_blockwise(codes, absmax, signed=True).to(dtype), rtol=0, atol=0)


def test_non_contiguous_input_is_read_in_logical_order():
    x = torch.randn(300, 70, generator=_gen(9)).t()
    assert not x.is_contiguous()
    codes, absmax = quantize_blockwise(x, signed=True)
    ref_codes, ref_absmax = quantize_blockwise(x.contiguous(), signed=True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("signed", SIGNS)
def test_deterministic(signed):
    x = _data("normal", (50, 77), seed=10).abs()
    first = _round_trip(x, signed=signed)
    second = _round_trip(x.clone(), signed=signed)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_unsigned_map_is_much_better_for_second_moments():
    # Adam's second moment: squares of gradients, spread over several decades inside a block.
    v = torch.randn(256, 512, generator=_gen(11)) ** 2
    v = v[v > 0]
    rel = {}
    for signed in SIGNS:
        _, _, y = _round_trip(v, signed=signed)
        rel[signed] = ((v - y).abs() / v).mean().item()
    assert rel[False] < 0.6 * rel[True]


# --------------------------------------------------------------------------------------------
# the in-place variant and argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", SIGNS)
def test_in_place_variant_reuses_the_given_tensors(signed):
    g = _gen(12)
    x0, x1 = torch.randn(2, 10, 100, generator=g).abs()
    codes, absmax = quantize_blockwise(x0, signed=signed)
    pointers = codes.data_ptr(), absmax.data_ptr()
    out = quantize_blockwise_(codes, absmax, x1, signed=signed)
    assert out[0] is codes and out[1] is absmax
    assert (codes.data_ptr(), absmax.data_ptr()) == pointers
    ref_codes, ref_absmax = quantize_blockwise(x1, signed=signed)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def test_negative_values_are_refused_by_the_unsigned_map():
    x = torch.rand(3, 200, generator=_gen(13))
    x[2, 17] = -0.125
    with pytest.raises(ValueError, match=r"non-negative.*-0\.125"):
        quantize_blockwise(x, signed=False)
    codes = torch.full(x.shape, 7, dtype=torch.uint8)
    absmax = torch.full((3,), 5.0)
    with pytest.raises(ValueError, match="non-negative"):
        quantize_blockwise_(codes, absmax, x, signed=False)
    assert torch.all(codes == 7) and torch.all(absmax == 5.0)  # nothing written
    quantize_blockwise(-torch.zeros(10), signed=False)  # negative zero is fine


def test_argument_checks():
    x = torch.randn(10, 30)
    for block_size in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            quantize_blockwise(x, signed=True, block_size=block_size)
    with pytest.raises(TypeError, match="floating"):
        quantize_blockwise(torch.arange(10), signed=True)
    codes, absmax = quantize_blockwise(x, signed=True, block_size=64)
    with pytest.raises(ValueError, match="absmax"):
        quantize_blockwise_(codes, torch.empty(4), x, signed=True, block_size=128)
    with pytest.raises(ValueError, match="codes"):
        quantize_blockwise_(codes.view(30, 10), absmax, x, signed=True, block_size=64)
    with pytest.raises(ValueError, match="codes"):
        dequantize_blockwise(codes.to(torch.int32), absmax, signed=True, block_size=64)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(codes, absmax, signed=True, block_size=128)


# --------------------------------------------------------------------------------------------
# other devices and implementations
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("signed", SIGNS)
def test_cuda_matches_cpu(signed):
    x = _data("log-uniform", (123, 457), seed=14)
    if not signed:
        x = x.abs()
    codes, absmax, _y = _round_trip(x, signed=signed)
    cuda_codes, cuda_absmax, cuda_y = _round_trip(x.cuda(), signed=signed)
    assert cuda_codes.device.type == "cuda" and cuda_absmax.device.type == "cuda"
    assert dynamic_code_map(signed, device="cuda").device.type == "cuda"
    assert torch.equal(cuda_absmax.cpu(), absmax)
    assert (cuda_codes.cpu() != codes).float().mean() < 1e-4  # division rounding may differ at ties
    _assert_within_bound(x, absmax, cuda_y.cpu(), signed)


def test_close_to_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, 512, generator=_gen(15))
    try:
        q, state = F.quantize_blockwise(x.to(device), blocksize=DEFAULT_BLOCK_SIZE)
        reference = F.dequantize_blockwise(q, state).float().cpu()
    except Exception as err:  # noqa: BLE001 - e.g. no kernels for this device in the installed build
        pytest.skip(f"bitsandbytes cannot quantize on {device}: {err}")
    bnb_half_gap = F.create_dynamic_map(signed=True).float().diff().max().item() / 2
    _codes, absmax, y = _round_trip(x, signed=True)
    a = _per_element_absmax(absmax, x.numel()).view(x.shape)
    # Both are within their map's half gap of x, hence within the sum of each other.
    assert torch.all((y - reference).abs() <= a * (_half_max_gap(True) + bnb_half_gap) * (1 + 1e-4))


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 5000, (1 << 18) + 300])
def test_trusted_non_negative_path_matches_the_checked_one(numel):
    # check_sign=False (used by the optimizers for sqrt(v)) takes a cheaper reduction and the
    # chunked encoder; on non-negative data it must give exactly the same codes and scales.
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).square()
    checked = quantize_blockwise(x, signed=False)
    codes = torch.empty(numel, dtype=torch.uint8)
    absmax = torch.empty(-(-numel // 256))
    quantize_blockwise_(codes, absmax, x, signed=False, check_sign=False)
    assert torch.equal(codes, checked[0]) and torch.equal(absmax, checked[1])


@pytest.mark.parametrize("signed", [True, False])
def test_an_infinite_entry_leaves_its_block_finite_and_the_others_exact(signed):
    # A finite gradient of 1e25 squares to inf in float32 (as in torch's AdamW). Its block must
    # not decode to NaN (0 * inf): the infinite entry reads back as the largest float32 of its
    # sign, the rest of its block as 0, and every other block is unaffected.
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs()
    clean = dequantize_blockwise(*quantize_blockwise(x, signed=signed), signed=signed)
    x[5] = float("inf")
    if signed:
        x[700] = -float("inf")
    codes, absmax = quantize_blockwise(x, signed=signed)
    out = dequantize_blockwise(codes, absmax, signed=signed)
    assert torch.isfinite(out).all()
    big = torch.finfo(torch.float32).max
    assert out[5] == big and (out[:256] != 0).sum() == 1
    if signed:
        assert out[700] == -big and (out[512:768] != 0).sum() == 1  # the sign is kept (no wrap-around)
        assert torch.equal(out[256:512], clean[256:512]) and torch.equal(out[768:], clean[768:])
    else:
        assert torch.equal(out[256:], clean[256:])
    assert torch.isinf(out[5].square())  # a second moment stored as its root squares back to inf


def test_a_nan_entry_makes_only_its_block_nan():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1))
    x[300] = float("nan")
    out = dequantize_blockwise(*quantize_blockwise(x, signed=True), signed=True)
    assert torch.isnan(out[256:512]).all() and torch.isfinite(out[:256]).all() and torch.isfinite(out[512:]).all()


@pytest.mark.parametrize("signed", SIGNS)
def test_encoder_equals_bucketize_at_every_edge(signed):
    # The table encoder (float16 pattern -> lowest code and one threshold) must pick exactly the
    # code torch.bucketize picks: checked on every float16 value in range and its float32
    # neighbours, on every midpoint and its neighbours (the ties go down), and on random values.
    from coap_torch.functional.quantization import _encode_, _tables

    _, midpoints = _tables(signed, torch.device("cpu"))
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    halves = halves[torch.isfinite(halves) & (halves.abs() <= 1)]
    lower = -1.0 if signed else 0.0
    points = torch.cat([halves, midpoints, torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    up = torch.nextafter(points, torch.tensor(2.0))
    down = torch.nextafter(points, torch.tensor(-2.0))
    # float16 rounding boundaries: halfway between consecutive float16 values, and their neighbours
    edges = (halves[1:] + halves[:-1]) / 2
    x = torch.cat([points, up, down, edges, torch.nextafter(edges, torch.tensor(2.0)),
                   torch.nextafter(edges, torch.tensor(-2.0))])  # fmt: skip
    x = x[(x >= lower) & (x <= 1.0)]
    codes = torch.empty(x.shape, dtype=torch.uint8)
    _encode_(codes, x, signed)
    assert torch.equal(codes.long(), torch.bucketize(x, midpoints))
