"""Unprojected parameters are torch.optim.AdamW, bit for bit (projected ones: tests/optim/test_reference_parity.py)."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW


def _grads(shape, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.1, "lr": 1e-2},
        {"amsgrad": True},
        {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6},
        {"weight_decay": 0.0, "betas": (0.0, 0.5)},
    ],
)
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_dense_params_are_torch_adamw_bitwise(dtype, kwargs, foreach):
    # 1-D, matrices whose smaller side <= rank, and one above the bulk-update size (stepped alone).
    shapes = [(7,), (5, 3), (4, 4), (300, 240)]
    ours = [torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ref = [p.clone() for p in ours]
    for p in ours + ref:
        p.requires_grad_(True)
    opt = CoapAdamW([{"params": ours[:3]}, {"params": ours[3:], "coap": False}], rank=8, **kwargs)
    opt_ref = torch.optim.AdamW(ref, foreach=foreach, **kwargs)
    for step in range(40):
        for i, (p, q) in enumerate(zip(ours, ref)):
            g = torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(100 * step + i))
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), step
    for p, q in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in opt_ref.state[q]:
                assert torch.equal(opt.state[p][key], opt_ref.state[q][key]), key
    assert all("proj" not in opt.state[p] for p in ours)


def test_opted_out_group_matches_adamw_for_large_matrix():
    w = torch.randn(32, 24, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_(True)
    opt = CoapAdamW([{"params": [w], "coap": False}], lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.05, foreach=False)
    for g in _grads((32, 24), 25, torch.float32):
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(w, w_ref)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}
