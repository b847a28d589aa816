"""Shared pieces of the FSDP2 tests (tests/distributed/test_fsdp.py): a net with every kind of shard, and its training loops."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 64
STEPS = 7  # update_interval=3, reproject_factor=2: an Eq. 2 step at 3, a re-projection at 6
DTYPE = torch.float64
#: scale 1.0: the engines' comparisons are at the paper's update size, which their tolerances
#: are set for (larger steps amplify the order of float sums through the refreshes; the
#: norm-matched scale is a per-layout number, the same in every engine, see test_fsdp_kernels).
COAP = {"lr": 3e-3, "rank_ratio_matrix": 2, "update_interval": 3, "reproject_factor": 2, "scale": 1.0}


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


#: Outputs of the nets below: gradients of their matrices then have a rank well above COAP's.
OUTPUTS = 48
#: Inputs of the expert net.
INPUTS = 48


class UNetLike(nn.Module):
    """What a diffusion UNet hands an optimizer: a small dense kernel (16, 3, 3, 3), Tucker-2
    kernels (one with an odd channel count, 33), a wide (24, 33) and a tall (40, 24) 1x1 conv, a
    norm, a tall (64, 40) and a wide (33, 64) matrix with an odd row count, and a (48, 33) head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 33, 3, padding=1)
        self.skip = nn.Conv2d(33, 24, 1)
        self.norm = nn.GroupNorm(4, 24)
        self.expand = nn.Conv2d(24, 40, 1)
        self.tall = nn.Linear(40, 64)
        self.wide = nn.Linear(64, 33)
        self.head = nn.Linear(33, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.tanh
        h = act(self.mid(act(self.down(act(self.conv_in(x))))))
        h = act(self.expand(act(self.norm(self.skip(h)))))[..., 4, 4]  # a pixel, not a mean: samples stay apart
        return self.head(act(self.wide(act(self.tall(h)))))

    def blocks(self) -> list[nn.Module]:
        return [self.conv_in, self.down, self.mid, self.skip, self.norm, self.expand, self.tall, self.wide, self.head]


class ExpertNet(nn.Module):
    """Mixture-of-experts weights as 3-D stacks (as transformers stores them): 4 experts (64, 32),
    3 experts (32, 64), which two ranks split unevenly, and a stack of one (32, 32) matrix, which
    leaves the second rank none."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(INPUTS, 32)
        self.up = nn.Parameter(torch.randn(4, 64, 32) / 32**0.5)
        self.down = nn.Parameter(torch.randn(3, 32, 64) / 64**0.5)
        self.shared = nn.Parameter(torch.randn(1, 32, 32) / 32**0.5)
        self.head = nn.Linear(32, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        y = torch.tanh(torch.einsum("bi,eoi->beo", h, self.up)).mean(1)
        z = torch.tanh(torch.einsum("bi,eoi->beo", y, self.down)).mean(1)
        z = torch.tanh(torch.einsum("bi,eoi->beo", z, self.shared)).mean(1)
        return self.head(z)

    def blocks(self) -> list[nn.Module]:
        return [self.inp, self.head]


def make_unet_like(dtype: torch.dtype = torch.float32) -> UNetLike:
    torch.manual_seed(0)
    return UNetLike().to(dtype)


def make_unet_zero_head(dtype: torch.dtype = torch.float32) -> UNetLike:
    """:class:`UNetLike` with a zero-initialised head (as ControlNet's zero convolutions): every
    layer below it gets an all-zero first gradient, so its projection is built at step 2."""
    model = make_unet_like(dtype)
    nn.init.zeros_(model.head.weight)
    return model


def make_expert_net(dtype: torch.dtype = torch.float32) -> ExpertNet:
    torch.manual_seed(0)
    return ExpertNet().to(dtype)


def image_batch(step: int, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32):
    """This rank's share of the ``step``-th batch of 8x8 RGB images and targets."""
    g = torch.Generator().manual_seed(900 + step)
    x = torch.randn(BATCH, 3, 8, 8, generator=g, dtype=dtype)
    y = (x[:, :, 2:6, 2:6].flatten(1) @ torch.randn(48, OUTPUTS, generator=g, dtype=dtype) / 48**0.5).sin()
    share = BATCH // world_size
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def token_batch(step: int, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32):
    """This rank's share of the ``step``-th batch of the expert net's inputs and targets."""
    g = torch.Generator().manual_seed(700 + step)
    x = torch.randn(BATCH, INPUTS, generator=g, dtype=dtype)
    y = (x @ torch.randn(INPUTS, OUTPUTS, generator=g, dtype=dtype) / INPUTS**0.5).cos()
    share = BATCH // world_size
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def train_on(
    model, opt, batches, steps, *, rank=0, world_size=1, start=0, dtype=torch.float32, on_step=None, accumulate=1
) -> None:
    """``steps`` steps of mean squared error on ``batches(step, rank, world_size, dtype)``, each
    batch's gradient summed from ``accumulate`` equal parts."""
    for step in range(start, start + steps):
        x, y = batches(step, rank, world_size, dtype)
        for xb, yb in zip(x.chunk(accumulate), y.chunk(accumulate)):
            (nn.functional.mse_loss(model(xb), yb) / accumulate).backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)
