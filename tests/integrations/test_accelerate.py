"""Accelerate: parameters swapped after the optimizer is built are picked up at their first step."""

from __future__ import annotations

import pytest
import torch

from helpers.nets import make_net, train
from helpers.optim_db import OPTIMIZERS


def _swap_parameters(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    # What Accelerate does when it re-creates parameters (FSDP2, device moves): new Parameter
    # objects in the model, and the optimizer's param_groups re-pointed at them.
    mapping = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            new = torch.nn.Parameter(param.detach().clone())
            setattr(module, name, new)
            mapping[param] = new
    for group in opt.param_groups:
        group["params"] = [mapping[p] for p in group["params"]]


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_parameter_swap_after_construction(make_opt):
    reference = make_net()
    reference_opt = make_opt(reference.parameters())
    train(reference, reference_opt, 7)

    model = make_net()
    opt = make_opt(model.parameters())
    _swap_parameters(model, opt)
    train(model, opt, 7)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert all(p in opt.state for p in model.parameters())


def test_accelerator_prepare():
    accelerate = pytest.importorskip("accelerate")
    reference = make_net()
    reference_opt = OPTIMIZERS["CoapAdamW"](reference.parameters())
    train(reference, reference_opt, 4)

    accelerator = accelerate.Accelerator(cpu=True)
    model = make_net()
    model, opt = accelerator.prepare(model, OPTIMIZERS["CoapAdamW"](model.parameters()))
    train(model, opt, 4)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    state = opt.optimizer.state_dict()
    assert len(state["state"]) == len(list(model.parameters()))
