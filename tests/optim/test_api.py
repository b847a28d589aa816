"""The torch.optim.Optimizer contract: groups, schedulers, closures, hooks, zero_grad, dtypes, RNG."""

from __future__ import annotations

import warnings

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.optim import layout_of
from helpers.nets import batch, make_net, train
from helpers.optim_db import COAP_KWARGS, OPTIMIZERS


def test_project_page_call_works_and_routes_every_kind():
    model = make_net()
    opt = CoapAdamW(
        params=model.parameters(),
        lr=1e-3,
        rank_ratio_matrix=2,
        rank_ratio_cnn=2,
        update_interval=32,
        reproject_factor=5,
        min_conv_numel=0,
    )
    train(model, opt, 1)
    state = opt.state
    assert state[model.conv.weight]["proj_out"].shape == (16, 11)  # floor(16 / sqrt 2)
    assert state[model.conv.weight]["proj_in"].shape == (8, 5)
    assert state[model.conv.weight]["exp_avg"].shape == (11, 5, 3, 3)
    assert state[model.pointwise.weight]["proj"].shape == (12, 6)  # 1x1 kernel: a (16 -> 12) matrix
    assert state[model.fc1.weight]["proj"].shape == (40, 20)  # (40, 192): P on the smaller side
    assert state[model.fc1.weight]["exp_avg"].shape == (192, 20)
    assert state[model.fc2.weight]["proj"].shape == (40, 20)
    assert state[model.fc2.weight]["exp_avg"].shape == (48, 20)
    assert "proj" not in state[model.norm.weight] and state[model.norm.weight]["exp_avg"].shape == (48,)


def test_defaults():
    opt = CoapAdamW([torch.nn.Parameter(torch.zeros(4, 4))])
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 1e-2 and group["amsgrad"] is False
    assert group["update_interval"] == 32 and group["reproject_factor"] == 5
    assert group["rank"] is None and group["rank_ratio_matrix"] is None and group["rank_ratio_cnn"] is None


def test_rank_and_ratio_resolution():
    p = torch.nn.Parameter(torch.zeros(64, 48))
    assert layout_of(p, CoapAdamW([p], rank=7).param_groups[0]).ranks == (7,)
    assert layout_of(p, CoapAdamW([p], rank=7, rank_ratio_matrix=4).param_groups[0]).ranks == (12,)
    assert layout_of(p, CoapAdamW([p]).param_groups[0]).ranks == (24,)  # default ratio 2
    assert layout_of(p, CoapAdamW([p], rank=48).param_groups[0]).kind == "dense"  # smaller side <= rank
    stacked = torch.nn.Parameter(torch.zeros(3, 20, 30))  # MoE-style experts
    layout = layout_of(stacked, CoapAdamW([stacked], rank=4).param_groups[0])
    assert layout.kind == "matrix" and layout.factor_shapes() == [(3, 20, 4)]


def test_param_groups_are_kept_with_overrides_and_opt_out():
    model = make_net()
    groups = [
        {"params": [model.conv.weight, model.pointwise.weight], "rank_ratio_cnn": 4.0},
        {"params": [model.fc1.weight, model.fc2.weight], "rank": 8, "update_interval": 2},
        {"params": [model.head.weight], "coap": False},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias") or n.startswith("norm")]},
    ]
    opt = CoapAdamW(groups, **COAP_KWARGS)
    assert len(opt.param_groups) == 4
    for given, kept in zip(groups, opt.param_groups):
        assert kept["params"] == given["params"]
    assert opt.param_groups[1]["update_interval"] == 2 and opt.param_groups[0]["update_interval"] == 3
    train(model, opt, 2)
    assert opt.state[model.fc1.weight]["proj"].shape == (40, 8)
    assert opt.state[model.conv.weight]["proj_out"].shape == (16, 8)
    assert "proj" not in opt.state[model.head.weight]


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_add_param_group_validates_and_routes(make_opt):
    model = make_net()
    opt = make_opt([model.conv.weight])
    opt.add_param_group({"params": [model.fc2.weight], "rank": 5})
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [model.fc1.weight], "rank": 0})
    assert len(opt.param_groups) == 2  # the bad group was not kept
    train(model, opt, 1)
    assert opt.state[model.fc2.weight]["proj"].shape == (40, 5)


@pytest.mark.parametrize(
    "make_opt",
    [OPTIMIZERS["CoapAdamW"], lambda params: OPTIMIZERS["CoapAdafactor-beta1"](params, beta1=None)],
    ids=["CoapAdamW", "CoapAdafactor-manual-lr"],  # no first moment: lr 0 means no update at all
)
def test_lr_scheduler_drives_the_update(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2, start=1)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)  # lr 0: no update, no weight decay


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_closure_runs_with_grad_and_returns_loss(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_step_hooks_and_zero_grad(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, 1)
    assert calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_params_without_grad_are_skipped(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    model.head.weight.requires_grad_(False)
    before = model.head.weight.detach().clone()
    train(model, opt, 2)
    assert torch.equal(model.head.weight, before) and model.head.weight not in opt.state


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_determinism_and_global_rng_untouched(make_opt):
    def run():
        model = make_net()
        opt = make_opt(model.parameters())
        torch.manual_seed(42)
        rng_before = torch.get_rng_state()
        losses = train(model, opt, 7)
        assert torch.equal(torch.get_rng_state(), rng_before)  # step() never draws from it
        return losses, [p.detach().clone() for p in model.parameters()]

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_subspace_of_full_rank_gradient_does_not_depend_on_seed():
    u = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = u @ v  # exactly rank 5: the range finder recovers its row space from any sketch
    projections = []
    for seed in (0, 1):
        p = torch.nn.Parameter(torch.zeros(40, 30, dtype=torch.float64))
        opt = CoapAdamW([p], rank=5, seed=seed)
        p.grad = g.clone()
        opt.step()
        projections.append(opt.state[p]["proj"])
    P0, P1 = projections
    torch.testing.assert_close(P0 @ P0.T, P1 @ P1.T)  # different sketches, same subspace


def test_rank_deficient_first_gradient_warns_once():
    p = torch.nn.Parameter(torch.zeros(64, 32))
    opt = CoapAdamW([p], rank=16, update_interval=8, reproject_factor=3)
    u = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    p.grad = u @ v  # rank 3 < 16, like a batch of 3 samples
    with pytest.warns(RuntimeWarning, match="numerical rank 3 < rank 16") as record:
        opt.step()
    assert "until the first low-cost SVD, at its step 24 " in str(record[0].message)  # 8 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    P = opt.state[p]["proj"]
    torch.testing.assert_close(P.T @ P, torch.eye(16), atol=1e-5, rtol=0)


def test_converges_like_adamw_on_a_real_small_task():
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)

    def fit(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )
        opt = make_opt(model.parameters())
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(x), (128,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item()

    initial = torch.log(torch.tensor(10.0)).item()
    adamw = fit(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    coap = fit(lambda ps: CoapAdamW(ps, lr=3e-3, rank_ratio_matrix=2, update_interval=16, reproject_factor=5))
    assert adamw < 0.1 * initial
    assert coap < 0.15 * initial  # same order as AdamW at half the rank
    assert coap < 3 * adamw + 0.05


def test_stacked_matrices_get_one_projection_each():
    # MoE-style experts (E, m, n): each expert is projected by its own P.
    experts = torch.nn.Parameter(torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)))
    before = experts.detach().clone()
    opt = CoapAdamW([experts], lr=1e-2, weight_decay=0.0, rank=6, scale=1.0)
    experts.grad = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(1))
    opt.step()
    P = opt.state[experts]["proj"]
    assert P.shape == (3, 24, 6) and opt.state[experts]["exp_avg"].shape == (3, 40, 6)
    torch.testing.assert_close(P.mT @ P, torch.eye(6).expand(3, 6, 6), atol=1e-5, rtol=0)
    for e in range(3):  # first Adam step: direction g / (|g| + eps), restored through that expert's P
        g_proj = experts.grad[e] @ P[e]
        expected = before[e] - 1e-2 * (g_proj / (g_proj.abs() + 1e-8)) @ P[e].T
        torch.testing.assert_close(experts.detach()[e], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(P[0], P[1])


@pytest.mark.parametrize("normalize", [False, True])
def test_eq2_step_size_with_and_without_normalization(normalize):
    # Realistic gradient scale (1e-3): the faithful step barely moves P, the normalized one does,
    # and keeps P orthonormal.
    w = torch.nn.Parameter(torch.zeros(64, 48))
    opt = CoapAdamW([w], rank=8, update_interval=2, reproject_factor=100, correlation_normalize=normalize)
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(48, 48, generator=gen)
    for step in range(2):
        w.grad = 1e-3 * torch.randn(64, 48, generator=gen) @ basis
        before = opt.state[w]["proj"].clone() if step else None
        opt.step()
    P = opt.state[w]["proj"]
    change = ((P - before).norm() / before.norm()).item()
    if normalize:
        assert change > 1e-3
        torch.testing.assert_close(P.T @ P, torch.eye(8), atol=1e-5, rtol=0)
    else:
        assert 0 < change < 1e-6
