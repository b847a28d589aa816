"""Shared pieces of the FSDP2 tests (tests/distributed/test_fsdp.py): a net with every kind of shard, and its training loops."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 64
STEPS = 7  # update_interval=3, reproject_factor=2: an Eq. 2 step at 3, a re-projection at 6
DTYPE = torch.float64
COAP = {"lr": 3e-3, "rank_ratio_matrix": 2, "update_interval": 3, "reproject_factor": 2}


class ShardNet(nn.Module):
    """Tall (128, 64), wide with odd rows (65, 128), tall (96, 65), and a one-row head (an empty shard on rank 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(64, 128)
        self.wide = nn.Linear(128, 65)
        self.odd = nn.Linear(65, 96)
        self.head = nn.Linear(96, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.tall(x))
        x = torch.tanh(self.wide(x))
        x = torch.tanh(self.odd(x))
        return self.head(x).sum(-1)


class StackNet(nn.Module):
    """``depth`` square (64, 64) layers: as many sharded projected matrices, and as many sharded biases."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.sum(-1)


def make_stack_net(depth: int, dtype: torch.dtype = torch.float32) -> StackNet:
    torch.manual_seed(0)
    return StackNet(depth).to(dtype)


def make_shard_net(dtype: torch.dtype = DTYPE) -> ShardNet:
    torch.manual_seed(0)
    return ShardNet().to(dtype)


def data(step: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(BATCH, 64, generator=g, dtype=dtype)
    return x, x[:, :8].sum(-1).sin()


def local_batch(step: int, rank: int, world_size: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(step, dtype)
    share = BATCH // world_size
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def train(
    model, opt, steps, *, rank=0, world_size=1, start=0, accumulation=1, updates=None, on_step=None, dtype=DTYPE
) -> None:
    """``steps`` steps on this rank's share of each batch, in ``accumulation`` micro-batches.

    ``updates``: per-layer mode (no ``step()`` needed); non-final micro-batches run under its
    ``no_update()``. FSDP2 reduces every micro-batch (gradients accumulate on the shards).
    """
    for step in range(start, start + steps):
        x, y = local_batch(step, rank, world_size, dtype)
        micro = list(zip(x.chunk(accumulation), y.chunk(accumulation)))
        for i, (xb, yb) in enumerate(micro):
            last = i == len(micro) - 1
            pause = updates.no_update() if updates is not None and not last else torch.enable_grad()
            with pause:
                (loss_fn(model, xb, yb) / accumulation).backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def snapshot(model, opt) -> dict:
    """Parameters and optimizer state, gathered to full tensors (DTensors unsharded)."""
    params = [full_tensor(p.detach()).clone() for p in model.parameters()]
    state = [{k: full_tensor(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return {"params": params, "state": state}
