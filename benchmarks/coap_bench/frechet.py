r"""Sample quality offline: a Frechet distance in the feature space of a small classifier.

The Frechet distance between two Gaussians :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)`
(the 2-Wasserstein distance between them, squared) is

.. math::

    d^2 = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
          - 2 (\Sigma_1 \Sigma_2)^{1/2}\big).

FID (Heusel et al., 2017) evaluates it on Inception-v3 features of generated and real images.
Inception's weights must be downloaded, so the DDPM benchmark's default figure is the same
formula on the penultimate-layer features of a small CNN classifier trained, once per run and
deterministically, on the run's own training images (:func:`train_feature_classifier`). **It is
not FID**: its values are not comparable with published FIDs, only between the optimizers of one
run (same classifier, same real images, same number of samples). Real FID is
:func:`inception_fid` (``coap-bench ddpm --fid``), where ``torch-fidelity`` (what
``torchmetrics``' FID uses) or ``pytorch-fid`` is installed and its Inception weights can be had.

:func:`frechet_distance` is a pure function (float64, no SciPy): the trace of the matrix square
root is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
:math:`\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}`, which has the eigenvalues of :math:`\Sigma_1 \Sigma_2`.

>>> import torch
>>> mu, sigma = torch.zeros(3), torch.eye(3)
>>> frechet_distance(mu, sigma, mu, sigma)
0.0
>>> round(frechet_distance(mu, sigma, mu + torch.tensor([1.0, 2.0, 2.0]), sigma), 6)  # |mu1 - mu2|^2
9.0
>>> round(frechet_distance(mu, 4 * sigma, mu, sigma), 6)  # sum (sqrt(4) - sqrt(1))^2 over 3 dims
3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._deps import MissingExtraError, require
from .runner import RunConfigurationError

__all__ = [
    "CLASSIFIER_STEPS",
    "FEATURE_DIM",
    "FeatureClassifier",
    "FrechetScorer",
    "feature_frechet_distance",
    "frechet_distance",
    "frechet_scorer",
    "gaussian_statistics",
    "inception_features",
    "inception_fid",
    "inception_fid_features",
    "train_feature_classifier",
]

#: Width of the classifier's penultimate layer: the feature space of the distance.
FEATURE_DIM = 64
#: Training steps, batch size and lr of the feature classifier (AdamW, seeded batches).
CLASSIFIER_STEPS = 300
CLASSIFIER_BATCH = 128
CLASSIFIER_LR = 2e-3
#: Offset between a run's seed and the seeds of the classifier (weights, batches) and the real subset.
_CLASSIFIER_STREAM = 3 * 2**32


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (``(d,)``, ``(d, d)``, float64) of ``features`` ``(n, d)``, n >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (n, d), got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    mu = x.mean(dim=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance (squared 2-Wasserstein) between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``mu*`` are ``(d,)``, ``sigma*`` symmetric PSD ``(d, d)``; computed in float64. The result is
    clamped at 0 (round-off can make equal distributions come out at -1e-15).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    sigma1, sigma2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shapes do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}"
        )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return max(0.0, float(distance))


def feature_frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """:func:`frechet_distance` between the Gaussian fits of two feature sets ``(n1, d)`` and ``(n2, d)``."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


class FeatureClassifier(nn.Module):
    """conv(C->32) -> pool -> conv(32->64) -> pool -> avg-pool to 2x2 -> linear(256->64) -> linear(64->classes).

    :meth:`features` returns the 64 ReLU activations before the last layer: the feature space of
    the Frechet distance. Works at any resolution >= 4.
    """

    def __init__(self, channels: int, num_classes: int, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def _seeded_init(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init for conv / linear layers, drawn from ``generator`` (not the global RNG)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.bias.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def _accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor, chunk: int = 1024) -> float | None:
    if len(labels) == 0:
        return None
    correct = sum(
        int((model(images[i : i + chunk]).argmax(1) == labels[i : i + chunk]).sum())
        for i in range(0, len(labels), chunk)
    )
    return correct / len(labels)


def train_feature_classifier(
    train: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    steps: int = CLASSIFIER_STEPS,
    batch_size: int = CLASSIFIER_BATCH,
    lr: float = CLASSIFIER_LR,
) -> FeatureClassifier:
    """A :class:`FeatureClassifier` trained with AdamW on ``(train, train_labels)``; deterministic given ``seed``.

    Runs on the CPU (a few seconds for the digits) with the current torch thread count.
    """
    generator = torch.Generator().manual_seed(seed + _CLASSIFIER_STREAM)
    with torch.device("meta"):
        model = FeatureClassifier(train.shape[1], num_classes)
    model = model.to_empty(device="cpu")
    _seeded_init(model, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    train, train_labels = train.detach().cpu().float(), train_labels.cpu()
    batch_size = min(batch_size, len(train_labels))
    model.train()
    for _ in range(steps):
        index = torch.randint(len(train_labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(train[index]), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class FrechetScorer:
    """Scores generated images by the Frechet distance of their classifier features to the held-out images'.

    ``info`` records how the classifier was trained, its held-out accuracy, and
    ``real_train_vs_heldout``: the distance of a random subset of training images (as many as
    the generated samples) to the held-out set, the floor a perfect generator would reach.
    """

    classifier: FeatureClassifier
    mu: Tensor
    sigma: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def features(self, images: Tensor, chunk: int = 1024) -> Tensor:
        images = images.detach().cpu().float()
        return torch.cat([self.classifier.features(images[i : i + chunk]) for i in range(0, len(images), chunk)])

    def score(self, images: Tensor) -> float:
        """Frechet distance between the features of ``images`` (N, C, H, W in [-1, 1]) and the reference."""
        return frechet_distance(*gaussian_statistics(self.features(images)), self.mu, self.sigma)


_SCORERS: dict[tuple[Any, ...], FrechetScorer] = {}


def frechet_scorer(data: Any, *, samples: int, seed: int = 0, steps: int = CLASSIFIER_STEPS) -> FrechetScorer:
    """The :class:`FrechetScorer` of ``data`` (an :class:`~coap_bench.images.ImageData`), cached in-process.

    The classifier is trained on ``data.train``; the reference statistics are those of
    ``data.heldout``; ``samples`` sets the size of the real-vs-real floor in ``info``.
    """
    described = data.describe()
    key = (described["train_sha256"], described["heldout_sha256"], described["labels_sha256"], samples, seed, steps)
    if key in _SCORERS:
        return _SCORERS[key]
    if len(data.heldout) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 held-out images, got {len(data.heldout)}")
    classifier = train_feature_classifier(data.train, data.train_labels, data.num_classes, seed=seed, steps=steps)
    scorer = FrechetScorer(classifier, torch.empty(0), torch.empty(0))
    scorer.mu, scorer.sigma = gaussian_statistics(scorer.features(data.heldout))
    generator = torch.Generator().manual_seed(seed + _CLASSIFIER_STREAM + 1)
    subset = torch.randperm(len(data.train), generator=generator)[: max(2, min(samples, len(data.train)))]
    scorer.info = {
        "metric": "Frechet distance of classifier features (not FID)",
        "classifier": "FeatureClassifier: 2 conv + 2 linear layers, trained on the training images",
        "feature_dim": FEATURE_DIM,
        "steps": steps,
        "batch_size": CLASSIFIER_BATCH,
        "lr": CLASSIFIER_LR,
        "label_source": getattr(data, "label_source", "classes"),
        "train_accuracy": _accuracy(classifier, data.train, data.train_labels),
        "heldout_accuracy": _accuracy(classifier, data.heldout, data.heldout_labels),
        "reference": f"{len(data.heldout)} held-out images",
        "real_train_vs_heldout": scorer.score(data.train[subset]),
        "real_subset_size": len(subset),
    }
    _SCORERS[key] = scorer
    return scorer


# ------------------------------------------------------------------------------------------ real FID


def _to_uint8_rgb(images: Tensor) -> Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8 RGB (gray repeated)."""
    images = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def _torch_fidelity_features(device: torch.device) -> Callable[[Tensor], Tensor]:
    extractor_module = require("torch_fidelity.feature_extractor_inceptionv3", package="torch-fidelity")
    extractor = extractor_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()

    def features(images_uint8: Tensor) -> Tensor:
        return extractor(images_uint8.to(device))[0].flatten(1).cpu()

    return features


def _pytorch_fid_features(device: torch.device) -> Callable[[Tensor], Tensor]:
    inception = require("pytorch_fid.inception", package="pytorch-fid")
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    def features(images_uint8: Tensor) -> Tensor:
        return model(images_uint8.to(device).float() / 255.0)[0].flatten(1).cpu()

    return features


#: Backends of real FID, tried in order: (distribution name, factory of a uint8-images -> features function).
FID_BACKENDS: tuple[tuple[str, Callable[[torch.device], Callable[[Tensor], Tensor]]], ...] = (
    ("torch-fidelity", _torch_fidelity_features),
    ("pytorch-fid", _pytorch_fid_features),
)


def inception_features(device: torch.device | str = "cpu") -> tuple[str, Callable[[Tensor], Tensor]]:
    """``(backend name, extractor)``: Inception-v3 pool features (2048, on the CPU) of uint8 RGB
    images, computed on ``device`` by the first installed backend of :data:`FID_BACKENDS`.

    Raises :class:`~coap_bench._deps.MissingExtraError` when none is installed and
    :class:`~coap_bench.runner.RunConfigurationError` when the Inception weights cannot be loaded (no internet, no cache).
    """
    device = torch.device(device)
    for name, factory in FID_BACKENDS:
        try:
            return name, factory(device)
        except MissingExtraError:
            continue
        except Exception as error:
            raise RunConfigurationError(
                f"real FID needs the Inception-v3 weights of {name}, which could not be loaded "
                f"({type(error).__name__}: {error}); run once with internet access to cache "
                "them, or leave out --fid"
            ) from error
    raise MissingExtraError(
        "real FID (--fid) needs torch-fidelity or pytorch-fid, and neither is installed: run "
        "`pip install torch-fidelity` (or `pip install torchmetrics[image]`, which includes it) "
        "or `pip install pytorch-fid`; the classifier Frechet distance needs neither"
    )


@torch.no_grad()
def inception_fid_features(images: Tensor, extractor: Callable[[Tensor], Tensor], chunk: int = 200) -> Tensor:
    """Inception features ``(N, 2048)`` of ``images`` (N, C, H, W in [-1, 1]; gray is repeated to RGB)."""
    images = _to_uint8_rgb(images)
    return torch.cat([extractor(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def inception_fid(generated: Tensor, real: Tensor, extractor: Callable[[Tensor], Tensor] | None = None) -> float:
    """FID between ``generated`` and ``real`` images (N, C, H, W in [-1, 1]) on Inception-v3 pool features."""
    if extractor is None:
        extractor = inception_features()[1]
    return feature_frechet_distance(
        inception_fid_features(generated, extractor), inception_fid_features(real, extractor)
    )
