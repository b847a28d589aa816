"""``norm_matched_scale``: the factor that gives a restored update the RMS of the projected one."""

from __future__ import annotations

import math

import pytest
import torch

from coap_torch.functional import norm_matched_scale, orthonormalize, tucker2_restore

F64 = torch.float64


def _rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return orthonormalize(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=F64))


@pytest.mark.parametrize(("m", "n", "r"), [(96, 64, 16), (64, 96, 48), (7, 300, 1), (50, 50, 49)])
def test_restored_matrix_update_gets_the_projected_rms(m, n, r):
    U = torch.randn(m, r, generator=torch.Generator().manual_seed(m + n + r), dtype=F64)
    restored = U @ _orthonormal(n, r, 1).T
    s = norm_matched_scale((m, n), (m, r))
    assert s == pytest.approx(math.sqrt(n / r), rel=1e-15)
    assert _rms(restored) * s == pytest.approx(_rms(U), rel=1e-12)


def test_restored_tucker2_core_gets_the_projected_rms():
    core = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    restored = tucker2_restore(core, _orthonormal(16, 6, 4), _orthonormal(8, 4, 5))
    s = norm_matched_scale(restored.shape, core.shape)
    assert s == pytest.approx(math.sqrt(16 * 8 / (6 * 4)), rel=1e-15)
    assert _rms(restored) * s == pytest.approx(_rms(core), rel=1e-12)


def test_a_batch_of_matrices_has_the_ratio_of_one():
    assert norm_matched_scale((5, 30, 40), (5, 30, 10)) == norm_matched_scale((30, 40), (30, 10)) == 2.0


@pytest.mark.parametrize(("full", "projected"), [((0, 4), (0, 2)), ((3, 4), (3, 0))])
def test_empty_shapes_are_refused(full, projected):
    with pytest.raises(ValueError, match="non-empty"):
        norm_matched_scale(full, projected)
