"""``scale="auto"``: the restored update of a projected parameter gets the RMS a full-rank step of
the same rule would have (``sqrt(n / r)`` for matrices, the Tucker-2 equivalent for kernels)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdamW
from coap_torch.optim import layout_of
from helpers.nets import make_net, train
from helpers.optim_db import OPTIMIZERS


def _rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def _first_step_change(opt_cls, weight: torch.Tensor, grad: torch.Tensor, **options) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    opt = opt_cls([param], **options)
    param.grad = grad.clone()
    opt.step()
    return param.detach() - weight


#: Shapes and options whose projected moments differ: both orientations, P on the larger side, a
#: Tucker-2 kernel and a kernel projected on its input channels only.
PROJECTED = [
    ((64, 128), {"rank": 16}),
    ((128, 64), {"rank": 16}),
    ((64, 128), {"rank": 16, "projection_side": "larger"}),
    ((32, 16, 3, 3), {"rank_ratio_cnn": 4, "min_conv_numel": 0}),
    ((32, 16, 3, 3), {"rank_ratio_cnn": 4, "min_conv_numel": 0, "conv_projection": "input"}),
]
IDS = ["wide", "tall", "larger-side", "tucker2", "conv-input"]


@pytest.mark.parametrize(("shape", "options"), PROJECTED, ids=IDS)
def test_first_adamw_step_has_the_size_of_torch_adamw(shape, options):
    # Adam's first step is lr * g / (|g| + eps): every entry about +-lr, RMS lr, for torch's AdamW
    # on the full gradient and for CoapAdamW on the projected one. Restored, the projected step
    # keeps its norm, so without the norm-matched scale its RMS is lr * sqrt(numel(U) / numel(W)).
    g = torch.Generator().manual_seed(0)
    # float64: the change of a unit-size weight by 1e-3 keeps 1e-13 of relative precision
    weight, grad = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    lr = 1e-3
    reference = _rms(_first_step_change(torch.optim.AdamW, weight, grad, lr=lr, weight_decay=0.0))
    auto = _first_step_change(CoapAdamW, weight, grad, lr=lr, weight_decay=0.0, scale="auto", **options)
    plain = _first_step_change(CoapAdamW, weight, grad, lr=lr, weight_decay=0.0, scale=1.0, **options)
    factor = layout_of(torch.empty(shape), {**CoapAdamW([torch.nn.Parameter(weight)], **options).defaults})
    shrink = math.sqrt(math.prod(factor.projected_shape) / weight.numel())
    assert shrink < 1
    assert _rms(auto) == pytest.approx(reference, rel=1e-4)
    assert _rms(plain) == pytest.approx(reference * shrink, rel=1e-4)
    torch.testing.assert_close(auto, plain / shrink, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(("shape", "options"), PROJECTED[:1] + PROJECTED[3:4], ids=["matrix", "tucker2"])
def test_adafactor_clipping_bounds_the_update_the_weight_receives(shape, options):
    # Adafactor clips its update to RMS <= clip_threshold. With "auto" the restored update has the
    # projected update's RMS, so the clip bounds what the weight receives, as in transformers'
    # Adafactor on the full gradient (which clips there too: a small threshold always binds).
    transformers = pytest.importorskip("transformers.optimization")
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    common = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "warmup_init": False}
    clip = 0.1
    reference = _rms(_first_step_change(transformers.Adafactor, weight, grad, clip_threshold=clip, **common))
    auto = _first_step_change(CoapAdafactor, weight, grad, clip_threshold=clip, scale="auto", **common, **options)
    plain = _first_step_change(CoapAdafactor, weight, grad, clip_threshold=clip, scale=0.5, **common, **options)
    assert reference == pytest.approx(common["lr"] * clip, rel=1e-5)
    assert _rms(auto) == pytest.approx(reference, rel=1e-5)
    # An explicit scale multiplies after the clip, which bounds the restored update's RMS.
    assert _rms(plain) == pytest.approx(0.5 * reference, rel=1e-5)


@pytest.mark.parametrize("name", ["CoapAdamW", "CoapAdamW8bit", "CoapAdafactor", "CoapAdafactor8bit"])
def test_auto_is_the_per_parameter_factor_and_leaves_dense_parameters_alone(name):
    # "auto" is exactly the explicit number sqrt(numel(W) / numel(U)) per projected parameter
    # (steps through Eq. 2 steps and SVD refreshes, the 8-bit storage included), and 1 for dense
    # ones. Adafactor's clip is where they differ (an explicit scale multiplies after it, as lr
    # does; the test above covers it), so it is off here.
    options = {"clip_threshold": float("inf")} if "Adafactor" in name else {}
    auto_model = make_net()
    auto_opt = OPTIMIZERS[name](auto_model.parameters(), scale="auto", **options)
    explicit_model = make_net()
    template = OPTIMIZERS[name](explicit_model.parameters(), **options).param_groups[0]
    groups = []
    for param in explicit_model.parameters():
        layout = layout_of(param, template)
        factor = math.sqrt(param.numel() / math.prod(layout.projected_shape)) if layout.projected else 123.0
        groups.append({"params": [param], "scale": factor})
    assert any(group["scale"] == 123.0 for group in groups)  # dense ones: the factor is ignored
    assert any(group["scale"] not in (1.0, 123.0) for group in groups)
    explicit_opt = OPTIMIZERS[name](groups, **options)
    assert train(auto_model, auto_opt, 7) == train(explicit_model, explicit_opt, 7)
    for p, q in zip(auto_model.parameters(), explicit_model.parameters()):
        assert torch.equal(p, q)


def test_a_checkpoint_resumes_with_its_own_scale():
    # scale sizes the update like lr and comes from the checkpoint like lr, with no warning.
    model = make_net()
    opt = OPTIMIZERS["CoapAdamW"](model.parameters(), scale="auto")
    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = make_net(seed=3)
    twin.load_state_dict(saved["model"])
    twin_opt = OPTIMIZERS["CoapAdamW"](twin.parameters(), scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin_opt.load_state_dict(saved["optimizer"])
    assert twin_opt.param_groups[0]["scale"] == "auto"
    assert train(twin, twin_opt, 4, start=5) == train(model, opt, 4, start=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("bad", ["big", -1.0, float("nan")])
def test_a_checkpoint_with_an_invalid_scale_is_refused_at_load(bad):
    model = make_net()
    opt = OPTIMIZERS["CoapAdamW"](model.parameters())
    train(model, opt, 2)
    saved = opt.state_dict()
    saved["param_groups"][0]["scale"] = bad
    fresh = OPTIMIZERS["CoapAdamW"](model.parameters())
    with pytest.raises(ValueError, match=r"group 0: .*scale"):
        fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["scale"] == OPTIMIZERS["CoapAdamW"](model.parameters()).defaults["scale"]
    assert not fresh.state
