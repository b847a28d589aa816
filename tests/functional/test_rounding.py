"""Stochastic rounding to bfloat16: unbiased, reproducible, and it keeps a moving average moving."""

from __future__ import annotations

import pytest
import torch

from coap_torch.functional.rounding import round_to_bfloat16, stochastic_round_to_bfloat16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bfloat16 values around float32 ``x`` (toward zero, and one unit further out)."""
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    high = (low.view(torch.int32) + (1 << 16)).view(torch.float32)
    return low, high


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_result_is_a_neighbour_and_unbiased(sign):
    torch.manual_seed(0)
    x = sign * torch.rand(64).mul(1000).add(1e-3)  # a spread of magnitudes, none exact in bf16
    copies = x.repeat(20_000, 1)
    y = stochastic_round_to_bfloat16(copies, torch.Generator().manual_seed(1)).float()
    low, high = _neighbours(x)
    assert torch.all((y == low) | (y == high))
    # The mean of n draws is within 5 standard errors of x: sd <= gap / 2, gap = high - low.
    gap = (high - low).abs()
    bound = 5 * gap / 2 / 20_000**0.5
    assert torch.all((y.mean(0) - x).abs() <= bound)
    # Round-to-nearest is off by up to half a gap on these values: the bound above is far tighter.
    assert (round_to_bfloat16(x).float() - x).abs().max() > 10 * bound.max()


def test_up_probability_is_the_fraction_of_the_gap():
    x = torch.full((200_000,), 1.0 + 3 * 2**-9)  # 3/4 of the way from 1 to 1 + 2**-7
    y = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0)).float()
    up = (y == 1.0 + 2**-7).float().mean().item()
    assert abs(up - 0.75) < 0.005


def test_exact_values_infinities_and_nan_are_kept():
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**-130, float("inf"), float("-inf"), float("nan")])
    nan_payload = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)  # NaNs that would carry
    x = torch.cat([special, nan_payload]).repeat(1000)
    y = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[:7].float(), special[:7], rtol=0, atol=0)
    assert torch.isnan(y.view(1000, -1)[:, 7:]).all()
    assert torch.equal(y.view(1000, -1)[:, :7], special[:7].to(torch.bfloat16).expand(1000, 7))


def test_reproducible_from_the_generator_and_the_global_rng_untouched():
    x = torch.randn(1000)
    state = torch.get_rng_state()
    a = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(5))
    b = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(5))
    c = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_float64_input_is_rounded_through_float32():
    x = torch.randn(100, dtype=torch.float64)
    y = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0)).float()
    low, high = _neighbours(x.float())
    assert torch.all((y == low) | (y == high))


def test_a_second_moment_stalls_with_round_to_nearest_and_tracks_with_stochastic_rounding():
    # v <- 0.999 v + 0.001 g^2 with a gradient scale that shrinks fourfold: the float32 average
    # follows it down; round-to-nearest drops every step (0.1% moves are below half a bf16 unit)
    # and stays where it was, stochastic rounding follows in expectation.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    n, steps = 4096, 3000
    reference = torch.ones(n)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    for t in range(steps):
        g = torch.randn(n) * 0.25 ** (t / steps)
        reference = reference * 0.999 + 0.001 * g * g
        nearest = round_to_bfloat16(nearest.float() * 0.999 + 0.001 * g * g)
        stochastic = stochastic_round_to_bfloat16(stochastic.float() * 0.999 + 0.001 * g * g, generator)
    nearest_error = (nearest.float() / reference - 1).abs().median().item()
    stochastic_error = (stochastic.float() / reference - 1).abs().median().item()
    stochastic_bias = (stochastic.float() / reference - 1).mean().item()
    assert nearest_error > 1.0  # stalled: more than twice the true value
    assert stochastic_error < 0.1 and abs(stochastic_bias) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rounds_to_a_neighbour_without_bias():
    x = (torch.rand(64, device="cuda") * 100 + 1e-3).repeat(20_000, 1)
    y = stochastic_round_to_bfloat16(x, torch.Generator(device="cuda").manual_seed(0)).float()
    low, high = _neighbours(x[0].cpu())
    y0 = y.cpu()
    assert torch.all((y0 == low) | (y0 == high))
    gap = (high - low).abs()
    assert torch.all((y0.mean(0) - x[0].cpu()).abs() <= 5 * gap / 2 / 20_000**0.5)
