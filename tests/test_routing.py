"""Which layout a parameter gets: Tucker-2 only where it saves memory, checked against the real state."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize(
    "shape,side,P_rows",
    [
        ((96, 32), None, 32),  # the paper: the smaller side
        ((32, 96), None, 32),
        ((96, 32), "smaller", 32),
        ((32, 96), "input", 96),  # dim 1 whatever the shape
        ((96, 32), "input", 32),
        ((96, 32), "larger", 96),  # the larger side, the moments on the smaller one
        ((32, 96), "larger", 96),
        ((4, 32, 96), "larger", 96),  # a stack: each matrix alike
        ((24, 48, 1, 1), "larger", 48),  # a 1x1 conv is the (24, 48) matrix it is
    ],
)
def test_projection_side(shape, side, P_rows):
    layout = _layout(shape, projection_side=side, rank=8)
    assert layout.kind == "matrix"
    (P_shape,) = layout.factor_shapes()
    r = 8 if len(shape) < 4 else 12  # a 1x1 conv takes its rank from rank_ratio_cnn (24 // 2)
    assert P_shape[-2:] == (P_rows, r)
    matrix = shape[:2] if len(shape) == 4 else shape[-2:]
    assert layout.projected_shape[-2:] == (sum(matrix) - P_rows, r)  # the moments on the other side
    grad = torch.randn(shape)
    canonical = layout.canonical(grad)
    assert canonical.shape[-1] == P_rows
    torch.testing.assert_close(layout.restore(canonical, [torch.eye(P_rows)]), grad)  # P = I restores G


def test_larger_side_stores_fewer_floats_for_adamw():
    # The example: 5632 x 2048 at rank 512: max*r + 2*min*r instead of 2*max*r + min*r.
    smaller = _layout((5632, 2048), rank=512)
    larger = _layout((5632, 2048), rank=512, projection_side="larger")

    def floats(layout):
        return math.prod(layout.factor_shapes()[0]) + 2 * math.prod(layout.projected_shape)

    assert floats(smaller) == (2 * 5632 + 2048) * 512
    assert floats(larger) == (5632 + 2 * 2048) * 512
    assert 1 - floats(larger) / floats(smaller) == pytest.approx(0.27, abs=0.005)


def test_conv_projection_input_projects_the_input_mode_only():
    layout = _layout((48, 32, 3, 3), conv_projection="input", rank_ratio_cnn=2)
    assert layout.kind == "conv_input" and layout.factor_keys == ("proj_in",)
    r = int(32 / math.sqrt(2))
    assert layout.factor_shapes() == [(32, r)] and layout.projected_shape == (48, 3, 3, r)
    # project and restore are adjoint: <restore(D), G> = <D, project(G)>
    P = torch.linalg.qr(torch.randn(32, r, dtype=torch.float64))[0]
    grad, low = torch.randn(48, 32, 3, 3, dtype=torch.float64), torch.randn(48, 3, 3, r, dtype=torch.float64)
    projected = layout.project(layout.canonical(grad), [P])
    torch.testing.assert_close((layout.restore(low, [P]) * grad).sum(), (low * projected).sum())
    # and restore(project(G)) is G with its input channels projected on span(P)
    expected = torch.einsum("oikl,ij->ojkl", grad, P @ P.T)
    torch.testing.assert_close(layout.restore(projected, [P]), expected)
    # a kernel whose P_I and input-mode moment would not fit in it stays dense
    assert _layout((4, 64, 3, 3), conv_projection="input").kind == "dense"


def test_conv_projection_input_trains_and_saves_memory_against_dense():
    conv = torch.nn.Conv2d(32, 48, 3)
    opt = CoapAdamW(conv.parameters(), conv_projection="input", update_interval=2, reproject_factor=2)
    for _ in range(5):  # the first SVD, an Eq. 2 step at 2, a re-projection at 4
        conv(torch.randn(8, 32, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[conv.weight]
    P = state["proj_in"]
    torch.testing.assert_close(P.T @ P, torch.eye(P.shape[1]), atol=1e-5, rtol=0)
    assert state["exp_avg"].shape == (48, 3, 3, P.shape[1])
    assert optimizer_state_nbytes(opt) < 2 * 4 * conv.weight.numel()


@pytest.fixture
def default_side_input(monkeypatch):
    """The library as if its default projection side were the input side."""
    from coap_torch.optim import _layout

    monkeypatch.setattr(_layout, "DEFAULT_PROJECTION_SIDE", "input")
    _layout._cached_route.cache_clear()
    yield
    _layout._cached_route.cache_clear()


def test_state_built_at_the_earlier_default_side_keeps_it(default_side_input):
    # A checkpoint of an earlier version (P on the smaller side of a wide matrix) loads into an
    # optimizer whose default now puts P elsewhere, and resumes bit for bit on its side; new
    # parameters get the new default.
    torch.manual_seed(0)
    wide = torch.nn.Linear(96, 32)
    data = [torch.randn(64, 96) for _ in range(6)]

    def train(opt, batches):
        for x in batches:
            wide(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    earlier = CoapAdamW(wide.parameters(), rank=8, update_interval=2, reproject_factor=2, projection_side="smaller")
    train(earlier, data[:3])
    saved = copy.deepcopy({"model": wide.state_dict(), "opt": earlier.state_dict()})
    for group in saved["opt"]["param_groups"]:
        group["projection_side"] = None  # as an earlier version saved its default
    train(earlier, data[3:])
    expected = wide.weight.detach().clone()

    wide.load_state_dict(saved["model"])
    resumed = CoapAdamW(wide.parameters(), rank=8, update_interval=2, reproject_factor=2)
    resumed.load_state_dict(saved["opt"])
    assert resumed.state[wide.weight]["proj"].shape == (32, 8)  # the smaller side, kept
    train(resumed, data[3:])
    assert torch.equal(wide.weight, expected)

    fresh = torch.nn.Linear(96, 32)
    opt = CoapAdamW(fresh.parameters(), rank=8)
    fresh(data[0]).square().mean().backward()
    opt.step()
    assert opt.state[fresh.weight]["proj"].shape == (96, 8)  # the new default: the input side
