"""The images of a DDPM run: the seeded training stream and the fixed held-out set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["HELDOUT_SEED", "HeldoutSet", "ImageBatches", "heldout_set"]

#: Seed of the held-out (t, noise) draws: fixed, so every ``--seed`` is scored on the same set.
HELDOUT_SEED = 1234


class ImageBatches:
    """The training stream: image indices (a fresh permutation per epoch), noise and timesteps.

    Everything is drawn from one :class:`torch.Generator` seeded with ``seed``, so every optimizer
    sees the same batches; :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.
    """

    def __init__(self, images: Tensor, batch_size: int, num_timesteps: int, *, seed: int) -> None:
        if batch_size > len(images):
            raise ValueError(f"batch size {batch_size} exceeds the {len(images)} training images")
        self.images, self.batch_size, self.num_timesteps = images, batch_size, num_timesteps
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, noise, timesteps)`` of the next batch, on the CPU."""
        if self.cursor + self.batch_size > len(self.order):  # the last partial batch of an epoch is dropped
            self.order = torch.randperm(len(self.images), generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        x0 = self.images[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        timesteps = torch.randint(self.num_timesteps, (self.batch_size,), generator=self.generator)
        return x0, noise, timesteps

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.order = state["order"].cpu()
        self.cursor = int(state["cursor"])


@dataclass
class HeldoutSet:
    """Held-out images with their fixed timesteps and noise (``repeats`` draws per image)."""

    images: Tensor
    timesteps: Tensor
    noise: Tensor
    repeats: int


def heldout_set(images: Tensor, repeats: int, num_timesteps: int, *, seed: int = HELDOUT_SEED) -> HeldoutSet:
    """Each held-out image ``repeats`` times, with timesteps stratified over ``[0, T)`` and seeded noise.

    >>> s = heldout_set(torch.zeros(10, 1, 4, 4), 2, 1000)
    >>> s.images.shape[0], int(s.timesteps.min()) >= 0, int(s.timesteps.max()) < 1000
    (20, True, True)
    """
    generator = torch.Generator().manual_seed(seed)
    tiled = images.repeat(repeats, 1, 1, 1)
    n = len(tiled)
    strata = ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).long().clamp_(0, num_timesteps - 1)
    timesteps = strata[torch.randperm(n, generator=generator)]
    noise = torch.randn(tiled.shape, generator=generator)
    return HeldoutSet(tiled, timesteps, noise, repeats)
