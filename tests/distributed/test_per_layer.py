"""Per-layer updates during backward: the same training as regular step(), with less memory."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.optim import enable_per_layer_updates
from coap_torch.utils.allocations import PeakAllocations
from helpers.nets import batch, make_net
from helpers.optim_db import OPTIMIZERS

STEPS = 7  # T_u=3, lambda=2: crosses an Eq. 2 step (3) and a re-projection (6)


def _train(model, opt, accumulation: int, per_layer: bool, scheduler=None) -> None:
    updates = enable_per_layer_updates(opt) if per_layer else None
    for step in range(STEPS):
        x, y = batch(step)
        micro = list(zip(x.chunk(accumulation), y.chunk(accumulation)))
        for i, (xb, yb) in enumerate(micro):
            pause = updates.no_update() if updates is not None and i < len(micro) - 1 else torch.enable_grad()
            with pause:
                (torch.nn.functional.cross_entropy(model(xb), yb) / accumulation).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    if updates is not None:
        updates.remove()


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no-accumulation", "accumulation"])
@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_per_layer_equals_regular_steps(make_opt, accumulation):
    results = []
    for per_layer in (False, True):
        model = make_net()
        opt = make_opt(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if opt.defaults.get("lr") else None
        _train(model, opt, accumulation, per_layer, scheduler)
        results.append((model, opt))
    (regular, opt_regular), (per_layer_model, opt_per_layer) = results
    for p, q in zip(regular.parameters(), per_layer_model.parameters()):
        assert torch.equal(p, q)
        assert q.grad is None  # freed right after the update
    sd_regular, sd_per_layer = opt_regular.state_dict(), opt_per_layer.state_dict()
    assert sd_regular["param_groups"] == sd_per_layer["param_groups"]  # the scheduler drove both
    for key, state in sd_regular["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sd_per_layer["state"][key][name]), name


def test_clipping_is_refused():
    opt = CoapAdamW(make_net().parameters())
    with pytest.raises(ValueError, match="max_grad_norm=1.0: gradient clipping across the model"):
        enable_per_layer_updates(opt, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="need a COAP optimizer"):
        enable_per_layer_updates(torch.optim.AdamW(make_net().parameters()))


def test_should_update_callback_controls_the_boundary():
    model = make_net()
    opt = CoapAdamW(model.parameters(), lr=1e-3)
    boundary = {"now": False}
    updates = enable_per_layer_updates(opt, should_update=lambda: boundary["now"])
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert not opt.state and model.fc1.weight.grad is not None
    boundary["now"] = True
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert int(opt.state[model.fc1.weight]["step"]) == 1 and model.fc1.weight.grad is None
    updates.remove()


def _peak(per_layer: bool) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = CoapAdamW(model.parameters(), lr=1e-3, rank=32)
    x = torch.randn(64, 256)
    model(x).square().mean().backward()  # state exists before the measured step in both runs
    opt.step()
    opt.zero_grad()
    updates = enable_per_layer_updates(opt) if per_layer else None
    with PeakAllocations() as peak:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    if updates is not None:
        updates.remove()
    return peak.peak_bytes


def test_per_layer_lowers_peak_memory_by_about_the_gradients():
    gradients = 8 * (256 * 256 + 256) * 4
    regular, per_layer = _peak(False), _peak(True)
    # Regular training holds every gradient at the end of backward; per-layer holds about one.
    assert regular - per_layer > 0.6 * gradients, (regular, per_layer, gradients)
