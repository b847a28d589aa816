"""Tucker-2 projection of convolution kernels, checked against tensorly and the definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from coap_torch.functional import (
    conv_ranks,
    mode_matrices,
    mode_product,
    orthonormalize,
    tucker2_add_restored_,
    tucker2_project,
    tucker2_restore,
    unfold,
)

F64 = torch.float64

tl = pytest.importorskip("tensorly")
tenalg = pytest.importorskip("tensorly.tenalg")

# (kernel shape, (r_O, r_I)): 4-D conv kernels, a 3-D (1-D conv) and a 5-D (3-D conv) kernel.
CASES = [
    ((8, 6, 3, 3), (3, 2)),
    ((6, 10, 1, 1), (4, 5)),
    ((5, 4, 3), (2, 3)),
    ((6, 4, 2, 3, 2), (3, 2)),
]


@pytest.fixture(autouse=True)
def _numpy_backend():
    previous = tl.get_backend()
    tl.set_backend("numpy")
    yield
    tl.set_backend(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kernel(shape, seed):
    return torch.randn(shape, generator=_gen(seed), dtype=F64)


def _factors(shape, ranks, seed, orthonormal=True):
    P_O = torch.randn(shape[0], ranks[0], generator=_gen(seed), dtype=F64)
    P_I = torch.randn(shape[1], ranks[1], generator=_gen(seed + 1), dtype=F64)
    if orthonormal:
        P_O, P_I = orthonormalize(P_O), orthonormalize(P_I)
    return P_O, P_I


def _np(t):
    return t.detach().numpy()


# --------------------------------------------------------------------------------------------
# unfold and mode_product
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (3, 4, 2), (2, 3, 2, 2, 3)])
def test_unfold_matches_definition(shape):
    X = _kernel(shape, 1)
    for mode in range(len(shape)):
        U = unfold(X, mode)
        rest = [s for i, s in enumerate(shape) if i != mode]
        assert U.shape == (shape[mode], math.prod(rest))
        # Column j is the mode-`mode` fibre at the j-th multi-index of the other modes, in
        # row-major order (the C-order convention of tensorly).
        for j, idx in enumerate(itertools.product(*(range(s) for s in rest))):
            index = list(idx)
            index.insert(mode, slice(None))
            assert torch.equal(U[:, j], X[tuple(index)])
        np.testing.assert_array_equal(_np(U), tl.unfold(_np(X), mode))


def test_unfold_mode0_and_mode1_fibres_of_kernel():
    X = _kernel((5, 4, 3, 3), 2)
    U0, U1 = unfold(X, 0), unfold(X, 1)
    # Mode-0 fibres: X[:, i, a, b]; mode-1 fibres: X[o, :, a, b].
    assert torch.equal(U0[:, (2 * 3 + 1) * 3 + 0], X[:, 2, 1, 0])
    assert torch.equal(U1[:, (4 * 3 + 2) * 3 + 1], X[4, :, 2, 1])
    # Refolding inverts the unfolding.
    assert torch.equal(U0.reshape(X.shape), X)
    assert torch.equal(U1.reshape(4, 5, 3, 3).movedim(0, 1), X)


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (3, 4, 2), (2, 3, 2, 2, 3)])
def test_mode_product_matches_tensorly_and_unfolding_identity(shape):
    X = _kernel(shape, 3)
    for mode in range(len(shape)):
        A = torch.randn(7, shape[mode], generator=_gen(10 + mode), dtype=F64)
        Y = mode_product(X, A, mode)
        expected_shape = list(shape)
        expected_shape[mode] = 7
        assert Y.shape == tuple(expected_shape)
        np.testing.assert_allclose(_np(Y), tenalg.mode_dot(_np(X), _np(A), mode), rtol=1e-12, atol=1e-12)
        # (X x_n A)_(n) = A X_(n)
        torch.testing.assert_close(unfold(Y, mode), A @ unfold(X, mode), rtol=1e-12, atol=1e-12)


def test_mode_products_on_distinct_modes_commute():
    X = _kernel((4, 5, 3, 3), 4)
    A = torch.randn(2, 4, generator=_gen(5), dtype=F64)
    B = torch.randn(3, 5, generator=_gen(6), dtype=F64)
    torch.testing.assert_close(
        mode_product(mode_product(X, A, 0), B, 1), mode_product(mode_product(X, B, 1), A, 0), rtol=1e-12, atol=1e-12
    )


# --------------------------------------------------------------------------------------------
# tucker2_project / tucker2_restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("shape,ranks", CASES)
def test_project_and_restore_match_tensorly(shape, ranks, orthonormal):
    G = _kernel(shape, 20)
    P_O, P_I = _factors(shape, ranks, 21, orthonormal)
    C = tucker2_project(G, P_O, P_I)
    assert C.shape == (*ranks, *shape[2:])
    expected = tenalg.multi_mode_dot(_np(G), [_np(P_O).T, _np(P_I).T], modes=[0, 1])
    np.testing.assert_allclose(_np(C), expected, rtol=1e-12, atol=1e-12)
    # The same with successive mode_dot calls, in the other order.
    expected2 = tenalg.mode_dot(tenalg.mode_dot(_np(G), _np(P_I).T, 1), _np(P_O).T, 0)
    np.testing.assert_allclose(_np(C), expected2, rtol=1e-12, atol=1e-12)

    core = _kernel((*ranks, *shape[2:]), 22)
    R = tucker2_restore(core, P_O, P_I)
    assert R.shape == tuple(shape)
    expected = tenalg.multi_mode_dot(_np(core), [_np(P_O), _np(P_I)], modes=[0, 1])
    np.testing.assert_allclose(_np(R), expected, rtol=1e-12, atol=1e-12)


def test_project_and_restore_match_tensorly_torch_backend():
    shape, ranks = (8, 6, 3, 3), (3, 2)
    G = _kernel(shape, 23)
    P_O, P_I = _factors(shape, ranks, 24)
    tl.set_backend("pytorch")
    try:
        expected = tenalg.multi_mode_dot(G, [P_O.T, P_I.T], modes=[0, 1])
        restored = tenalg.multi_mode_dot(expected, [P_O, P_I], modes=[0, 1])
    finally:
        tl.set_backend("numpy")
    torch.testing.assert_close(tucker2_project(G, P_O, P_I), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tucker2_restore(expected, P_O, P_I), restored, rtol=1e-12, atol=1e-12)


def test_project_matches_einsum_definition():
    G = _kernel((8, 6, 3, 3), 25)
    P_O, P_I = _factors(G.shape, (3, 2), 26, orthonormal=False)
    torch.testing.assert_close(
        tucker2_project(G, P_O, P_I), torch.einsum("oikl,or,is->rskl", G, P_O, P_I), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("shape,ranks", CASES)
def test_add_restored_accumulates_in_place(shape, ranks):
    target = _kernel(shape, 27)
    before, pointer = target.clone(), target.data_ptr()
    core = _kernel((*ranks, *shape[2:]), 28)
    P_O, P_I = _factors(shape, ranks, 29, orthonormal=False)
    out = tucker2_add_restored_(target, core, P_O, P_I, beta=0.9, alpha=-0.5)
    assert out is target and target.data_ptr() == pointer
    torch.testing.assert_close(target, 0.9 * before - 0.5 * tucker2_restore(core, P_O, P_I), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,ranks", CASES)
def test_restore_is_adjoint_of_project(shape, ranks):
    X = _kernel(shape, 30)
    C = _kernel((*ranks, *shape[2:]), 31)
    # Any factors, not only orthonormal ones.
    P_O, P_I = _factors(shape, ranks, 32, orthonormal=False)
    lhs = (tucker2_project(X, P_O, P_I) * C).sum()
    rhs = (X * tucker2_restore(C, P_O, P_I)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (5, 4, 3), (4, 3, 2, 2, 2)])
def test_full_rank_round_trip_is_exact(shape):
    X = _kernel(shape, 33)
    P_O, P_I = _factors(shape, shape[:2], 34)  # square orthonormal factors
    torch.testing.assert_close(tucker2_restore(tucker2_project(X, P_O, P_I), P_O, P_I), X, rtol=0, atol=1e-12)
    # And the projection preserves the Frobenius norm (an isometry).
    torch.testing.assert_close(tucker2_project(X, P_O, P_I).norm(), X.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape,ranks", CASES)
def test_low_rank_projection_is_idempotent_orthogonal_projector(shape, ranks):
    X = _kernel(shape, 35)
    P_O, P_I = _factors(shape, ranks, 36)

    def proj(T):
        return tucker2_restore(tucker2_project(T, P_O, P_I), P_O, P_I)

    once = proj(X)
    torch.testing.assert_close(proj(once), once, rtol=0, atol=1e-12)
    # Orthogonal projector: the residual is orthogonal to the projection.
    assert abs((once * (X - once)).sum().item()) < 1e-10
    assert once.norm() <= X.norm()
    # project o restore is the identity on the core (orthonormal factors).
    C = _kernel((*ranks, *shape[2:]), 37)
    torch.testing.assert_close(tucker2_project(tucker2_restore(C, P_O, P_I), P_O, P_I), C, rtol=0, atol=1e-12)


def test_project_is_linear():
    shape, ranks = (8, 6, 3, 3), (3, 2)
    X, Y = _kernel(shape, 38), _kernel(shape, 39)
    P_O, P_I = _factors(shape, ranks, 40)
    torch.testing.assert_close(
        tucker2_project(2.5 * X - Y, P_O, P_I),
        2.5 * tucker2_project(X, P_O, P_I) - tucker2_project(Y, P_O, P_I),
        rtol=1e-12,
        atol=1e-12,
    )


# --------------------------------------------------------------------------------------------
# mode_matrices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ranks", CASES)
def test_mode_matrices(shape, ranks):
    G = _kernel(shape, 41)
    M = _kernel((*ranks, *shape[2:]), 42)
    P_O, P_I = _factors(shape, ranks, 43)
    (G_O, M_O), (G_I, M_I) = mode_matrices(G, M, P_O, P_I)
    O, I = shape[:2]
    k = math.prod(shape[2:])
    assert G_O.shape == (I * k, O) and M_O.shape == (I * k, ranks[0])
    assert G_I.shape == (O * k, I) and M_I.shape == (O * k, ranks[1])
    # The gradients are the transposed unfoldings.
    assert torch.equal(G_O, unfold(G, 0).mT)
    assert torch.equal(G_I, unfold(G, 1).mT)
    np.testing.assert_array_equal(_np(G_O), tl.unfold(_np(G), 0).T)
    np.testing.assert_array_equal(_np(G_I), tl.unfold(_np(G), 1).T)
    # M_O P_O^T and M_I P_I^T are the unfoldings of the full moment estimate M x1 P_O x2 P_I.
    full = tucker2_restore(M, P_O, P_I)
    torch.testing.assert_close(M_O @ P_O.mT, unfold(full, 0).mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M_I @ P_I.mT, unfold(full, 1).mT, rtol=1e-12, atol=1e-12)
    # And G_O P_O is the mode-1 unfolding (transposed) of G projected on mode 1 only.
    torch.testing.assert_close(G_O @ P_O, unfold(mode_product(G, P_O.mT, 0), 0).mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G_I @ P_I, unfold(mode_product(G, P_I.mT, 1), 1).mT, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# conv_ranks
# --------------------------------------------------------------------------------------------


def test_conv_ranks_values():
    assert conv_ranks((64, 32, 3, 3), 4) == (32, 16)
    assert conv_ranks((64, 32, 3, 3), 1) == (64, 32)
    assert conv_ranks((64, 32, 3, 3), 16) == (16, 8)
    assert conv_ranks(torch.Size([64, 32, 3, 3]), 4.0) == (32, 16)
    assert conv_ranks((64, 32, 3, 3, 3), 4) == (32, 16)  # 5-D kernel
    assert conv_ranks((64, 32, 3, 3), 2) == (45, 22)  # floor(64 / 1.414...), floor(32 / 1.414...)


def test_conv_ranks_minimum_is_one():
    assert conv_ranks((2, 3, 3, 3), 100) == (1, 1)
    assert conv_ranks((1, 1, 1, 1), 1) == (1, 1)
    assert conv_ranks((256, 3, 7, 7), 16) == (64, 1)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (48, 20, 5, 5), (7, 5, 3)])
@pytest.mark.parametrize("ratio", [1, 1.5, 2, 4, 9, 10])
def test_conv_ranks_formula_and_core_size(shape, ratio):
    r_O, r_I = conv_ranks(shape, ratio)
    expected = tuple(max(1, math.floor(side / math.sqrt(ratio))) for side in shape[:2])
    assert (r_O, r_I) == expected
    assert 1 <= r_O <= shape[0] and 1 <= r_I <= shape[1]
    # The core keeps about 1/ratio of the entries (at most, when no rank is clamped to 1).
    if r_O > 1 and r_I > 1:
        assert r_O * r_I <= shape[0] * shape[1] / ratio * (1 + 1e-12)
    # A larger ratio never gives larger ranks.
    bigger = conv_ranks(shape, ratio * 2)
    assert bigger[0] <= r_O and bigger[1] <= r_I


@pytest.mark.parametrize("ratio", [0.5, 0.999, 0, -2])
def test_conv_ranks_rejects_ratio_below_one(ratio):
    with pytest.raises(ValueError, match="rank_ratio"):
        conv_ranks((64, 32, 3, 3), ratio)


# --------------------------------------------------------------------------------------------
# 5-D kernels end to end
# --------------------------------------------------------------------------------------------


def test_five_dimensional_kernel_end_to_end():
    shape = (8, 6, 3, 2, 2)
    ranks = conv_ranks(shape, 4)
    assert ranks == (4, 3)
    G = _kernel(shape, 50)
    P_O, P_I = _factors(shape, ranks, 51)
    C = tucker2_project(G, P_O, P_I)
    assert C.shape == (4, 3, 3, 2, 2)
    np.testing.assert_allclose(
        _np(C), tenalg.multi_mode_dot(_np(G), [_np(P_O).T, _np(P_I).T], modes=[0, 1]), rtol=1e-12, atol=1e-12
    )
    R = tucker2_restore(C, P_O, P_I)
    assert R.shape == shape
    # Restoring the projection of an in-subspace kernel is exact.
    torch.testing.assert_close(tucker2_restore(tucker2_project(R, P_O, P_I), P_O, P_I), R, rtol=0, atol=1e-12)
    (G_O, M_O), (G_I, M_I) = mode_matrices(G, C, P_O, P_I)
    assert G_O.shape == (6 * 12, 8) and M_O.shape == (6 * 12, 4)
    assert G_I.shape == (8 * 12, 6) and M_I.shape == (8 * 12, 3)
    torch.testing.assert_close(M_O @ P_O.mT, unfold(R, 0).mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M_I @ P_I.mT, unfold(R, 1).mT, rtol=1e-12, atol=1e-12)
