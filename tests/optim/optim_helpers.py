from __future__ import annotations

import torch


class SmallNet(torch.nn.Module):
    """A conv kernel (Tucker-2), a 1x1 conv (matrix), matrices of both orientations, 1-D params."""

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
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, dtype)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


COAP_KWARGS = {
    "lr": 3e-3,
    "rank_ratio_matrix": 2,
    "rank_ratio_cnn": 2,
    "update_interval": 3,
    "reproject_factor": 2,
    "min_conv_numel": 0,
}

_COAP_ONLY = {k: v for k, v in COAP_KWARGS.items() if k != "lr"}


def _coap_adamw(params, **overrides):
    from coap_torch import CoapAdamW

    return CoapAdamW(params, **{**COAP_KWARGS, **overrides})


def _coap_adafactor(params, **overrides):
    from coap_torch import CoapAdafactor

    return CoapAdafactor(params, **{**_COAP_ONLY, **overrides})


def _coap_adafactor_beta1(params, **overrides):
    from coap_torch import CoapAdafactor

    return CoapAdafactor(params, **{**_COAP_ONLY, "beta1": 0.9, "lr": 1e-2, "relative_step": False, **overrides})


def _coap_adamw8bit(params, **overrides):
    from coap_torch import CoapAdamW8bit

    return CoapAdamW8bit(params, **{**COAP_KWARGS, "min_8bit_size": 256, **overrides})


def _coap_adafactor8bit(params, **overrides):
    from coap_torch import CoapAdafactor8bit

    return CoapAdafactor8bit(params, **{**_COAP_ONLY, "beta1": 0.9, "min_8bit_size": 256, **overrides})


#: Every optimizer configuration that the contract tests run over (an OptimizerInfo-style table).
OPTIMIZERS = {
    "CoapAdamW": _coap_adamw,
    "CoapAdafactor": _coap_adafactor,
    "CoapAdafactor-beta1": _coap_adafactor_beta1,
    "CoapAdamW8bit": _coap_adamw8bit,
    "CoapAdafactor8bit": _coap_adafactor8bit,
}
