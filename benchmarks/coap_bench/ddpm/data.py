"""The images of a DDPM run: the seeded training stream and the fixed held-out set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..images import HELDOUT_SEED, ShuffledBatches, heldout_draws

__all__ = ["HELDOUT_SEED", "HeldoutSet", "ImageBatches", "heldout_set"]


class ImageBatches(ShuffledBatches):
    """The training stream: image indices (a fresh permutation per epoch), noise and timesteps.

    Everything is drawn from one :class:`torch.Generator` seeded with ``seed``, so every optimizer
    sees the same batches; :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.
    """

    def __init__(self, images: Tensor, batch_size: int, num_timesteps: int, *, seed: int) -> None:
        super().__init__(len(images), batch_size, seed=seed)
        self.images, self.num_timesteps = images, num_timesteps

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, noise, timesteps)`` of the next batch, on the CPU."""
        x0 = self.images[self.next_index()]
        noise = torch.randn(x0.shape, generator=self.generator)
        timesteps = torch.randint(self.num_timesteps, (self.batch_size,), generator=self.generator)
        return x0, noise, timesteps


@dataclass
class HeldoutSet:
    """Held-out images with their fixed timesteps and noise (``repeats`` draws per image)."""

    images: Tensor
    timesteps: Tensor
    noise: Tensor
    repeats: int

    def batch(self, chunk: slice, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, noise, timesteps)`` of the rows ``chunk`` on ``device``, as :meth:`ImageBatches.next` gives a batch."""
        return self.images[chunk].to(device), self.noise[chunk].to(device), self.timesteps[chunk].to(device)


def heldout_set(images: Tensor, repeats: int, num_timesteps: int, *, seed: int = HELDOUT_SEED) -> HeldoutSet:
    """Each held-out image ``repeats`` times, with timesteps stratified over ``[0, T)`` and seeded noise.

    >>> s = heldout_set(torch.zeros(10, 1, 4, 4), 2, 1000)
    >>> s.images.shape[0], int(s.timesteps.min()) >= 0, int(s.timesteps.max()) < 1000
    (20, True, True)
    """

    def strata(n: int) -> Tensor:
        return ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).long().clamp_(0, num_timesteps - 1)

    tiled, timesteps, noise = heldout_draws(images, repeats, strata, seed=seed)
    return HeldoutSet(tiled, timesteps, noise, repeats)
