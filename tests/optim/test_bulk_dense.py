"""Small dense tensors are stepped together (torch._foreach_*): bitwise the per-tensor result."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW, CoapAdamW8bit
from coap_torch.optim._base import BULK_MAX_NUMEL
from coap_torch.optim.adamw import AdamRule
from helpers.nets import make_net, train
from helpers.optim_db import COAP_KWARGS


class _PerTensorAdam(AdamRule):
    bulk = False


class PerTensorAdamW(CoapAdamW):
    rule = _PerTensorAdam()


class PerTensorAdamW8bit(CoapAdamW8bit):
    rule = _PerTensorAdam()


def _run(cls, steps=7, dtype=torch.float32, **kwargs):
    model = make_net(dtype=dtype)
    opt = cls(model.parameters(), **{**COAP_KWARGS, **kwargs})
    losses = train(model, opt, steps, dtype=dtype)
    return model, opt, losses


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1}, {"amsgrad": True}, {"betas": (0.5, 0.9), "eps": 1e-6}],
    ids=["default", "decay", "amsgrad", "betas"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bulk_equals_per_tensor_bitwise(kwargs, dtype):
    bulk_model, bulk_opt, bulk_losses = _run(CoapAdamW, dtype=dtype, **kwargs)
    ref_model, ref_opt, ref_losses = _run(PerTensorAdamW, dtype=dtype, **kwargs)
    assert bulk_losses == ref_losses
    for (name, a), b in zip(bulk_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        for key, value in ref_opt.state[b].items():
            assert torch.equal(bulk_opt.state[a][key], value), (name, key)


@pytest.mark.parametrize(
    ("bulk_cls", "ref_cls", "kwargs"),
    [
        (CoapAdamW, PerTensorAdamW, {"state_dtype": torch.bfloat16}),
        (CoapAdamW8bit, PerTensorAdamW8bit, {"min_8bit_size": 16}),  # the norm's moments 8-bit too
        (CoapAdamW8bit, PerTensorAdamW8bit, {"state_dtype": "bf16"}),
    ],
    ids=["bf16", "8bit", "8bit-bf16"],
)
def test_bulk_with_stored_moments_equals_per_tensor_bitwise(bulk_cls, ref_cls, kwargs):
    # bfloat16 and 8-bit moments are unpacked for the bulk update and packed back, exactly as the
    # per-tensor path does (the same stochastic-rounding streams included).
    bulk_model, bulk_opt, bulk_losses = _run(bulk_cls, **kwargs)
    ref_model, ref_opt, ref_losses = _run(ref_cls, **kwargs)
    assert bulk_losses == ref_losses
    norm = bulk_model.norm.weight
    assert bulk_opt._bulk_key(norm, bulk_opt.param_groups[0]) is not None
    for (name, a), b in zip(bulk_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name
        assert bulk_opt.state[a].keys() == ref_opt.state[b].keys(), name
        for key, value in ref_opt.state[b].items():
            assert torch.equal(bulk_opt.state[a][key], value), (name, key)
            assert bulk_opt.state[a][key].dtype == value.dtype, (name, key)


def test_bulk_takes_the_small_dense_tensors_only():
    model = make_net()
    big = torch.nn.Parameter(torch.zeros(BULK_MAX_NUMEL + 1))
    opt = CoapAdamW([{"params": list(model.parameters())}, {"params": [big]}], **COAP_KWARGS)
    train(model, opt, 1)
    big.grad = torch.ones_like(big)
    group = opt.param_groups[0]
    assert opt._bulk_key(model.norm.weight, group) is not None
    assert opt._bulk_key(model.fc1.bias, group) is not None
    assert opt._bulk_key(model.fc1.weight, group) is None  # projected
    assert opt._bulk_key(big, opt.param_groups[1]) is None  # too large: temporaries stay small
    maximize = CoapAdamW([model.norm.weight], maximize=True)
    assert maximize._bulk_key(model.norm.weight, maximize.param_groups[0]) is None
    eight_bit = CoapAdamW8bit(model.parameters(), **COAP_KWARGS)  # 8-bit storage: bulk as well
    assert eight_bit._bulk_key(model.norm.weight, eight_bit.param_groups[0]) is not None


def test_bulk_matches_torch_adamw_on_dense_groups():
    model = make_net()
    reference = make_net()
    opt = CoapAdamW(model.parameters(), coap=False, lr=3e-3, weight_decay=0.05)
    ref = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.05, foreach=False)
    train(model, opt, 5)
    train(reference, ref, 5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        # Small tensors went through the bulk path, the rest one by one: both as torch computes them
        # (torch folds 1 / (1 - beta1^t) into the step size, so equal up to rounding).
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_bulk_state_round_trips_and_continues(tmp_path):
    model, opt, _ = _run(CoapAdamW, steps=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    restored_model = make_net()
    restored_model.load_state_dict(model.state_dict())
    restored = CoapAdamW(restored_model.parameters(), **COAP_KWARGS)
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(model, opt, 3, start=3)
    train(restored_model, restored, 3, start=3)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("marker", ["_fsdp_flattened", "ds_id"])
def test_engine_managed_small_tensors_are_still_refused(marker):
    flat = torch.nn.Parameter(torch.zeros(64))
    setattr(flat, marker, True)
    opt = CoapAdamW([flat])
    flat.grad = torch.ones_like(flat)
    assert opt._bulk_key(flat, opt.param_groups[0]) is None
    with pytest.raises(ValueError, match="FSDP1|DeepSpeed"):
        opt.step()
