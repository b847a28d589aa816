"""The inputs of a SiT run: the seeded training stream and the fixed held-out set, with labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..images import HELDOUT_SEED, ShuffledBatches, heldout_draws

__all__ = ["HELDOUT_SEED", "HeldoutSet", "SitBatch", "SitBatches", "heldout_set", "to_channels"]


def to_channels(images: Tensor, channels: int) -> Tensor:
    """``images`` (N, C, H, W) with ``channels`` channels: unchanged when they match; otherwise the channel
    mean is appended until there are enough (the stand-in for 4-channel latents made of RGB or gray images).

    >>> to_channels(torch.ones(2, 3, 4, 4), 4).shape
    torch.Size([2, 4, 4, 4])
    """
    if images.shape[1] > channels:
        raise ValueError(f"cannot fit {images.shape[1]}-channel images into {channels} channels")
    extra = channels - images.shape[1]
    if extra == 0:
        return images
    mean = images.mean(dim=1, keepdim=True)
    return torch.cat([images, mean.expand(-1, extra, -1, -1)], dim=1).contiguous()


@dataclass
class SitBatch:
    """One training batch: clean images ``x``, their labels (some replaced by the null class), noise, times."""

    x: Tensor
    labels: Tensor
    noise: Tensor
    t: Tensor

    def to(self, device: torch.device) -> SitBatch:
        return SitBatch(self.x.to(device), self.labels.to(device), self.noise.to(device), self.t.to(device))


class SitBatches(ShuffledBatches):
    """The training stream: image indices (a fresh permutation per epoch), noise, times ``t ~ U[0, 1]`` and
    the labels dropped to ``null_class`` with probability ``class_dropout`` (SiT's classifier-free guidance
    training).

    Everything is drawn from one :class:`torch.Generator` seeded with ``seed``, so every optimizer sees the
    same batches; :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        seed: int,
        class_dropout: float = 0.0,
        null_class: int | None = None,
    ) -> None:
        super().__init__(len(images), batch_size, seed=seed)
        if class_dropout > 0 and null_class is None:
            raise ValueError("class_dropout needs a null_class")
        self.images, self.labels = images, labels
        self.class_dropout, self.null_class = class_dropout, null_class

    def next(self) -> SitBatch:
        """The next batch, on the CPU."""
        index = self.next_index()
        x = self.images[index]
        noise = torch.randn(x.shape, generator=self.generator)
        t = torch.rand(self.batch_size, generator=self.generator)
        labels = self.labels[index]
        if self.class_dropout > 0:
            dropped = torch.rand(self.batch_size, generator=self.generator) < self.class_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return SitBatch(x, labels, noise, t)


@dataclass
class HeldoutSet:
    """Held-out images and their labels, each ``repeats`` times, with fixed times and noise."""

    images: Tensor
    labels: Tensor
    t: Tensor
    noise: Tensor
    repeats: int

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, chunk: slice, device: torch.device) -> SitBatch:
        """The rows ``chunk`` on ``device``, as :meth:`SitBatches.next` gives a batch."""
        return SitBatch(self.images[chunk], self.labels[chunk], self.noise[chunk], self.t[chunk]).to(device)


def heldout_set(images: Tensor, labels: Tensor, repeats: int, *, seed: int = HELDOUT_SEED) -> HeldoutSet:
    """Each held-out image ``repeats`` times with its true label, times stratified over ``[0, 1]`` and seeded noise.

    >>> s = heldout_set(torch.zeros(10, 1, 4, 4), torch.arange(10), 2)
    >>> len(s), bool(s.t.min() > 0), bool(s.t.max() < 1)
    (20, True, True)
    """

    def strata(n: int) -> Tensor:
        return ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()  # one time per stratum of width 1 / n

    tiled, t, noise = heldout_draws(images, repeats, strata, seed=seed)
    return HeldoutSet(tiled, labels.repeat(repeats), t, noise, repeats)
