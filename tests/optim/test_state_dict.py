"""Checkpoints: plain tensors, weights_only round trip, bit-exact resume, no dtype casts."""

from __future__ import annotations

import io

import pytest
import torch

from helpers.nets import make_net, train
from helpers.optim_db import OPTIM_DB, OPTIMIZERS


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_state_holds_only_tensors_and_numbers(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    train(model, opt, 4)
    sd = opt.state_dict()
    for state in sd["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    kinds = {tuple(sorted(k for k in s if k.startswith("proj"))) for s in sd["state"].values()}
    assert kinds == {(), ("proj",), ("proj_in", "proj_out")}  # dense, matrix and Tucker-2 all present
    _roundtrip(sd)  # would raise on any pickled Python object


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_resume_is_bit_exact_across_refreshes(make_opt):
    steps_before, steps_after = 5, 9  # T_u=3, lambda=2: the resumed run crosses Eq. 2 and SVD refreshes
    model = make_net()
    opt = make_opt(model.parameters())
    train(model, opt, steps_before)
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    reference_losses = train(model, opt, steps_after, start=steps_before)

    resumed = make_net(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make_opt(resumed.parameters())
    opt2.load_state_dict(checkpoint["opt"])
    resumed_losses = train(resumed, opt2, steps_after, start=steps_before)

    assert resumed_losses == reference_losses
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


@pytest.mark.parametrize("entry", OPTIM_DB, ids=str)
def test_loading_keeps_the_state_dtype_of_bf16_params(entry):
    make_opt = entry.make
    float_state = entry.float_state_dtype(torch.bfloat16)  # float32 unless the config asks for bf16
    model = make_net(dtype=torch.bfloat16)
    opt = make_opt(model.parameters())
    train(model, opt, 4, dtype=torch.bfloat16)
    sd = _roundtrip(opt.state_dict())
    opt2 = make_opt(model.parameters())
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt2.state[p].items():
            if key == "step":
                assert value.dtype == torch.int64 and value.device.type == "cpu"
            else:
                expected = torch.uint8 if key.endswith("_codes") else float_state
                assert value.dtype == (torch.float32 if key.endswith("_absmax") else expected), key
                assert torch.equal(value, opt.state[p][key])


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_load_does_not_alias_the_checkpoint(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    saved = {k: {n: t.clone() for n, t in s.items()} for k, s in sd["state"].items()}
    opt.load_state_dict(sd)
    train(model, opt, 2, start=2)
    for k, state in saved.items():
        for name, value in state.items():
            assert torch.equal(sd["state"][k][name], value)


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_old_checkpoint_without_new_group_options_loads(make_opt):
    model = make_net()
    opt = make_opt(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["correlation_max_norm"], group["scale"]
    opt2 = make_opt(model.parameters(), scale=0.5, correlation_max_norm=2.0)
    opt2.load_state_dict(sd)
    train(model, opt2, 1, start=2)
    # COAP options a checkpoint lacks are the optimizer's own: its constructor's values, not the
    # defaults. ``scale`` sizes the update like lr and comes from the checkpoint: one that lacks
    # it was written by a version that did not scale, so it resumes unscaled.
    assert opt2.param_groups[0]["correlation_max_norm"] == 2.0
    assert opt2.param_groups[0]["scale"] == 1.0
