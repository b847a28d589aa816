"""The Frechet distance against closed forms, its statistics, the feature classifier and the FID plumbing."""

from __future__ import annotations

import doctest
import sys
import types
from typing import ClassVar

import pytest
import torch

from coap_bench import frechet
from coap_bench._deps import MissingExtraError
from coap_bench.frechet import (
    FeatureClassifier,
    feature_frechet_distance,
    frechet_distance,
    gaussian_statistics,
    inception_features,
    inception_fid,
    train_feature_classifier,
)


def _random_psd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / (2 * d)


def test_identical_gaussians_are_at_distance_zero():
    sigma = _random_psd(6, 0)
    mu = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_shifted_means_give_the_squared_distance_of_the_means():
    sigma = _random_psd(5, 1)
    mu1, mu2 = torch.zeros(5), torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float((mu1 - mu2).square().sum()), rel=1e-9)


def test_diagonal_covariances_give_the_sum_of_squared_root_differences():
    s1, s2 = torch.tensor([1.0, 4.0, 9.0, 0.25]), torch.tensor([4.0, 4.0, 1.0, 1.0])
    mu1, mu2 = torch.zeros(4), torch.ones(4)
    expected = 4.0 + float((s1.sqrt() - s2.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _random_psd(7, 2), _random_psd(7, 3)
    mu1, mu2 = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2)) - 2 * float(covmean.trace())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    # Symmetric, and the singular (rank-deficient) case stays finite and non-negative.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    singular = torch.diag(torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    assert frechet_distance(mu1, singular, mu2, s2) >= 0


def test_statistics_are_numpy_mean_and_unbiased_covariance():
    np = pytest.importorskip("numpy")
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(4))
    mu, sigma = gaussian_statistics(features)
    assert torch.allclose(mu, torch.as_tensor(features.double().numpy().mean(0)))
    assert torch.allclose(sigma, torch.as_tensor(np.cov(features.double().numpy(), rowvar=False)))
    assert feature_frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(features[:1])
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_module_examples_run():
    result = doctest.testmod(frechet, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture
def one_thread():
    """Tiny convolutions are fastest, and steadiest on a busy machine, on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_feature_classifier_is_deterministic_and_learns(one_thread):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 1, 8, 8, generator=generator) * 0.1 + labels.view(-1, 1, 1, 1).float() - 0.5
    a = train_feature_classifier(images, labels, 2, seed=1, steps=30, batch_size=32)
    b = train_feature_classifier(images, labels, 2, seed=1, steps=30, batch_size=32)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert (a(images).argmax(1) == labels).float().mean() > 0.9
    assert a.features(images).shape == (64, frechet.FEATURE_DIM) and not a.training
    assert isinstance(a, FeatureClassifier)


def test_real_fid_uses_an_installed_backend(monkeypatch):
    """The plumbing of --fid, with a stand-in for pytorch-fid (the real one downloads Inception's weights)."""

    class FakeInception(torch.nn.Module):
        BLOCK_INDEX_BY_DIM: ClassVar[dict[int, int]] = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            assert blocks == [3]

        def forward(self, x):
            assert x.shape[1] == 3 and 0 <= float(x.min()) and float(x.max()) <= 1
            return [x.mean(dim=(2, 3), keepdim=True)]

    package = types.ModuleType("pytorch_fid")
    module = types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    monkeypatch.setattr(frechet, "FID_BACKENDS", (("pytorch-fid", frechet._pytorch_fid_features),))
    name, extractor = inception_features()
    assert name == "pytorch-fid"
    images = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert inception_fid(images, images, extractor) == pytest.approx(0.0, abs=1e-6)
    assert inception_fid(images, -images, extractor) > 0


def test_real_fid_without_a_backend_says_what_to_install(monkeypatch):
    def missing(device):
        raise MissingExtraError("nope")

    monkeypatch.setattr(frechet, "FID_BACKENDS", (("torch-fidelity", missing), ("pytorch-fid", missing)))
    with pytest.raises(MissingExtraError, match="pip install torch-fidelity"):
        inception_features()


def test_real_fid_without_weights_is_a_clear_error(monkeypatch):
    def offline(device):
        raise OSError("could not download the weights")

    monkeypatch.setattr(frechet, "FID_BACKENDS", (("torch-fidelity", offline),))
    with pytest.raises(ValueError, match="Inception-v3 weights of torch-fidelity"):
        inception_features()
