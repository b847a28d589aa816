"""``state_dtype=torch.bfloat16``: P and every moment in bfloat16, second moments stochastically
rounded from the optimizer's own streams; the same guarantees as float32 state."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_torch.utils import estimate_state_bytes, optimizer_state_nbytes
from helpers.nets import make_net, train
from helpers.optim_db import COAP_KWARGS

ADAFACTOR = {"lr": 1e-2, "relative_step": False, "beta1": 0.9}
CASES = {
    "CoapAdamW": (CoapAdamW, COAP_KWARGS),
    "CoapAdamW8bit": (CoapAdamW8bit, {**COAP_KWARGS, "min_8bit_size": 256}),
    "CoapAdafactor": (CoapAdafactor, {**COAP_KWARGS, **ADAFACTOR}),
    "CoapAdafactor8bit": (CoapAdafactor8bit, {**COAP_KWARGS, **ADAFACTOR, "min_8bit_size": 256}),
}


def _trained(name, steps=7, **options):
    cls, kwargs = CASES[name]
    model = make_net()
    opt = cls(model.parameters(), **{**kwargs, **options})
    losses = train(model, opt, steps)
    return model, opt, losses


@pytest.mark.parametrize("spelling", [torch.bfloat16, "bfloat16", "bf16"])
def test_spellings_become_the_dtype(spelling):
    opt = CoapAdamW(make_net().parameters(), state_dtype=spelling)
    assert opt.param_groups[0]["state_dtype"] is torch.bfloat16
    assert opt.defaults["state_dtype"] is torch.bfloat16
    assert CoapAdamW(make_net().parameters(), state_dtype="fp32").param_groups[0]["state_dtype"] is torch.float32
    assert CoapAdamW(make_net().parameters()).param_groups[0]["state_dtype"] is torch.float32  # the default


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, "half", 16, None])
def test_other_values_are_refused_with_the_value(bad):
    with pytest.raises(ValueError, match=r"Invalid state_dtype: .*must be torch.float32 or torch.bfloat16"):
        CoapAdamW(make_net().parameters(), state_dtype=bad)
    opt = CoapAdamW(make_net().parameters())
    with pytest.raises(ValueError, match=r"param group 1: Invalid state_dtype"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "state_dtype": bad})


@pytest.mark.parametrize("name", CASES)
def test_every_floating_entry_is_bfloat16(name):
    model, opt, _ = _trained(name, state_dtype=torch.bfloat16)
    kinds = set()
    for param in model.parameters():
        for key, value in opt.state[param].items():
            if key == "step":
                assert value.dtype == torch.int64
            elif key.endswith("_codes"):
                assert value.dtype == torch.uint8
            elif key.endswith("_absmax"):
                assert value.dtype == torch.float32  # the 8-bit scales stay float32
            else:
                assert value.dtype == torch.bfloat16, key
                kinds.add(key)
    assert {"proj", "proj_in", "proj_out"} <= kinds  # matrices and Tucker-2 kernels
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_per_group_option():
    model = make_net()
    opt = CoapAdamW(
        [
            {"params": [model.fc1.weight, model.fc2.weight], "state_dtype": "bf16"},
            {"params": [model.head.weight, model.norm.weight]},
        ],
        **COAP_KWARGS,
    )
    for param in model.parameters():
        if param not in {model.fc1.weight, model.fc2.weight, model.head.weight, model.norm.weight}:
            param.requires_grad_(False)
    train(model, opt, 4)
    assert opt.state[model.fc1.weight]["proj"].dtype == torch.bfloat16
    assert opt.state[model.head.weight]["proj"].dtype == torch.float32
    assert opt.state[model.norm.weight]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("name", CASES)
def test_bytes_match_the_estimate_and_halve_what_is_not_8bit(name):
    model, opt, _ = _trained(name, state_dtype=torch.bfloat16)
    _, full, _ = _trained(name)
    cls, kwargs = CASES[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "lr" or "Adafactor" in name}
    assert optimizer_state_nbytes(opt) == estimate_state_bytes(model, name_of(cls), state_dtype="bf16", **kwargs).total
    half = 0
    for state in full.state.values():
        for key, value in state.items():
            if key != "step":
                shrink = 2 if value.dtype == torch.float32 and not key.endswith("_absmax") else 1
                half += value.numel() * value.element_size() // shrink
    assert optimizer_state_nbytes(opt) == half


def name_of(cls) -> str:
    return {CoapAdamW: "coap_adamw", CoapAdamW8bit: "coap_adamw8bit", CoapAdafactor: "coap_adafactor",
            CoapAdafactor8bit: "coap_adafactor8bit"}[cls]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_trains_like_float32_state(name):
    # bfloat16 state is a rounding of float32 state: the losses follow the float32 run closely.
    _, _, low = _trained(name, steps=12, state_dtype=torch.bfloat16)
    _, _, full = _trained(name, steps=12)
    assert low[-1] < low[0]
    torch.testing.assert_close(torch.tensor(low), torch.tensor(full), rtol=0.02, atol=0)


def test_reproducible_and_the_global_rng_is_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model_a, opt_a, losses_a = _trained("CoapAdamW", state_dtype="bf16")
    model_b, opt_b, losses_b = _trained("CoapAdamW", state_dtype="bf16")
    assert losses_a == losses_b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])
    # make_net seeds the global RNG; the optimizers draw nothing from it.
    model = make_net()
    state = torch.get_rng_state()
    train(model, CoapAdamW(model.parameters(), state_dtype="bf16", **COAP_KWARGS), 7)
    assert torch.equal(torch.get_rng_state(), state)
    del before


def test_second_moments_are_rounded_stochastically_first_moments_to_nearest():
    # The stored second moment differs from round-to-nearest of the float32 value it came from in
    # some entries (rounded up or down at random); the first moment never does.
    model = make_net()
    opt = CoapAdamW(model.parameters(), state_dtype="bf16", **COAP_KWARGS)
    train(model, opt, 1)
    weight = model.fc1.weight
    stored = {key: value.clone() for key, value in opt.state[weight].items()}
    captured = {}
    storage_pack = type(opt.storage).pack

    def spy(self, work, state, *args, **kwargs):
        if state is opt.state[weight]:
            captured.update({k: v.clone() for k, v in work.items() if isinstance(v, torch.Tensor)})
        return storage_pack(self, work, state, *args, **kwargs)

    type(opt.storage).pack = spy
    try:
        train(model, opt, 1, start=1)
    finally:
        type(opt.storage).pack = storage_pack
    assert stored["exp_avg"].dtype == torch.bfloat16
    state = opt.state[weight]
    assert torch.equal(state["exp_avg"], captured["exp_avg"].to(torch.bfloat16))
    assert torch.equal(state["proj"], captured["proj"].to(torch.bfloat16))
    nearest = captured["exp_avg_sq"].to(torch.bfloat16)
    assert not torch.equal(state["exp_avg_sq"], nearest)
    low = (captured["exp_avg_sq"].view(torch.int32) & -(1 << 16)).view(torch.float32)
    high = (low.view(torch.int32) + (1 << 16)).view(torch.float32)
    value = state["exp_avg_sq"].float()
    assert torch.all((value == low) | (value == high))


def test_projection_stays_orthonormal_through_eq2_steps_and_rotations():
    # A sum-reduced loss makes every Eq. 2 step move P (clipped, then retracted); bfloat16 storage
    # rounds P after each. The defect |P^T P - I| is measured after every refresh: it stays at the
    # rounding level of a bf16 matrix (the Eq. 2 step re-orthonormalizes whenever its result is
    # more than ORTHONORMALITY_TOLERANCE away, so rounding errors never accumulate).
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 192, bias=False)
    opt = CoapAdamW(layer.parameters(), lr=1e-3, rank=24, update_interval=1, reproject_factor=10**6,
                    correlation_lr=0.05, state_dtype="bf16")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(96, 192, generator=generator)
    defects, moves = [], []
    previous = None
    for _ in range(300):
        x = torch.randn(256, 96, generator=generator)
        opt.zero_grad()
        (layer(x) - x @ target).square().sum().backward()
        opt.step()
        P = opt.state[layer.weight]["proj"].double()
        defects.append((P.mT @ P - torch.eye(24, dtype=torch.float64)).abs().max().item())
        if previous is not None:
            moves.append((P - previous).abs().max().item())
        previous = P
    assert sum(move > 0 for move in moves) > 250  # P does move at (nearly) every Eq. 2 step
    bf16_unit = 2.0**-8
    assert max(defects) < 4 * bf16_unit  # a few bf16 units: rounding, not drift
    assert max(defects[-50:]) <= 1.5 * max(defects[:50])


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", CASES)
def test_resume_is_bitwise(name):
    cls, kwargs = CASES[name]
    model, opt, _ = _trained(name, steps=5, state_dtype="bf16")
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    losses = train(model, opt, 5, start=5)
    resumed = make_net(seed=3)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = cls(resumed.parameters(), **kwargs, state_dtype="bf16")
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert train(resumed, resumed_opt, 5, start=5) == losses
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(resumed_opt.state[q][key], value) and resumed_opt.state[q][key].dtype == value.dtype


def test_checkpoints_convert_between_precisions_with_a_warning():
    model, opt, _ = _trained("CoapAdamW", steps=4)
    full = _roundtrip(opt.state_dict())
    low_opt = CoapAdamW(model.parameters(), **COAP_KWARGS, state_dtype="bf16")
    with pytest.warns(UserWarning, match=r"state_dtype: checkpoint torch.float32, kept torch.bfloat16"):
        low_opt.load_state_dict(full)
    for param in model.parameters():
        for key, value in opt.state[param].items():
            loaded = low_opt.state[param][key]
            if key != "step":
                assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, value.to(torch.bfloat16)), key
    back = CoapAdamW(model.parameters(), **COAP_KWARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        back.load_state_dict(_roundtrip(low_opt.state_dict()))
    for param in model.parameters():
        for key, value in low_opt.state[param].items():
            if key != "step":
                assert back.state[param][key].dtype == torch.float32
                assert torch.equal(back.state[param][key], value.float())
    train(model, back, 2, start=4)
