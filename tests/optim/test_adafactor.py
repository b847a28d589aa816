"""CoapAdafactor: transformers' Adafactor on dense parameters, Algorithm 1 on projected ones."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdafactor
from helpers.nets import make_net, train

transformers_optimization = pytest.importorskip("transformers.optimization")

DENSE_CONFIGS = [
    {},
    {"beta1": 0.9},
    {"scale_parameter": False},
    {"warmup_init": True, "weight_decay": 0.01},
    {"lr": 1e-2, "relative_step": False},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
    {"lr": 3e-3, "relative_step": False, "beta1": 0.8, "weight_decay": 0.1, "clip_threshold": 0.5, "decay_rate": -0.5},
]


@pytest.mark.parametrize("config", DENSE_CONFIGS, ids=[str(c) or "defaults" for c in DENSE_CONFIGS])
def test_unprojected_params_follow_transformers_adafactor(config):
    shapes = [(9,), (6, 5), (4, 4, 3, 3), (20, 16)]  # 1-D, small matrix, small kernel, opted-out matrix
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours = [p.clone().requires_grad_(True) for p in init]
    ref = [p.clone().requires_grad_(True) for p in init]
    opt = CoapAdafactor([{"params": ours[:3]}, {"params": ours[3:], "coap": False}], rank=8, **config)
    opt_ref = transformers_optimization.Adafactor(ref, **config)
    for step in range(100):
        for i, (p, q) in enumerate(zip(ours, ref)):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert not any(k.startswith("proj") for s in opt.state.values() for k in s)


def test_beta1_none_keeps_no_first_moment_across_refreshes():
    model = make_net()
    opt = CoapAdafactor(
        model.parameters(),
        rank_ratio_matrix=2,
        rank_ratio_cnn=2,
        update_interval=2,
        reproject_factor=3,
        min_conv_numel=0,
    )
    proj_history = []
    for step in range(13):  # Eq. 2 steps at 2, 4, 8, 10; SVD refreshes at 6 and 12
        train(model, opt, 1, start=step)
        proj_history.append(opt.state[model.fc2.weight]["proj"].clone())
    assert all("exp_avg" not in s for s in opt.state.values())
    assert not torch.equal(proj_history[0], proj_history[1])  # step 2 refreshed P
    assert torch.equal(proj_history[1], proj_history[2])  # step 3 did not
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_projected_state_shapes_and_memory():
    model = make_net()
    opt = CoapAdafactor(model.parameters(), beta1=0.9, rank_ratio_matrix=2, min_conv_numel=0)
    train(model, opt, 1)
    fc1 = opt.state[model.fc1.weight]  # (40, 192): canonical (192, 40), r = 20
    assert fc1["proj"].shape == (40, 20) and fc1["exp_avg"].shape == (192, 20)
    assert fc1["exp_avg_sq_row"].shape == (192,) and fc1["exp_avg_sq_col"].shape == (20,)
    conv = opt.state[model.conv.weight]  # (16, 8, 3, 3) at ratio 2: core (11, 5, 3, 3)
    assert conv["exp_avg"].shape == (11, 5, 3, 3)
    assert conv["exp_avg_sq_row"].shape == (11, 5, 3) and conv["exp_avg_sq_col"].shape == (11, 5, 3)


def test_defaults_match_transformers():
    import inspect

    ours = inspect.signature(CoapAdafactor.__init__).parameters
    theirs = inspect.signature(transformers_optimization.Adafactor.__init__).parameters
    for name in (
        "lr",
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "scale_parameter",
        "warmup_init",
    ):
        assert ours[name].default == theirs[name].default, name
    # relative_step=None means "exactly when no lr is given": transformers' True at its default lr=None.
    assert theirs["relative_step"].default is True and theirs["lr"].default is None
    assert ours["relative_step"].default is None
