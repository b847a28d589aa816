"""Unprojected parameters are torch.optim.AdamW, bit for bit; projected ones follow a literal reference loop."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.functional import correlation_aware_step, low_cost_svd, tucker2_project, tucker2_restore, unfold
from coap_torch.functional.moments import rotate_first_moment, rotate_second_moment


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


def _reference_matrix_run(W, grads, *, lr, betas, eps, wd, rank, T_u, lam, eta, generator_seed):
    """A literal float64 transcription of COAP-AdamW for one matrix (m >= n), for comparison."""
    from coap_torch.optim._refresh import sketch_seed as _sketch_seed

    beta1, beta2 = betas
    W = W.clone()
    P = M = V = None
    for t, G in enumerate(grads, start=1):
        if t == 1:
            gen = torch.Generator().manual_seed(_sketch_seed(generator_seed, 0))
            P = low_cost_svd(G, rank, generator=gen)
            M = torch.zeros(G.shape[0], rank, dtype=G.dtype)
            V = torch.zeros_like(M)
        elif t % T_u == 0:
            P_new = low_cost_svd(G, rank, sketch=P) if t % (T_u * lam) == 0 else correlation_aware_step(P, G, M, eta)
            R = P.T @ P_new
            M, V, P = rotate_first_moment(M, R), rotate_second_moment(V, R), P_new
        R_t = G @ P
        M = beta1 * M + (1 - beta1) * R_t
        V = beta2 * V + (1 - beta2) * R_t * R_t
        m_hat = M / (1 - beta1**t)
        v_hat = V / (1 - beta2**t)
        W = W * (1 - lr * wd) - lr * (m_hat / (v_hat.sqrt() + eps)) @ P.T
    return W, P


@pytest.mark.parametrize("transpose", [False, True])
def test_projected_matrix_matches_reference_loop(transpose):
    m, n, rank, T_u, lam = 30, 20, 5, 3, 2  # 24 steps cross 4 Eq.2 steps and 4 SVD refreshes
    W0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = [g @ torch.diag(torch.linspace(3, 0.1, n, dtype=torch.float64)) for g in _grads((m, n), 24, torch.float64)]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "wd": 0.1, "rank": rank, "T_u": T_u, "lam": lam, "eta": 0.1, "generator_seed": 3}
    W_ref, P_ref = _reference_matrix_run(W0, grads, **kwargs)

    w = torch.nn.Parameter(W0.T.clone() if transpose else W0.clone())
    opt = CoapAdamW([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=rank,
                    update_interval=T_u, reproject_factor=lam, seed=3)
    for G in grads:
        w.grad = G.T.clone() if transpose else G.clone()
        opt.step()
    result = w.detach().T if transpose else w.detach()
    torch.testing.assert_close(result, W_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(opt.state[w]["proj"], P_ref, atol=1e-10, rtol=1e-10)


def test_projected_conv_matches_tucker_reference():
    shape, T_u, lam, ratio = (12, 10, 3, 3), 2, 2, 4.0
    r_o, r_i = 6, 5
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = _grads(shape, 10, torch.float64, seed=5)
    w = torch.nn.Parameter(W0.clone())
    opt = CoapAdamW([w], lr=1e-2, weight_decay=0.0, rank_ratio_cnn=ratio, update_interval=T_u,
                    reproject_factor=lam, min_conv_numel=0)
    P_O = P_I = None
    M = V = None
    W = W0.clone()
    from coap_torch.optim._refresh import sketch_seed as _sketch_seed

    for t, G in enumerate(grads, start=1):
        if t == 1:
            gen = torch.Generator().manual_seed(_sketch_seed(0, 0))
            P_O = low_cost_svd(unfold(G, 0).T, r_o, generator=gen)
            P_I = low_cost_svd(unfold(G, 1).T, r_i, generator=gen)
            M = torch.zeros(r_o, r_i, 3, 3, dtype=torch.float64)
            V = torch.zeros_like(M)
        elif t % T_u == 0:
            full_m = tucker2_restore(M, P_O, P_I)
            if t % (T_u * lam) == 0:
                new_O = low_cost_svd(unfold(G, 0).T, r_o, sketch=P_O)
                new_I = low_cost_svd(unfold(G, 1).T, r_i, sketch=P_I)
            else:
                # Mode-k moment: coordinates of the full moment's mode-k fibres in the basis P_k
                # (least squares, so no orthonormality is assumed).
                M_O = unfold(full_m, 0).T @ P_O @ (P_O.T @ P_O).inverse()
                M_I = unfold(full_m, 1).T @ P_I @ (P_I.T @ P_I).inverse()
                new_O = correlation_aware_step(P_O, unfold(G, 0).T, M_O)
                new_I = correlation_aware_step(P_I, unfold(G, 1).T, M_I)
            R_O, R_I = P_O.T @ new_O, P_I.T @ new_I
            M = torch.einsum("rskl,ra,sb->abkl", M, R_O, R_I)
            V = torch.einsum("rskl,ra,sb->abkl", V, R_O**2, R_I**2)
            P_O, P_I = new_O, new_I
        G_proj = tucker2_project(G, P_O, P_I)
        M = 0.9 * M + 0.1 * G_proj
        V = 0.999 * V + 0.001 * G_proj**2
        d = (M / (1 - 0.9**t)) / ((V / (1 - 0.999**t)).sqrt() + 1e-8)
        W = W - 1e-2 * tucker2_restore(d, P_O, P_I)
        w.grad = G.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), W, atol=1e-9, rtol=1e-9)
    assert opt.state[w]["exp_avg"].shape == (r_o, r_i, 3, 3)
