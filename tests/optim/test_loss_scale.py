"""A sum-reduced loss trains like the mean-reduced one, as with AdamW (the Eq. 2 step is clipped).

The objective of Eq. 2 scales like |G|^2: at a gradient RMS of ~250 the printed step moves P
far from orthonormal and training diverges. The default ``correlation_max_norm`` bounds the step
and re-orthonormalizes; ``benchmarks/bench_loss_scale.py`` measures the same on longer runs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

# At the paper's update size (scale 1), for which the 10% tolerance below was set: the two runs'
# Eq. 2 steps are clipped at different points, and the larger "auto" steps amplify that (the
# 8-bit Adafactor run ends 22% apart there, where the float32 runs stay within 10%).
COAP = {"rank_ratio_matrix": 2, "rank_ratio_cnn": 2, "update_interval": 4, "reproject_factor": 5, "scale": 1.0}
OPTIMIZERS = {
    "CoapAdamW": lambda p, **kw: CoapAdamW(p, lr=1e-2, **COAP, **kw),
    "CoapAdamW8bit": lambda p, **kw: CoapAdamW8bit(p, lr=1e-2, min_8bit_size=256, **COAP, **kw),
    # Adafactor with a manual lr unscaled by the weights' RMS, so that 30 steps train visibly.
    "CoapAdafactor": lambda p, **kw: CoapAdafactor(p, lr=1e-2, beta1=0.9, scale_parameter=False, **COAP, **kw),
    "CoapAdafactor8bit": lambda p, **kw: CoapAdafactor8bit(
        p, lr=1e-2, beta1=0.9, scale_parameter=False, min_8bit_size=256, **COAP, **kw
    ),
}
STEPS = 30


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(),  # Tucker-2
        torch.nn.Flatten(), torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, 8, 8, generator=generator)
    with torch.no_grad():
        y = 300.0 * _net(1)(x)  # a sum-reduced gradient RMS of ~250
    return x, y


def _train(make_opt, reduction: str, data, **options) -> tuple[float, float]:
    x, y = data
    model = _net(0)
    opt = make_opt(model.parameters(), **options)
    defect = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the faithful run's refreshes meet NaN
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y, reduction=reduction).backward()
            opt.step()
            for state in opt.state.values():
                for key in ("proj", "proj_out", "proj_in"):
                    if key in state:
                        P = state[key]
                        defect = max(defect, (P.mT @ P - torch.eye(P.shape[-1])).abs().max().item())
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item(), defect


# The 8-bit variants share the 32-bit ones' refresh and clip; their runs are the slow tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "8bit" in n else n for n in OPTIMIZERS])
def test_sum_reduced_loss_trains_like_the_mean_reduced_one(name, data):
    mean_loss, mean_defect = _train(OPTIMIZERS[name], "mean", data)
    sum_loss, sum_defect = _train(OPTIMIZERS[name], "sum", data)
    start = torch.nn.functional.mse_loss(_net(0)(data[0]), data[1]).item()
    assert math.isfinite(sum_loss) and sum_loss < 0.5 * start  # it trains
    assert sum_loss == pytest.approx(mean_loss, rel=0.1)  # like the mean-reduced run, in the same units
    assert max(mean_defect, sum_defect) <= 1e-3 + 1e-6  # P stays orthonormal between SVDs


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_printed_step_diverges_on_the_same_loss(name, data):
    # What the clip prevents: without it, the same run blows up (weights or P non-finite / huge).
    sum_loss, defect = _train(OPTIMIZERS[name], "sum", data, correlation_max_norm=None)
    assert not math.isfinite(sum_loss) or sum_loss > 1e3 * data[1].square().mean().item() or defect > 1.0


def test_adamw_itself_is_scale_invariant(data):
    def adamw(params, **_):
        return torch.optim.AdamW(params, lr=1e-2)

    mean_loss, _ = _train(adamw, "mean", data)
    sum_loss, _ = _train(adamw, "sum", data)
    assert sum_loss == pytest.approx(mean_loss, rel=1e-3)
