"""The COAP objective (Eq. 2), its closed-form gradient, and the correlation-aware step."""

from __future__ import annotations

import pytest
import torch

from coap_torch.functional import (
    coap_objective,
    coap_objective_grad,
    correlation_aware_step,
    orthonormalize,
)

F64 = torch.float64

# (batch, m, n, r): tall (m > n), wide (m < n), square, r = 1, r = n, and batched inputs.
SHAPES = [
    ((), 40, 24, 6),
    ((), 24, 40, 6),
    ((), 16, 16, 5),
    ((), 12, 9, 1),
    ((), 10, 7, 7),
    ((3,), 20, 12, 4),
    ((2, 2), 9, 14, 3),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(batch, m, n, r, *, seed=0, orthonormal=True, dtype=F64):
    g = _gen(seed)
    # A gradient with decaying spectrum, so that P is not arbitrary relative to it.
    G = torch.randn((*batch, m, n), generator=g, dtype=F64)
    G = G * torch.linspace(1.0, 0.1, n, dtype=F64)
    P = torch.randn((*batch, n, r), generator=g, dtype=F64)
    if orthonormal:
        P = orthonormalize(P)
    M = torch.randn((*batch, m, r), generator=g, dtype=F64)
    return P.to(dtype), G.to(dtype), M.to(dtype)


def _autograd_grad(P, G, M):
    P = P.detach().clone().requires_grad_(True)
    value = coap_objective(P, G, M)
    (grad,) = torch.autograd.grad(value.sum(), P)
    return grad, value.detach()


def _mse(P, G):
    m, n = G.shape[-2], G.shape[-1]
    return (G @ P @ P.mT - G).square().sum(dim=(-2, -1)) / (m * n)


def _cos_sim(P, G, M):
    M_hat = M @ P.mT
    cos = (M_hat * G).sum(-1) / (torch.linalg.vector_norm(M_hat, dim=-1) * torch.linalg.vector_norm(G, dim=-1))
    return cos.mean(-1)


# --------------------------------------------------------------------------------------------
# coap_objective
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,m,n,r", SHAPES)
def test_objective_matches_literal_formula(batch, m, n, r):
    P, G, M = _inputs(batch, m, n, r, seed=1)
    expected = _mse(P, G) * (1 - _cos_sim(P, G, M))
    value = coap_objective(P, G, M)
    assert value.shape == G.shape[:-2]
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


def test_objective_is_zero_for_exact_reconstruction():
    # G lies in the span of P: G P P^T = G, so the MSE factor (and L) vanishes.
    P, _, M = _inputs((), 30, 20, 5, seed=2)
    G = torch.randn(30, 5, generator=_gen(3), dtype=F64) @ P.mT
    assert coap_objective(P, G, M).abs().item() < 1e-20


def test_objective_batched_equals_per_matrix():
    P, G, M = _inputs((4,), 18, 11, 3, seed=4)
    value = coap_objective(P, G, M)
    for b in range(4):
        torch.testing.assert_close(value[b], coap_objective(P[b], G[b], M[b]), rtol=1e-13, atol=0)


@pytest.mark.parametrize("batch,m,n,r", [((), 8, 6, 3), ((), 5, 9, 2), ((2,), 6, 5, 2)])
def test_objective_gradcheck(batch, m, n, r):
    P, G, M = _inputs(batch, m, n, r, seed=5, orthonormal=False)
    inputs = tuple(t.clone().requires_grad_(True) for t in (P, G, M))
    assert torch.autograd.gradcheck(coap_objective, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# coap_objective_grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("batch,m,n,r", SHAPES)
def test_closed_form_gradient_matches_autograd(batch, m, n, r, orthonormal):
    P, G, M = _inputs(batch, m, n, r, seed=6, orthonormal=orthonormal)
    grad, value = coap_objective_grad(P, G, M)
    ref_grad, ref_value = _autograd_grad(P, G, M)
    assert grad.shape == P.shape
    assert value.shape == G.shape[:-2]
    # With r = n and an orthonormal (square) P the MSE and the gradient vanish up to rounding, so the
    # absolute tolerance is set by the scale of the inputs, not by that of the gradient.
    scale = max(ref_grad.abs().max().item(), G.square().mean().item())
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-14)
    # The returned value is the objective itself.
    torch.testing.assert_close(value, coap_objective(P, G, M), rtol=1e-10, atol=1e-14)


def test_closed_form_gradient_matches_autograd_float32():
    P, G, M = _inputs((), 40, 24, 6, seed=7, dtype=torch.float32)
    grad, value = coap_objective_grad(P, G, M)
    ref_grad, ref_value = _autograd_grad(P.double(), G.double(), M.double())
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * ref_grad.abs().max().item())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=0)


@pytest.mark.parametrize("which", ["G", "M", "both"])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_zero_rows_give_finite_gradient_equal_to_autograd(which, orthonormal):
    P, G, M = _inputs((), 40, 24, 6, seed=8, orthonormal=orthonormal)
    if which in ("G", "both"):
        G[3] = 0.0
        G[17] = 0.0
    if which in ("M", "both"):
        M[5] = 0.0
        M[17] = 0.0
    grad, value = coap_objective_grad(P, G, M)
    ref_grad, ref_value = _autograd_grad(P, G, M)
    assert torch.isfinite(grad).all() and torch.isfinite(value).all()
    assert torch.isfinite(ref_grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11 * ref_grad.abs().max().item())
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-14)


def test_zero_rows_count_as_zero_cosine():
    # A zero row contributes cosine 0 but still counts in the mean over the m rows.
    P, G, M = _inputs((), 10, 8, 3, seed=9)
    M[0] = 0.0
    cos_rest = _cos_sim(P, G[1:], M[1:])
    expected = _mse(P, G) * (1 - cos_rest * 9 / 10)
    torch.testing.assert_close(coap_objective_grad(P, G, M)[1], expected, rtol=1e-10, atol=0)


def test_all_zero_moment_reduces_to_mse_gradient():
    # M = 0: every cosine is 0, L = MSE and the gradient is that of the MSE alone.
    P, G, _ = _inputs((), 30, 20, 4, seed=10)
    M = torch.zeros(30, 4, dtype=F64)
    grad, value = coap_objective_grad(P, G, M)
    Pr = P.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_mse(Pr, G), Pr)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(value, _mse(P, G), rtol=1e-10, atol=0)


@pytest.mark.parametrize("batch,m,n,r", [((), 40, 24, 6), ((), 24, 40, 6), ((3,), 20, 12, 4)])
def test_step_against_gradient_decreases_objective(batch, m, n, r):
    P, G, M = _inputs(batch, m, n, r, seed=11)
    grad, value = coap_objective_grad(P, G, M)
    norm = torch.linalg.vector_norm(grad, dim=(-2, -1), keepdim=True)
    lr = 1e-4 / norm  # a step of Frobenius norm 1e-4 per matrix
    after = coap_objective(P - lr * grad, G, M)
    assert (after < value).all()
    # First-order agreement: the decrease is ~ lr * ||grad||^2.
    predicted = lr.squeeze(-1).squeeze(-1) * norm.squeeze(-1).squeeze(-1) ** 2
    torch.testing.assert_close(value - after, predicted, rtol=1e-2, atol=0)
    # And a step along +grad increases it.
    assert (coap_objective(P + lr * grad, G, M) > value).all()


def test_paper_plus_sign_is_not_the_gradient():
    """Eq. 3 / Eq. 7 of the supplementary print grad_MSE * (1 - CosSim) + MSE * grad_CosSim.

    The objective is L = MSE * (1 - CosSim), so by the product rule
    dL/dP = grad_MSE * (1 - CosSim) - MSE * grad_CosSim: the CosSim term enters with a minus.
    The printed '+' variant is therefore not the gradient of the objective, and the closed form
    follows the objective (it equals autograd, the '+' variant does not).
    """
    P, G, M = _inputs((), 40, 24, 6, seed=12)
    # Make the moment strongly correlated with G so that the CosSim term is not negligible.
    M = M * 0.1 + G @ P
    Pm = P.clone().requires_grad_(True)
    mse = _mse(Pm, G)
    (grad_mse,) = torch.autograd.grad(mse, Pm)
    Pc = P.clone().requires_grad_(True)
    cos_sim = _cos_sim(Pc, G, M)
    (grad_cos,) = torch.autograd.grad(cos_sim, Pc)
    mse, cos_sim = mse.detach(), cos_sim.detach()

    ref_grad, _ = _autograd_grad(P, G, M)
    closed, _ = coap_objective_grad(P, G, M)
    minus_variant = grad_mse * (1 - cos_sim) - mse * grad_cos
    plus_variant = grad_mse * (1 - cos_sim) + mse * grad_cos

    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(minus_variant, ref_grad, rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(closed, ref_grad, rtol=1e-9, atol=1e-11 * scale)
    # The '+' variant differs from the true gradient by 2 * MSE * grad_CosSim, far beyond rounding.
    diff = (plus_variant - ref_grad).norm()
    torch.testing.assert_close(diff, (2 * mse * grad_cos).norm(), rtol=1e-8, atol=0)
    assert diff > 0.1 * ref_grad.norm()


# --------------------------------------------------------------------------------------------
# correlation_aware_step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,m,n,r", [((), 40, 24, 6), ((), 24, 40, 6), ((3,), 20, 12, 4)])
def test_step_is_gradient_descent(batch, m, n, r):
    P, G, M = _inputs(batch, m, n, r, seed=13)
    grad, _ = coap_objective_grad(P, G, M)
    for lr in (0.1, 0.5, 3.0):
        torch.testing.assert_close(correlation_aware_step(P, G, M, lr, max_norm=None), P - lr * grad, rtol=0, atol=0)


def test_default_step_reorthonormalizes_only_a_step_that_moved_p_from_orthonormal():
    P, G, M = _inputs((3,), 20, 12, 4, seed=13)
    grad, _ = coap_objective_grad(P, G, M)
    assert (torch.linalg.vector_norm(grad, dim=(-2, -1)) < 1).all()  # the clip is not what acts here
    eye = torch.eye(4, dtype=F64)
    for lr in (1e-3, 3.0):
        raw = P - lr * grad
        defect = (raw.mT @ raw - eye).abs().amax(dim=(-2, -1))
        out = correlation_aware_step(P, G, M, lr)
        for b in range(3):
            if defect[b] > 1e-3:
                torch.testing.assert_close(out[b], orthonormalize(raw[b]), rtol=1e-12, atol=1e-14)
            else:
                assert torch.equal(out[b], raw[b])
    assert ((P - 1e-3 * grad).mT @ (P - 1e-3 * grad) - eye).abs().max() < 1e-3  # small: left as printed
    assert ((P - 3.0 * grad).mT @ (P - 3.0 * grad) - eye).abs().max() > 1e-3  # large: retracted


def test_default_lr_is_point_one():
    P, G, M = _inputs((), 40, 24, 6, seed=14)
    torch.testing.assert_close(correlation_aware_step(P, G, M), correlation_aware_step(P, G, M, 0.1))


def test_zero_lr_is_identity():
    P, G, M = _inputs((2,), 20, 12, 4, seed=15, orthonormal=False)
    assert torch.equal(correlation_aware_step(P, G, M, 0.0, max_norm=None), P)
    # With normalize, lr = 0 only re-orthonormalizes (identity on orthonormal input).
    Q = orthonormalize(P)
    torch.testing.assert_close(correlation_aware_step(Q, G, M, 0.0, normalize=True), Q, rtol=0, atol=1e-13)


def test_does_not_modify_inputs():
    P, G, M = _inputs((), 20, 12, 4, seed=16)
    copies = [t.clone() for t in (P, G, M)]
    correlation_aware_step(P, G, M, 0.5, normalize=True, max_norm=0.01)
    for t, c in zip((P, G, M), copies):
        assert torch.equal(t, c)


def _clipped_reference(P, grad, lr, bound):
    """The clipped step written out: P - lr * bound * grad / ||grad||, then orthonormalized."""
    norm = torch.linalg.vector_norm(grad, dim=(-2, -1), keepdim=True)
    return orthonormalize(P - lr * bound * grad / norm)


def test_max_norm_clips_the_gradient_and_reorthonormalizes():
    P, G, M = _inputs((3,), 20, 12, 4, seed=17)
    grad, _ = coap_objective_grad(P, G, M)
    lr = 10.0
    max_norm = 0.5 * torch.linalg.vector_norm(grad, dim=(-2, -1)).min().item()
    out = correlation_aware_step(P, G, M, lr, max_norm=max_norm)
    torch.testing.assert_close(out, _clipped_reference(P, grad, lr, max_norm), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.mT @ out, torch.eye(4, dtype=F64).expand(3, 4, 4), rtol=0, atol=1e-13)
    # The clipped step (before the retraction) has norm lr * max_norm, in the gradient's direction.
    for b in range(3):
        step = P[b] - lr * max_norm * grad[b] / grad[b].norm()
        assert (step - P[b]).norm().item() == pytest.approx(lr * max_norm, rel=1e-12)


def test_max_norm_is_per_matrix_and_bitwise_inactive_below_the_bound():
    P, G, M = _inputs((3,), 20, 12, 4, seed=18)
    lr = 1e-3  # a small step: P stays orthonormal to 1e-3, so no retraction where not clipped
    grad, _ = coap_objective_grad(P, G, M)
    norms = torch.linalg.vector_norm(grad, dim=(-2, -1))
    # Above every gradient's norm: exactly the paper's step, bit for bit.
    big = 2 * norms.max().item()
    assert torch.equal(correlation_aware_step(P, G, M, lr, max_norm=big), P - lr * grad)
    assert torch.equal(correlation_aware_step(P, G, M, lr, max_norm=None), P - lr * grad)
    # A bound between the smallest and the largest norm clips only the matrices above it.
    order = norms.argsort()
    bound = 0.5 * (norms[order[0]] + norms[order[1]]).item()
    out = correlation_aware_step(P, G, M, lr, max_norm=bound)
    assert torch.equal(out[order[0]], P[order[0]] - lr * grad[order[0]])
    for b in order[1:]:
        torch.testing.assert_close(out[b], _clipped_reference(P[b], grad[b], lr, bound), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e8])
def test_default_step_is_safe_on_huge_gradients(scale):
    # A sum-reduced loss: the objective grows like |G|^2, the unclipped step moves P by far more
    # than its own size; the default clip keeps P orthonormal and moves it by at most lr.
    P, G, M = _inputs((), 40, 24, 6, seed=25)
    out = correlation_aware_step(P, G * scale, M)
    raw = correlation_aware_step(P, G * scale, M, max_norm=None)
    assert (raw - P).norm() > 10
    torch.testing.assert_close(out.mT @ out, torch.eye(6, dtype=F64), rtol=0, atol=1e-12)
    assert (out - P).norm() <= 0.1 * (1 + 1e-6) + 1e-2  # lr * max_norm, plus the retraction's second-order move


def test_default_step_at_realistic_scale_is_the_papers():
    # Mean-reduced gradients of RMS ~1e-3: far below the bound, so bitwise the printed step.
    P, G, M = _inputs((), 40, 24, 6, seed=26)
    G = G * 1e-3
    grad, _ = coap_objective_grad(P, G, M)
    assert torch.equal(correlation_aware_step(P, G, M), P - 0.1 * grad)


def test_max_norm_with_zero_gradient_is_finite():
    P, _, M = _inputs((), 12, 8, 3, seed=19)
    G = torch.zeros(12, 8, dtype=F64)
    out = correlation_aware_step(P, G, M, 0.1, max_norm=1e-3)
    assert torch.equal(out, P)
    out = correlation_aware_step(P, G, M, 0.1, normalize=True, max_norm=1e-3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, P, rtol=0, atol=1e-13)


@pytest.mark.parametrize("batch,m,n,r", [((), 40, 24, 6), ((), 24, 40, 6), ((3,), 20, 12, 4)])
def test_normalize_is_scale_invariant_and_orthonormal(batch, m, n, r):
    P, G, M = _inputs(batch, m, n, r, seed=20)
    lr = 0.5
    out = correlation_aware_step(P, G, M, lr, normalize=True)
    out_scaled = correlation_aware_step(P, G * 1e3, M, lr, normalize=True)
    out_small = correlation_aware_step(P, G * 1e-3, M, lr, normalize=True)
    torch.testing.assert_close(out_scaled, out, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out_small, out, rtol=1e-8, atol=1e-10)
    eye = torch.eye(r, dtype=F64).expand(*batch, r, r)
    torch.testing.assert_close(out.mT @ out, eye, rtol=0, atol=1e-12)
    # It actually moves P (the invariance is not a trivial no-op) ...
    assert (out - P).norm() > 1e-3
    # ... whereas the unnormalized step shrinks with the gradient's scale.
    raw_small = correlation_aware_step(P, G * 1e-3, M, lr)
    assert (raw_small - P).norm() < 1e-4 * (correlation_aware_step(P, G, M, lr) - P).norm()


def test_normalize_equals_orthonormalized_step_on_relative_objective():
    P, G, M = _inputs((), 40, 24, 6, seed=21)
    lr = 0.3
    grad, _ = coap_objective_grad(P, G, M)
    mean_sq = G.square().mean()
    expected = orthonormalize(P - lr * grad / mean_sq)
    torch.testing.assert_close(correlation_aware_step(P, G, M, lr, normalize=True), expected, rtol=1e-12, atol=1e-14)


def test_normalized_step_decreases_objective():
    P, G, M = _inputs((), 40, 24, 6, seed=22)
    value = coap_objective(P, G, M)
    out = correlation_aware_step(P, G, M, 1e-3, normalize=True)
    assert coap_objective(out, G, M) < value


@pytest.mark.parametrize("lr", [-1e-3, -0.1, -5.0])
def test_negative_lr_raises(lr):
    P, G, M = _inputs((), 10, 8, 3, seed=23)
    with pytest.raises(ValueError, match="lr"):
        correlation_aware_step(P, G, M, lr)


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_non_positive_max_norm_raises(max_norm):
    P, G, M = _inputs((), 10, 8, 3, seed=24)
    with pytest.raises(ValueError, match="max_norm"):
        correlation_aware_step(P, G, M, 0.1, max_norm=max_norm)


def test_tiny_moment_rows_do_not_overflow_in_float32():
    # A unit that stopped firing: its gradient row is 0 and its first-moment row decays towards
    # 1e-40, where ||M_hat_i||^2 underflows. The step must stay finite and equal the one computed
    # with that row exactly zero (both have cosine 0 and contribute nothing).
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(12, 8, generator=gen)
    P = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]
    M = torch.randn(12, 3, generator=gen)
    G[4] = 0.0
    for tiny in (1e-20, 1e-30, 1e-38, 1e-42):
        M_tiny, M_zero = M.clone(), M.clone()
        M_tiny[4], M_zero[4] = tiny, 0.0
        grad_tiny, value_tiny = coap_objective_grad(P, G, M_tiny)
        grad_zero, value_zero = coap_objective_grad(P, G, M_zero)
        assert torch.isfinite(grad_tiny).all() and torch.isfinite(value_tiny)
        torch.testing.assert_close(grad_tiny, grad_zero)
        torch.testing.assert_close(value_tiny, value_zero)


def test_tiny_but_live_moment_rows_keep_their_direction():
    # Scaling one row of M by 1e-30 leaves its cosine, and so the gradient, unchanged.
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(10, 7, generator=gen)
    P = torch.linalg.qr(torch.randn(7, 3, generator=gen))[0]
    M = torch.randn(10, 3, generator=gen)
    M_small = M.clone()
    M_small[2] *= 1e-30
    torch.testing.assert_close(
        coap_objective_grad(P, G, M_small)[0], coap_objective_grad(P, G, M)[0], rtol=1e-4, atol=1e-6
    )
