"""The low-cost SVD (randomized range finder), its sketch, and orthonormalize."""

from __future__ import annotations

import itertools

import pytest
import torch

from coap_torch.functional import DEFAULT_SKETCH_SEED, gaussian_sketch, low_cost_svd, orthonormalize
from coap_torch.functional.subspace import low_cost_svd_with_values

F32, F64 = torch.float32, torch.float64
ORTHO_TOL = {F32: 1e-5, F64: 1e-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(shape, seed, dtype=F64):
    return orthonormalize(torch.randn(shape, generator=_gen(seed), dtype=F64)).to(dtype)


def _planted(m, n, k, seed, dtype=F64, batch=()):
    """A rank-k matrix U diag(s) V^T with known right factor V (n, k) and well separated s."""
    U = _orthonormal((*batch, m, k), seed)
    V = _orthonormal((*batch, n, k), seed + 1000)
    s = torch.linspace(10.0, 1.0, k, dtype=F64)
    G = (U * s) @ V.mT
    return G.to(dtype), V.to(dtype), s


def _assert_orthonormal(P, tol):
    r = P.shape[-1]
    eye = torch.eye(r, dtype=P.dtype).expand(*P.shape[:-2], r, r)
    err = (P.mT @ P - eye).abs().max().item()
    assert err < tol, err


def _projector(P):
    return P @ P.mT


def _cos_principal_angles(A, B):
    """Cosines of the principal angles between span(A) and span(B) (both orthonormal)."""
    return torch.linalg.svdvals(A.mT @ B)


# --------------------------------------------------------------------------------------------
# gaussian_sketch
# --------------------------------------------------------------------------------------------


def test_gaussian_sketch_default_seed_and_dtype():
    s = gaussian_sketch((24, 6))
    assert s.shape == (24, 6) and s.dtype == F32
    ref = torch.randn((24, 6), generator=torch.Generator().manual_seed(DEFAULT_SKETCH_SEED), dtype=F64)
    assert torch.equal(s, ref.to(F32))
    s64 = gaussian_sketch((24, 6), dtype=F64)
    assert torch.equal(s64, ref)
    # The float32 sketch is the rounded float64 draw: same random numbers for every dtype.
    assert torch.equal(s, s64.to(F32))


def test_gaussian_sketch_generator_and_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = gaussian_sketch((3, 24, 6), generator=_gen(5))
    b = gaussian_sketch((3, 24, 6), generator=_gen(5))
    c = gaussian_sketch((3, 24, 6), generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------
# orthonormalize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", [(24, 6), (6, 6), (24, 1), (3, 20, 5)])
def test_orthonormalize_gives_orthonormal_columns_with_same_span(shape, dtype):
    A = torch.randn(shape, generator=_gen(1), dtype=F64).to(dtype)
    Q = orthonormalize(A)
    assert Q.shape == A.shape and Q.dtype == dtype
    _assert_orthonormal(Q, ORTHO_TOL[dtype])
    # Same column space: projecting A on span(Q) leaves it unchanged.
    torch.testing.assert_close(_projector(Q) @ A, A, rtol=0, atol=50 * torch.finfo(dtype).eps * A.abs().max())


@pytest.mark.parametrize("shape", [(24, 6), (3, 20, 5)])
def test_orthonormalize_r_factor_has_positive_diagonal(shape):
    A = torch.randn(shape, generator=_gen(2), dtype=F64)
    Q = orthonormalize(A)
    R = Q.mT @ A  # A = Q R
    torch.testing.assert_close(Q @ R, A, rtol=0, atol=1e-12)
    # R is upper triangular with a positive diagonal (the Gram-Schmidt factor).
    torch.testing.assert_close(torch.tril(R, diagonal=-1), torch.zeros_like(R), rtol=0, atol=1e-12)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    # Hence the first column of Q is the normalized first column of A (Gram-Schmidt order).
    a0 = A[..., :, 0]
    torch.testing.assert_close(Q[..., :, 0], a0 / a0.norm(dim=-1, keepdim=True), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_orthonormalize_is_identity_on_orthonormal_input(dtype):
    for seed, shape in enumerate([(24, 6), (6, 6), (4, 30, 3)]):
        P = _orthonormal(shape, seed + 10, dtype)
        torch.testing.assert_close(orthonormalize(P), P, rtol=0, atol=10 * torch.finfo(dtype).eps)
    # Also for orthonormal matrices with "negative" orientation (columns of -I, permutations).
    E = -torch.eye(8, dtype=dtype)[:, [3, 0, 5]]
    torch.testing.assert_close(orthonormalize(E), E, rtol=0, atol=0)


def test_orthonormalize_is_continuous():
    P = _orthonormal((24, 6), 20)
    for scale in (1e-4, 1e-6, 1e-8):
        delta = scale * torch.randn(24, 6, generator=_gen(21), dtype=F64)
        moved = orthonormalize(P + delta)
        # Moves by O(|delta|), not by a sign flip of some column.
        assert (moved - P).abs().max() < 10 * scale


def test_orthonormalize_handles_zero_column():
    A = torch.randn(10, 4, generator=_gen(22), dtype=F64)
    A[:, 2] = 0.0
    Q = orthonormalize(A)
    assert torch.isfinite(Q).all()
    _assert_orthonormal(Q, 1e-10)


# --------------------------------------------------------------------------------------------
# low_cost_svd: orthonormality, exact and approximate recovery
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape,rank", [((40, 24), 6), ((24, 40), 6), ((40, 24), 1), ((40, 24), 24), ((3, 20, 12), 4)])
def test_low_cost_svd_orthonormal_columns(shape, rank, dtype):
    G = torch.randn(shape, generator=_gen(30), dtype=F64).to(dtype)
    P = low_cost_svd(G, rank)
    assert P.shape == (*shape[:-2], shape[-1], rank)
    assert P.dtype == dtype and P.device == G.device
    _assert_orthonormal(P, ORTHO_TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)])
def test_low_cost_svd_recovers_planted_subspace_exactly(m, n, dtype):
    r = 6
    G, V, s = _planted(m, n, r, seed=31, dtype=dtype)
    P, S = low_cost_svd_with_values(G, r)
    tol = {F32: 1e-5, F64: 1e-12}[dtype]
    assert (_projector(P) - _projector(V)).abs().max() < tol
    cos = _cos_principal_angles(V, P)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=tol)
    # The estimated singular values are the planted ones (and P its singular vectors: G P P^T = G).
    torch.testing.assert_close(S, s.to(dtype), rtol=tol, atol=0)
    torch.testing.assert_close(G @ P @ P.mT, G, rtol=0, atol=tol * 10)


def test_low_cost_svd_recovers_right_singular_vectors_individually():
    G, V, _ = _planted(40, 24, 6, seed=32)
    P = low_cost_svd(G, 6)
    # Distinct singular values: each column equals the matching singular vector up to sign.
    cos = (P * V).sum(0).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)


def test_low_cost_svd_approximate_recovery_with_decay_and_noise():
    m, n, r = 40, 24, 6
    g = _gen(33)
    U = _orthonormal((m, n), 34)
    V = _orthonormal((n, n), 35)
    s = torch.cat([torch.linspace(20.0, 10.0, r, dtype=F64), 0.3 * 0.8 ** torch.arange(n - r, dtype=F64)])
    G = (U * s) @ V.mT + 1e-3 * torch.randn(m, n, generator=g, dtype=F64)
    P = low_cost_svd(G, r)
    Vr = torch.linalg.svd(G, full_matrices=False)[2][:r].mT
    cos = _cos_principal_angles(Vr, P)
    # sin of the largest principal angle is small (gap 10 vs 0.3).
    sin_max = (1 - cos.min() ** 2).clamp_min(0).sqrt()
    assert sin_max < 0.05, sin_max
    # The captured energy is close to the optimum of the truncated SVD.
    captured, optimal = (G @ P).norm(), (G @ Vr).norm()
    assert captured <= optimal * (1 + 1e-12)
    assert captured > 0.999 * optimal


def test_low_cost_svd_warm_start_with_true_subspace_is_fixed_point():
    m, n, r = 40, 24, 6
    # Full-rank G with a gap after r: the top-r subspace is well defined.
    U = _orthonormal((m, n), 36)
    V = _orthonormal((n, n), 37)
    s = torch.cat([torch.linspace(10.0, 5.0, r, dtype=F64), torch.linspace(1.0, 0.1, n - r, dtype=F64)])
    G = (U * s) @ V.mT
    Vr = V[:, :r]
    # The sketch is the true subspace in another basis: the result is the same subspace.
    sketch = Vr @ _orthonormal((r, r), 38)
    P = low_cost_svd(G, r, sketch)
    assert (_projector(P) - _projector(Vr)).abs().max() < 1e-12
    # Warm-starting from the result reproduces it up to column signs.
    P2 = low_cost_svd(G, r, P)
    torch.testing.assert_close((P2 * P).sum(0).abs(), torch.ones(r, dtype=F64), rtol=0, atol=1e-12)


def test_low_cost_svd_warm_start_converges_by_subspace_iteration():
    # Each warm-started call is one step of subspace iteration, so repeated calls converge.
    m, n, r = 40, 24, 6
    U = _orthonormal((m, n), 39)
    V = _orthonormal((n, n), 40)
    s = torch.cat([torch.linspace(10.0, 6.0, r, dtype=F64), torch.linspace(3.0, 0.1, n - r, dtype=F64)])
    G = (U * s) @ V.mT
    Vr = V[:, :r]
    P = low_cost_svd(G, r)
    errors = []
    for _ in range(6):
        errors.append((_projector(P) - _projector(Vr)).norm().item())
        P = low_cost_svd(G, r, P)
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.1 * errors[0]


# --------------------------------------------------------------------------------------------
# low_cost_svd: determinism and random number generators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_low_cost_svd_is_deterministic(dtype):
    G = torch.randn(40, 24, generator=_gen(41), dtype=F64).to(dtype)
    assert torch.equal(low_cost_svd(G, 6), low_cost_svd(G, 6))
    sketch = torch.randn(24, 6, generator=_gen(42), dtype=dtype)
    assert torch.equal(low_cost_svd(G, 6, sketch), low_cost_svd(G, 6, sketch))


def test_low_cost_svd_default_sketch_is_seeded_gaussian():
    G = torch.randn(3, 40, 24, generator=_gen(43), dtype=F64)
    expected = low_cost_svd(G, 6, gaussian_sketch((3, 24, 6), dtype=F64))
    assert torch.equal(low_cost_svd(G, 6), expected)
    assert torch.equal(low_cost_svd(G, 6, generator=_gen(DEFAULT_SKETCH_SEED)), expected)


def test_low_cost_svd_never_touches_global_rng():
    G = torch.randn(40, 24, generator=_gen(44))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    low_cost_svd(G, 6)
    low_cost_svd(G, 6, generator=_gen(7))
    low_cost_svd(G, 6, torch.randn(24, 6, generator=_gen(8)))
    assert torch.equal(torch.get_rng_state(), state)
    after_call = torch.randn(5)
    torch.manual_seed(1234)
    assert torch.equal(torch.randn(5), after_call)


def test_low_cost_svd_generator_changes_result_reproducibly():
    G = torch.randn(40, 24, generator=_gen(45), dtype=F64)
    a = low_cost_svd(G, 6, generator=_gen(1))
    b = low_cost_svd(G, 6, generator=_gen(1))
    c = low_cost_svd(G, 6, generator=_gen(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # The generator's state advances: a second draw from the same generator gives another sketch.
    gen = _gen(1)
    first, second = low_cost_svd(G, 6, generator=gen), low_cost_svd(G, 6, generator=gen)
    assert torch.equal(first, a) and not torch.equal(second, a)
    # Equivalent to passing the sketch drawn from that generator.
    assert torch.equal(a, low_cost_svd(G, 6, gaussian_sketch((24, 6), generator=_gen(1), dtype=F64)))


# --------------------------------------------------------------------------------------------
# low_cost_svd: batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_low_cost_svd_batched_equals_per_matrix(dtype):
    B, m, n, r = 3, 30, 20, 5
    G = torch.randn(B, m, n, generator=_gen(46), dtype=F64).to(dtype)
    sketch = gaussian_sketch((B, n, r), generator=_gen(47), dtype=dtype)
    P = low_cost_svd(G, r, sketch)
    assert P.shape == (B, n, r)
    tol = {F32: 1e-5, F64: 1e-12}[dtype]
    for b in range(B):
        torch.testing.assert_close(P[b], low_cost_svd(G[b], r, sketch[b]), rtol=0, atol=tol)
    # The default sketch of a batch is the seeded (B, n, r) draw, sliced per matrix.
    default = gaussian_sketch((B, n, r), dtype=dtype)
    P_default = low_cost_svd(G, r)
    for b in range(B):
        torch.testing.assert_close(P_default[b], low_cost_svd(G[b], r, default[b]), rtol=0, atol=tol)


def test_low_cost_svd_multiple_batch_dims_and_planted_subspaces():
    G, V, _ = _planted(20, 12, 4, seed=48, batch=(2, 3))
    P = low_cost_svd(G, 4)
    assert P.shape == (2, 3, 12, 4)
    assert (_projector(P) - _projector(V)).abs().max() < 1e-12


# --------------------------------------------------------------------------------------------
# low_cost_svd: rank-deficient and zero gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_rank_deficient_gradient_keeps_true_directions(k, dtype):
    m, n, r = 40, 24, 6
    G, V, _ = _planted(m, n, k, seed=50, dtype=dtype)
    P, S = low_cost_svd_with_values(G, r)
    _assert_orthonormal(P, ORTHO_TOL[dtype])
    tol = {F32: 1e-5, F64: 1e-12}[dtype]
    # The first k columns span the gradient's row space exactly.
    assert (_projector(P[:, :k]) - _projector(V)).abs().max() < tol
    torch.testing.assert_close(G @ P @ P.mT, G, rtol=0, atol=10 * tol)
    # The undetermined singular values are below the rank tolerance.
    assert (S[k:] <= max(m, n) * torch.finfo(dtype).eps * S[0]).all()
    # The remaining columns are the sketch's, orthonormalized against the determined ones.
    sketch = gaussian_sketch((n, r), dtype=dtype)
    filled = torch.cat([P[:, :k], sketch[:, k:]], dim=1)
    torch.testing.assert_close(P, orthonormalize(filled), rtol=0, atol=tol)


def test_rank_deficient_gradient_is_stable_under_tiny_perturbation():
    m, n, r, k = 40, 24, 6, 3
    G, _, _ = _planted(m, n, k, seed=51, dtype=F32)
    noise = torch.randn(m, n, generator=_gen(52))
    G2 = G + 1e-7 * G.norm() * noise / noise.norm()
    P, P2 = low_cost_svd(G, r), low_cost_svd(G2, r)
    _assert_orthonormal(P2, 1e-5)
    assert (P - P2).abs().max() < 1e-3

    # Without the fill, the trailing columns would come from rounding noise: the plain randomized
    # SVD returns unrelated directions for the two nearly equal gradients.
    sketch = gaussian_sketch((n, r))

    def raw(G):
        Q, _ = torch.linalg.qr(G @ sketch)
        return torch.linalg.svd(Q.mT @ G, full_matrices=False)[2].mT

    assert (raw(G)[:, k:] - raw(G2)[:, k:]).abs().max() > 0.1


def test_rank_deficient_with_warm_start_keeps_previous_directions():
    # Directions the gradient says nothing about are taken from the previous P.
    m, n, r, k = 40, 24, 6, 2
    P_prev = _orthonormal((n, r), 53)
    # A gradient whose row space lies inside span(P_prev[:, :k]) ...
    G = torch.randn(m, k, generator=_gen(54), dtype=F64) @ P_prev[:, :k].mT
    P = low_cost_svd(G, r, P_prev)
    # ... leaves the subspace spanned by P_prev unchanged.
    assert (_projector(P) - _projector(P_prev)).abs().max() < 1e-12
    assert (_projector(P[:, k:]) - _projector(P_prev[:, k:])).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zero_gradient_returns_orthonormalized_sketch(dtype):
    G = torch.zeros(40, 24, dtype=dtype)
    sketch = torch.randn(24, 6, generator=_gen(55), dtype=dtype)
    P, S = low_cost_svd_with_values(G, 6, sketch)
    assert torch.equal(S, torch.zeros_like(S))
    torch.testing.assert_close(P, orthonormalize(sketch), rtol=0, atol=0)
    default_sketch = gaussian_sketch((24, 6), dtype=dtype)
    torch.testing.assert_close(low_cost_svd(G, 6), orthonormalize(default_sketch), rtol=0, atol=0)
    # Batched, with one zero matrix among non-zero ones.
    Gb = torch.randn(3, 40, 24, generator=_gen(56), dtype=F64).to(dtype)
    Gb[1] = 0
    sk = torch.randn(3, 24, 6, generator=_gen(57), dtype=dtype)
    torch.testing.assert_close(low_cost_svd(Gb, 6, sk)[1], orthonormalize(sk[1]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_wide_gradient_with_rank_above_its_height(dtype):
    # m < r <= n: the gradient has rank at most m, the other r - m columns come from the sketch.
    m, n, r = 4, 24, 6
    G = torch.randn(m, n, generator=_gen(58), dtype=F64).to(dtype)
    sketch = gaussian_sketch((n, r), dtype=dtype)
    P, S = low_cost_svd_with_values(G, r)
    assert P.shape == (n, r) and S.shape == (r,)
    _assert_orthonormal(P, ORTHO_TOL[dtype])
    assert torch.equal(S[m:], torch.zeros(r - m, dtype=dtype))
    torch.testing.assert_close(S[:m], torch.linalg.svdvals(G), rtol=1e-5, atol=0)
    Vm = torch.linalg.svd(G, full_matrices=False)[2].mT
    tol = {F32: 1e-5, F64: 1e-12}[dtype]
    assert (_projector(P[:, :m]) - _projector(Vm)).abs().max() < tol
    torch.testing.assert_close(P, orthonormalize(torch.cat([P[:, :m], sketch[:, m:]], dim=1)), rtol=0, atol=tol)
    # Batched as well.
    Gb = torch.randn(2, m, n, generator=_gen(59), dtype=F64).to(dtype)
    Pb = low_cost_svd(Gb, r)
    assert Pb.shape == (2, n, r)
    _assert_orthonormal(Pb, ORTHO_TOL[dtype])


# --------------------------------------------------------------------------------------------
# low_cost_svd: argument validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 25, 100])
def test_bad_rank_raises(rank):
    G = torch.randn(40, 24)
    with pytest.raises(ValueError, match="rank"):
        low_cost_svd(G, rank)


@pytest.mark.parametrize("shape", [(24, 5), (24, 7), (23, 6), (6, 24)])
def test_bad_sketch_shape_raises(shape):
    G = torch.randn(40, 24)
    with pytest.raises(ValueError, match="sketch"):
        low_cost_svd(G, 6, torch.randn(shape))


def test_sketch_dtype_follows_gradient():
    G = torch.randn(40, 24, generator=_gen(60), dtype=F64)
    sketch = torch.randn(24, 6, generator=_gen(61), dtype=F32)
    P = low_cost_svd(G, 6, sketch)
    assert P.dtype == F64
    _assert_orthonormal(P, 1e-10)
