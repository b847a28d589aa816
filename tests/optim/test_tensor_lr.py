"""Learning rates given as tensors train exactly as the same lr given as a Python float."""

from __future__ import annotations

import io

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from helpers.nets import make_net, train
from helpers.optim_db import COAP_KWARGS

LR = 3e-3
COAP = {k: v for k, v in COAP_KWARGS.items() if k != "lr"}  # T_u 3, lambda 2: Eq. 2 at 3, SVD at 6
OPTIMIZERS = {
    "CoapAdamW": lambda params, lr: CoapAdamW(params, lr=lr, **COAP),
    "CoapAdamW8bit": lambda params, lr: CoapAdamW8bit(params, lr=lr, min_8bit_size=256, **COAP),
    "CoapAdafactor": lambda params, lr: CoapAdafactor(params, lr=lr, beta1=0.9, **COAP),
    "CoapAdafactor8bit": lambda params, lr: CoapAdafactor8bit(params, lr=lr, beta1=0.9, min_8bit_size=256, **COAP),
}
# float64 tensors hold the float's exact value, also after a scheduler's in-place updates
# (torch's schedulers fill_ a tensor lr).
FORMS = {
    "0-dim": lambda: torch.tensor(LR, dtype=torch.float64),
    "shape-1": lambda: torch.tensor([LR], dtype=torch.float64),
    "shape-1x1": lambda: torch.tensor([[LR]], dtype=torch.float64),
}
STEPS = 8


def _run(name: str, lr, *, resume_at: int | None = None):
    model = make_net()
    opt = OPTIMIZERS[name](model.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=5)
    losses = []
    for step in range(STEPS):
        if step == resume_at:  # a state_dict round trip into a new optimizer and scheduler
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            opt = OPTIMIZERS[name](model.parameters(), lr)
            scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=5)
            opt.load_state_dict(saved["opt"])
            scheduler.load_state_dict(saved["sched"])
        losses += train(model, opt, 1, start=step)
        scheduler.step()
    return losses, [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("resume_at", [None, 4], ids=["straight", "resumed"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tensor_lr_trains_bitwise_as_the_float(name, form, resume_at):
    float_losses, float_params, float_opt = _run(name, LR, resume_at=resume_at)
    losses, params, opt = _run(name, FORMS[form](), resume_at=resume_at)
    assert losses == float_losses
    for p, q in zip(params, float_params):
        assert torch.equal(p, q)
    for p, q in zip(opt.param_groups[0]["params"], float_opt.param_groups[0]["params"]):
        for key, value in float_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    kinds = {tuple(sorted(k for k in s if k.startswith("proj"))) for s in opt.state.values()}
    assert kinds == {(), ("proj",), ("proj_in", "proj_out")}  # dense, matrix and Tucker-2 all covered
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the user's tensor, updated by the scheduler


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tensor_lr_with_several_elements_is_refused_naming_lr_and_its_shape(name):
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    with pytest.raises(ValueError, match=r"Invalid lr: a tensor of shape \(2,\)"):
        OPTIMIZERS[name](params, torch.tensor([LR, LR]))
    opt = OPTIMIZERS[name](params, LR)
    with pytest.raises(ValueError, match=r"param group 1: Invalid lr: a tensor of shape \(1, 3\)"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4))], "lr": torch.full((1, 3), LR)})
    assert len(opt.param_groups) == 1
