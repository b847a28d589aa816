"""8-bit variants: state layout, and dequantized state that tracks the 32-bit optimizer's."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_torch.functional.quantization import dequantize_blockwise
from helpers.nets import make_net, train

PAIRS = {
    "adamw": (CoapAdamW, CoapAdamW8bit, {"lr": 3e-3}),
    "adafactor": (CoapAdafactor, CoapAdafactor8bit, {"beta1": 0.9}),
}
# scale 1.0: the weights' tolerance below is in units of the unscaled update.
COMMON = {
    "rank_ratio_matrix": 2,
    "rank_ratio_cnn": 2,
    "update_interval": 3,
    "reproject_factor": 2,
    "min_conv_numel": 0,
    "scale": 1.0,
}


def _dequantized(state, key, signed, block_size=256):
    values = dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], signed=signed, block_size=block_size)
    return values if signed else values.square()  # second moments are stored as square roots


@pytest.mark.parametrize("name", PAIRS)
def test_state_layout(name):
    _, eight_bit, kwargs = PAIRS[name]
    model = make_net()
    others = [p for p in model.parameters() if p is not model.head.weight]
    opt = eight_bit(
        [{"params": others}, {"params": [model.head.weight], "coap": False}], min_8bit_size=256, **COMMON, **kwargs
    )
    train(model, opt, 1)
    fc1 = opt.state[model.fc1.weight]  # projected moments (192, 20): 3840 entries, 15 blocks
    assert fc1["exp_avg_codes"].dtype == torch.uint8 and fc1["exp_avg_codes"].shape == (192, 20)
    assert fc1["exp_avg_absmax"].dtype == torch.float32 and fc1["exp_avg_absmax"].shape == (15,)
    assert fc1["proj"].dtype == torch.float32
    assert "exp_avg" not in fc1
    bias = opt.state[model.fc1.bias]  # 40 entries < min_8bit_size: float32
    assert bias["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in bias
    head = opt.state[model.head.weight]  # dense (10, 48) = 480 entries >= 256: quantized dense moments
    assert head["exp_avg_codes"].shape == (10, 48)


@pytest.mark.parametrize("refreshes", [False, True], ids=["fixed-basis", "refreshes"])
@pytest.mark.parametrize("name", PAIRS)
def test_dequantized_state_tracks_the_32bit_optimizer(name, refreshes):
    # Both runs see the same gradients (computed on the 32-bit model) so only the storage differs.
    # Without refreshes both keep the P of the first SVD (same gradient, same sketch), so the
    # moments differ by quantization alone. Refreshes (Eq. 2 steps at 3, 9; SVDs at 6, 12) read the
    # first moment, so the two bases drift apart where the gradient's singular values are close:
    # there the moments are compared in direction, and the weights absolutely.
    full, eight_bit, kwargs = PAIRS[name]
    options = {**COMMON, **kwargs} if refreshes else {**COMMON, **kwargs, "update_interval": 100}
    model = make_net()
    params32 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    params8 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt32 = full(params32, **options)
    opt8 = eight_bit(params8, min_8bit_size=256, **options)
    names = [n for n, _ in model.named_parameters()]
    for step in range(13):
        with torch.no_grad():
            for p, q in zip(model.parameters(), params32):
                p.copy_(q)
        train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, start=step)
        for p, a, b in zip(model.parameters(), params32, params8):
            a.grad, b.grad = p.grad.clone(), p.grad.clone()
        opt32.step()
        opt8.step()
    from coap_torch.optim import layout_of

    compared = 0
    for name_, a, b in zip(names, params32, params8):
        s32, s8 = opt32.state[a], opt8.state[b]
        layout = layout_of(a, opt32.param_groups[0])
        if "exp_avg_codes" in s8:
            compared += 1
            m32, m8 = s32["exp_avg"], _dequantized(s8, "exp_avg", signed=True)
            if not refreshes:
                for key in layout.factor_keys:
                    torch.testing.assert_close(s8[key], s32[key], atol=0, rtol=0)
                # Within the code map's resolution, plus the drift of 13 re-quantized steps.
                assert (m8 - m32).abs().max() <= 0.05 * m32.abs().max(), name_
            if layout.projected:  # compare the full-space moments
                m32 = layout.restore(m32, [s32[k] for k in layout.factor_keys])
                m8 = layout.restore(m8, [s8[k] for k in layout.factor_keys])
            cosine = torch.nn.functional.cosine_similarity(m8.flatten(), m32.flatten(), dim=0)
            assert cosine > (0.99 if refreshes else 0.999), name_
        for key in layout.factor_keys:  # nearly the same subspace: mean squared cosine of the principal angles
            P32, P8 = s32[key], s8[key]
            assert (P8.mT @ P32).square().sum() / P32.shape[-1] > 0.9, (name_, key)
        assert torch.allclose(a, b, atol=5e-3), name_
    assert compared >= 3


def test_second_moment_uses_the_unsigned_map():
    model = make_net()
    opt = CoapAdamW8bit(model.parameters(), min_8bit_size=256, **COMMON, lr=1e-3)
    train(model, opt, 3)
    state = opt.state[model.fc1.weight]
    v = _dequantized(state, "exp_avg_sq", signed=False)
    assert (v >= 0).all()
    # Decoding the same codes with the signed map gives different (wrong) values: the map matters.
    assert not torch.allclose(v, _dequantized(state, "exp_avg_sq", signed=True))


def test_block_size_is_a_group_option():
    model = make_net()
    opt = CoapAdamW8bit(
        [{"params": [model.fc1.weight], "block_size": 64}, {"params": [model.fc2.weight]}], min_8bit_size=256, **COMMON
    )
    train(model, opt, 1)
    assert opt.state[model.fc1.weight]["exp_avg_absmax"].shape == (192 * 20 // 64,)
    assert opt.state[model.fc2.weight]["exp_avg_absmax"].shape == (-(-48 * 20 // 256),)
