"""The small net every optimizer test trains, its batches and its training loop."""

from __future__ import annotations

import torch

__all__ = ["SmallNet", "batch", "make_net", "train"]


class SmallNet(torch.nn.Module):
    """A conv kernel (Tucker-2), a 1x1 conv (matrix), matrices of both orientations, 1-D params.

    Its parameters in optimizer order: 0 conv.weight (Tucker-2), 1 conv.bias, 2 pointwise.weight
    (a 1x1 kernel, a matrix), 3 pointwise.bias, 4 fc1.weight (40, 192, wide), 5 fc1.bias,
    6 fc2.weight (48, 40, tall), 7 fc2.bias, 8-9 norm, 10 head.weight, 11 head.bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)  # 1152 entries: Tucker-2 with min_conv_numel=0
        self.pointwise = torch.nn.Conv2d(16, 12, 1)
        self.fc1 = torch.nn.Linear(12 * 4 * 4, 40)  # (40, 192): wide, transposed orientation
        self.fc2 = torch.nn.Linear(40, 48)  # (48, 40): tall
        self.norm = torch.nn.LayerNorm(48)
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.pointwise(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        x = torch.relu(self.fc1(x))
        return self.head(self.norm(torch.relu(self.fc2(x))))


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet().to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    # Batches well above the ranks (see the rank-deficiency note in low_cost_svd).
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 8, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (size,), generator=g)
    return x, y


def train(model, opt, steps: int, start: int = 0, dtype: torch.dtype = torch.float32) -> list[float]:
    """``steps`` steps of cross-entropy on :func:`batch` ``start``, ``start + 1``, ...: the losses."""
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, dtype)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
