"""Which layout a parameter gets: Tucker-2 only where it saves memory, checked against the real state."""

from __future__ import annotations

import math

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.optim import layout_of
from coap_torch.utils import optimizer_state_nbytes


def _layout(shape, **kwargs):
    param = torch.nn.Parameter(torch.zeros(shape))
    return layout_of(param, CoapAdamW([param], min_conv_numel=0, **kwargs).param_groups[0])


@pytest.mark.parametrize(
    "shape,kind",
    [
        ((1152, 4, 2, 2), "dense"),  # SiT-XL/2 patch embedding: P_O alone is 50x the kernel
        ((64, 3, 3, 3), "dense"),  # an RGB stem conv
        ((64, 64, 3, 3), "tucker"),
        ((128, 256, 3, 3), "tucker"),
        ((16, 8, 3, 3), "tucker"),
    ],
)
def test_tucker_only_where_factors_and_core_fit_in_the_kernel(shape, kind):
    layout = _layout(shape, rank_ratio_cnn=2)
    assert layout.kind == kind
    if kind == "tucker":
        (out_channels, r_out), (in_channels, r_in) = layout.factor_shapes()
        kernel = math.prod(shape[2:])
        assert out_channels * r_out + in_channels * r_in + r_out * r_in * kernel < math.prod(shape)


def test_routed_dense_kernel_holds_less_state_than_tucker_would():
    # The patch conv of SiT at ratio 2: Tucker-2 would keep a (1152, 814) P_O.
    conv = torch.nn.Conv2d(4, 1152, 2, stride=2, bias=False)
    opt = CoapAdamW(conv.parameters(), rank_ratio_cnn=2, min_conv_numel=0)
    conv(torch.randn(2, 4, 8, 8)).square().mean().backward()
    opt.step()
    assert "proj_out" not in opt.state[conv.weight]
    dense_bytes = 2 * conv.weight.numel() * 4
    assert optimizer_state_nbytes(opt) - dense_bytes < 64  # the step counter only
    tucker_factor_bytes = 1152 * int(1152 / math.sqrt(2)) * 4
    assert dense_bytes < tucker_factor_bytes
