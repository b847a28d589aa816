"""Adam's moment rule and the rotation of low-rank moments to a new basis."""

from __future__ import annotations

import math

import pytest
import torch

from coap_torch.functional import adam_direction_, orthonormalize, rotate_first_moment, rotate_second_moment

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(shape, steps, seed, dtype=F64, decay=1.0):
    g = _gen(seed)
    return [decay**t * torch.randn(shape, generator=g, dtype=dtype) for t in range(steps)]


# --------------------------------------------------------------------------------------------
# adam_direction_
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.8, 0.99), 1e-3), ((0.0, 0.5), 1e-6)])
def test_adam_direction_matches_torch_adamw(betas, eps, amsgrad):
    shape = (5, 3)
    beta1, beta2 = betas
    # Decaying gradients make v_t decrease, so AMSGrad's running maximum matters.
    grads = _grads(shape, 8, seed=1, decay=0.5)
    p = torch.randn(shape, generator=_gen(2), dtype=F64).requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=1.0, betas=betas, eps=eps, weight_decay=0.0, amsgrad=amsgrad, foreach=False)

    exp_avg = torch.zeros(shape, dtype=F64)
    exp_avg_sq = torch.zeros(shape, dtype=F64)
    max_sq = torch.zeros(shape, dtype=F64) if amsgrad else None
    ours = p.detach().clone()
    for step, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        opt.step()
        d = adam_direction_(
            exp_avg, exp_avg_sq, grad, step=step, beta1=beta1, beta2=beta2, eps=eps, max_exp_avg_sq=max_sq
        )
        ours = ours - d  # lr = 1, weight decay 0
        torch.testing.assert_close(ours, p.detach(), rtol=1e-12, atol=1e-12)
        state = opt.state[p]
        # The moments are updated by the same operations: bit-identical.
        assert torch.equal(exp_avg, state["exp_avg"])
        assert torch.equal(exp_avg_sq, state["exp_avg_sq"])
        if amsgrad:
            assert torch.equal(max_sq, state["max_exp_avg_sq"])
    if amsgrad:
        # The running maximum actually differs from the last v_t (the test exercises AMSGrad).
        assert (max_sq > exp_avg_sq).any()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_direction_matches_written_formula(amsgrad):
    shape = (4, 6)
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    grads = _grads(shape, 6, seed=3, decay=0.3)
    exp_avg = torch.zeros(shape, dtype=F64)
    exp_avg_sq = torch.zeros(shape, dtype=F64)
    max_sq = torch.zeros(shape, dtype=F64) if amsgrad else None
    m_ref = torch.zeros(shape, dtype=F64)
    v_ref = torch.zeros(shape, dtype=F64)
    v_max = torch.zeros(shape, dtype=F64)
    for t, g in enumerate(grads, start=1):
        d = adam_direction_(exp_avg, exp_avg_sq, g, step=t, beta1=beta1, beta2=beta2, eps=eps, max_exp_avg_sq=max_sq)
        m_ref = beta1 * m_ref + (1 - beta1) * g
        v_ref = beta2 * v_ref + (1 - beta2) * g * g
        v_max = torch.maximum(v_max, v_ref)
        v = v_max if amsgrad else v_ref
        expected = (m_ref / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(exp_avg, m_ref, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(exp_avg_sq, v_ref, rtol=1e-13, atol=1e-15)
        if amsgrad:
            torch.testing.assert_close(max_sq, v_max, rtol=1e-13, atol=1e-15)


def test_adam_direction_first_step_is_sign_like():
    # At t = 1 the bias-corrected direction is g / (|g| + eps): about sign(g).
    g = torch.randn(10, 4, generator=_gen(4), dtype=F64)
    d = adam_direction_(torch.zeros_like(g), torch.zeros_like(g), g, step=1, beta1=0.9, beta2=0.999, eps=1e-12)
    torch.testing.assert_close(d, g / (g.abs() + 1e-12), rtol=1e-12, atol=1e-12)


def test_adam_direction_updates_in_place_and_leaves_grad_alone():
    g = torch.randn(6, 3, generator=_gen(5), dtype=F64)
    g_copy = g.clone()
    exp_avg = torch.randn(6, 3, generator=_gen(6), dtype=F64)
    exp_avg_sq = torch.rand(6, 3, generator=_gen(7), dtype=F64)
    max_sq = exp_avg_sq.clone() * 2
    ids = (exp_avg.data_ptr(), exp_avg_sq.data_ptr(), max_sq.data_ptr())
    before = (exp_avg.clone(), exp_avg_sq.clone(), max_sq.clone())
    d = adam_direction_(exp_avg, exp_avg_sq, g, step=3, beta1=0.9, beta2=0.999, eps=1e-8, max_exp_avg_sq=max_sq)
    assert (exp_avg.data_ptr(), exp_avg_sq.data_ptr(), max_sq.data_ptr()) == ids
    assert not torch.equal(exp_avg, before[0]) and not torch.equal(exp_avg_sq, before[1])
    torch.testing.assert_close(max_sq, torch.maximum(before[2], exp_avg_sq), rtol=0, atol=0)
    assert torch.equal(g, g_copy)
    # The returned direction is a new tensor, not one of the states.
    assert d.data_ptr() not in ids
    # Changing it does not change the moments.
    snapshot = exp_avg.clone()
    d.zero_()
    assert torch.equal(exp_avg, snapshot)


def test_adam_direction_float32_matches_torch_adamw():
    shape = (7, 5)
    grads = _grads(shape, 5, seed=8, dtype=torch.float32)
    p = torch.randn(shape, generator=_gen(9)).requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    ours = p.detach().clone()
    for step, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        opt.step()
        ours -= adam_direction_(exp_avg, exp_avg_sq, grad, step=step, beta1=0.9, beta2=0.999, eps=1e-8)
        torch.testing.assert_close(ours, p.detach(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# rotate_first_moment
# --------------------------------------------------------------------------------------------


def _basis(n, r, seed):
    return orthonormalize(torch.randn(n, r, generator=_gen(seed), dtype=F64))


def test_rotate_first_moment_equals_change_of_basis():
    m, n, r = 40, 24, 6
    P_old, P_new = _basis(n, r, 10), _basis(n, r, 11)
    M = torch.randn(m, r, generator=_gen(12), dtype=F64)
    R = P_old.mT @ P_new
    rotated = rotate_first_moment(M, R)
    assert rotated.shape == (m, r)
    torch.testing.assert_close(rotated, M @ P_old.mT @ P_new, rtol=1e-12, atol=1e-12)
    # It is the orthogonal projection of the full-space moment M P_old^T on span(P_new).
    full = M @ P_old.mT
    torch.testing.assert_close(rotated @ P_new.mT, full @ P_new @ P_new.mT, rtol=1e-12, atol=1e-12)


def test_rotate_first_moment_same_subspace_preserves_full_moment():
    # P_new spans the same subspace as P_old (another basis): nothing is lost.
    m, n, r = 30, 20, 5
    P_old = _basis(n, r, 13)
    P_new = P_old @ _basis(r, r, 14)
    M = torch.randn(m, r, generator=_gen(15), dtype=F64)
    rotated = rotate_first_moment(M, P_old.mT @ P_new)
    torch.testing.assert_close(rotated @ P_new.mT, M @ P_old.mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rotated.norm(), M.norm(), rtol=1e-12, atol=0)


def test_rotate_first_moment_identity():
    M = torch.randn(3, 12, 4, generator=_gen(16), dtype=F64)
    assert torch.equal(rotate_first_moment(M, torch.eye(4, dtype=F64)), M)
    P = _basis(20, 4, 17)
    torch.testing.assert_close(rotate_first_moment(M, P.mT @ P), M, rtol=0, atol=1e-14)


def test_rotate_first_moment_batched():
    B, m, n, r = 3, 12, 10, 4
    P_old = orthonormalize(torch.randn(B, n, r, generator=_gen(18), dtype=F64))
    P_new = orthonormalize(torch.randn(B, n, r, generator=_gen(19), dtype=F64))
    M = torch.randn(B, m, r, generator=_gen(20), dtype=F64)
    rotated = rotate_first_moment(M, P_old.mT @ P_new)
    for b in range(B):
        torch.testing.assert_close(rotated[b], M[b] @ P_old[b].mT @ P_new[b], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# rotate_second_moment
# --------------------------------------------------------------------------------------------


def test_rotate_second_moment_is_non_negative():
    V = torch.rand(40, 6, generator=_gen(21), dtype=F64)
    V[0] = 0.0
    for R in (
        _basis(24, 6, 22).mT @ _basis(24, 6, 23),  # a typical R = P_old^T P_new
        torch.randn(6, 6, generator=_gen(24), dtype=F64),  # any real matrix
        -torch.eye(6, dtype=F64),
    ):
        out = rotate_second_moment(V, R)
        assert out.shape == V.shape
        assert (out >= 0).all()
    R = torch.randn(6, 6, generator=_gen(25), dtype=F64)
    assert torch.equal(rotate_second_moment(V, R)[0], torch.zeros(6, dtype=F64))


def test_rotate_second_moment_identity():
    V = torch.rand(2, 10, 5, generator=_gen(26), dtype=F64)
    assert torch.equal(rotate_second_moment(V, torch.eye(5, dtype=F64)), V)
    assert torch.equal(rotate_second_moment(V, -torch.eye(5, dtype=F64)), V)


def test_rotate_second_moment_signed_permutation_permutes_columns():
    r = 6
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    # New coordinate k is signs[k] * old coordinate perm[k]: R[perm[k], k] = signs[k].
    R = torch.zeros(r, r, dtype=F64)
    R[perm, torch.arange(r)] = signs
    V = torch.rand(12, r, generator=_gen(27), dtype=F64)
    torch.testing.assert_close(rotate_second_moment(V, R), V[:, perm], rtol=0, atol=0)
    # The first moment is permuted and signed in the same way.
    M = torch.randn(12, r, generator=_gen(28), dtype=F64)
    torch.testing.assert_close(rotate_first_moment(M, R), M[:, perm] * signs, rtol=0, atol=0)
    # Realized as a change of basis: P_new = P_old R.
    P_old = _basis(20, r, 29)
    P_new = P_old @ R
    torch.testing.assert_close(P_old.mT @ P_new, R, rtol=0, atol=1e-14)


def test_rotate_second_moment_is_variance_of_uncorrelated_coordinates():
    # For independent coordinates with variances v, y = x R has Var(y_k) = sum_j R_jk^2 v_j,
    # the diagonal of R^T diag(v) R.
    v = torch.rand(6, generator=_gen(30), dtype=F64)
    R = _basis(24, 6, 31).mT @ _basis(24, 6, 32)
    expected = torch.diagonal(R.mT @ torch.diag(v) @ R)
    torch.testing.assert_close(rotate_second_moment(v.unsqueeze(0), R)[0], expected, rtol=1e-12, atol=1e-14)


def test_rotate_second_moment_orthogonal_rotation_preserves_total():
    # A square orthogonal R has unit rows, so each row sum of V is preserved.
    V = torch.rand(3, 8, 5, generator=_gen(33), dtype=F64)
    R = _basis(5, 5, 34)
    out = rotate_second_moment(V, R)
    torch.testing.assert_close(out.sum(-1), V.sum(-1), rtol=1e-12, atol=1e-14)
    # Not the identity in general.
    assert (out - V).abs().max() > 1e-3
