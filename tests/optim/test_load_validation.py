"""load_state_dict checks a checkpoint against the optimizer before anything changes: foreign or
damaged state is refused with a message naming the parameter and the key, what torch would
convert is converted, and the optimizer's own COAP options are kept."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from helpers.nets import SmallNet, batch, make_net, train
from helpers.optim_db import OPTIMIZERS

# SmallNet's parameters in optimizer order: 0 conv.weight (Tucker-2), 1 conv.bias,
# 2 pointwise.weight (a 1x1 kernel, a matrix), 3 pointwise.bias, 4 fc1.weight (40, 192, wide),
# 5 fc1.bias, 6 fc2.weight (48, 40, tall), 7 fc2.bias, 8-9 norm, 10 head.weight, 11 head.bias.
FC2 = 6


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained(name: str = "CoapAdamW", steps: int = 4, **overrides):
    model = make_net()
    opt = OPTIMIZERS[name](model.parameters(), **overrides)
    train(model, opt, steps)
    return model, opt


def _snapshot(opt) -> tuple[list, dict]:
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return groups, state


def _assert_unchanged(opt, snapshot) -> None:
    groups, state = snapshot
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key


def _damage(kind: str):
    """A state dict of CoapAdamW on SmallNet after 4 steps, damaged as ``kind`` says."""
    _, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    fc2 = sd["state"][FC2]
    if kind == "missing exp_avg":
        del fc2["exp_avg"]
    elif kind == "missing step":
        del fc2["step"]
    elif kind == "exp_avg of another width":
        fc2["exp_avg"] = torch.zeros(48, 7)
    elif kind == "exp_avg of an integer dtype":
        fc2["exp_avg"] = torch.zeros(fc2["exp_avg"].shape, dtype=torch.int32)
    elif kind == "NaN in P":
        fc2["proj"][3, 2] = float("nan")
    elif kind == "step not a number":
        fc2["step"] = torch.tensor([1.0, 2.0])
    elif kind == "negative step":
        fc2["step"] = torch.tensor(-3.0)
    elif kind == "state not a dict":
        sd["state"][FC2] = torch.zeros(3)
    return sd


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing exp_avg", r"parameter 6 of shape \(48, 40\).*missing \['exp_avg'\]"),
        ("missing step", r"parameter 6 of shape \(48, 40\).*no 'step'"),
        ("exp_avg of another width", r"parameter 6 .*state 'exp_avg' has shape \(48, 7\), expected \(48, 20\)"),
        ("exp_avg of an integer dtype", r"parameter 6 .*'exp_avg' has dtype torch.int32, expected a floating-point"),
        ("NaN in P", r"parameter 6 .*'proj' \(a projection\) holds non-finite values"),
        ("step not a number", r"parameter 6 .*'step' must be a number"),
        ("negative step", r"parameter 6 .*'step' must be a non-negative integer"),
        ("state not a dict", r"parameter 6 .*not a dict"),
    ],
)
def test_damaged_state_is_refused_at_load_and_changes_nothing(kind, message):
    model, opt = _trained(steps=2)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_damage(kind))
    _assert_unchanged(opt, before)
    train(model, opt, 2, start=2)  # and it still trains


@pytest.mark.parametrize(
    "source,target,message",
    [
        ("CoapAdamW8bit", "CoapAdamW", r"unexpected \['exp_avg_absmax', 'exp_avg_codes'.*8-bit"),
        ("CoapAdamW", "CoapAdamW8bit", r"missing \['exp_avg_absmax', 'exp_avg_codes'"),
        ("CoapAdafactor-beta1", "CoapAdamW", r"unexpected \['exp_avg_sq_col', 'exp_avg_sq_row'\].*Adafactor"),
        (
            "CoapAdamW",
            "CoapAdafactor-beta1",
            r"missing \['exp_avg_sq_col', 'exp_avg_sq_row'\].*unexpected \['exp_avg_sq'\]",
        ),
    ],
)
def test_state_of_another_optimizer_is_refused(source, target, message):
    _, written = _trained(source)
    model = make_net()
    opt = OPTIMIZERS[target](model.parameters())
    train(model, opt, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_roundtrip(written.state_dict()))
    _assert_unchanged(opt, before)


def test_hyper_parameters_that_shape_the_state_come_with_it():
    # beta1 is a hyper-parameter: as in torch, the checkpoint's value is loaded, and with it the
    # state it shapes (no first moment here).
    _, written = _trained("CoapAdafactor")
    model = make_net()
    opt = OPTIMIZERS["CoapAdafactor-beta1"](model.parameters())
    opt.load_state_dict(_roundtrip(written.state_dict()))
    assert opt.param_groups[0]["beta1"] is None
    train(model, opt, 2, start=4)
    assert all("exp_avg" not in state for state in opt.state.values())


class _WiderNet(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = torch.nn.Linear(40, 60)  # P (40, 20) as before; the moments (60, 20) are not
        self.norm = torch.nn.LayerNorm(60)
        self.head = torch.nn.Linear(60, 10)


def test_state_of_a_model_of_another_shape_with_the_same_projection_is_refused():
    _, written = _trained()
    opt = OPTIMIZERS["CoapAdamW"](_WiderNet().parameters())
    with pytest.raises(
        ValueError, match=r"parameter 6 of shape \(60, 40\): state 'exp_avg' has shape \(48, 20\), expected \(60, 20\)"
    ):
        opt.load_state_dict(_roundtrip(written.state_dict()))
    assert len(opt.state) == 0


def test_state_written_with_another_rank_names_the_option():
    _, written = _trained(rank_ratio_matrix=4)
    opt = OPTIMIZERS["CoapAdamW"](make_net().parameters())  # rank_ratio_matrix=2
    with pytest.raises(ValueError, match=r"shape .*expected .*written with rank_ratio_matrix=4 \(this optimizer: 2\)"):
        opt.load_state_dict(_roundtrip(written.state_dict()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["CoapAdamW", "CoapAdafactor-beta1", "CoapAdamW8bit"])
def test_floating_state_of_another_dtype_is_converted(name, dtype):
    # As torch's AdamW converts a float64 checkpoint for a float32 model, and then resumes.
    model, opt = _trained(name)
    sd = _roundtrip(opt.state_dict())
    converted = copy.deepcopy(sd)
    for state in converted["state"].values():
        for key, value in state.items():
            if key != "step" and value.is_floating_point():
                state[key] = value.to(dtype)
    expected = {
        p: {k: v.to(dtype).float() if k != "step" and v.is_floating_point() else v for k, v in s.items()}
        for p, s in opt.state.items()
    }
    opt2 = OPTIMIZERS[name](model.parameters())
    opt2.load_state_dict(converted)
    for p, state in opt2.state.items():
        for key, value in state.items():
            assert value.dtype == opt.state[p][key].dtype, key
            assert torch.equal(value, expected[p][key]), key
    train(model, opt2, 3, start=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "as_saved",
    [lambda v: int(v), lambda v: float(v), lambda v: torch.tensor(float(v))],
    ids=["python-int", "python-float", "float32-tensor"],
)
def test_a_step_saved_as_a_number_or_a_float_tensor_resumes_bitwise(as_saved):
    model, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    reference = copy.deepcopy(sd)
    for state in sd["state"].values():
        state["step"] = as_saved(state["step"])
    copies = [make_net() for _ in range(2)]
    losses = []
    for net, checkpoint in zip(copies, (reference, sd)):
        net.load_state_dict(model.state_dict())
        resumed = OPTIMIZERS["CoapAdamW"](net.parameters())
        resumed.load_state_dict(checkpoint)
        assert all(s["step"].dtype == torch.int64 and int(s["step"]) == 4 for s in resumed.state.values())
        losses.append(train(net, resumed, 5, start=4))
    assert losses[0] == losses[1]
    for p, q in zip(*(net.parameters() for net in copies)):
        assert torch.equal(p, q)


def test_coap_options_are_kept_and_hyper_parameters_loaded_with_a_warning():
    _, written = _trained(update_interval=5, lr=1e-2)
    model = make_net()
    opt = OPTIMIZERS["CoapAdamW"](model.parameters(), lr=1e-3)  # update_interval=3
    with pytest.warns(UserWarning, match=r"kept this optimizer's COAP options.*update_interval: checkpoint 5, kept 3"):
        opt.load_state_dict(_roundtrip(written.state_dict()))
    assert opt.param_groups[0]["update_interval"] == 3  # ours
    assert opt.param_groups[0]["lr"] == 1e-2  # the checkpoint's, as in torch (schedulers rely on it)
    train(model, opt, 2, start=4)


def test_identical_options_load_without_a_warning():
    _, written = _trained()
    opt = OPTIMIZERS["CoapAdamW"](make_net().parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(_roundtrip(written.state_dict()))


def test_transformers_adafactor_state_loads_into_dense_coap_adafactor():
    transformers = pytest.importorskip("transformers.optimization")
    weights = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16))]
    reference = transformers.Adafactor(weights, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    for step in range(3):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(step))
        reference.step()
    sd = reference.state_dict()
    assert isinstance(sd["state"][0]["step"], int) and "RMS" in sd["state"][0]  # transformers' layout
    from coap_torch import CoapAdafactor

    ours = CoapAdafactor(
        [torch.nn.Parameter(w.detach().clone()) for w in weights], lr=1e-2, scale_parameter=False, beta1=0.9, coap=False
    )
    ours.load_state_dict(sd)
    state = ours.state[ours.param_groups[0]["params"][0]]
    assert int(state["step"]) == 3 and "RMS" not in state
    assert torch.equal(state["exp_avg_sq_row"], reference.state[weights[0]]["exp_avg_sq_row"])


def test_a_failed_first_step_of_an_earlier_version_loads_as_empty():
    model, opt = _trained(steps=2)
    sd = _roundtrip(opt.state_dict())
    sd["state"][FC2] = {"step": torch.tensor(0.0)}
    opt2 = OPTIMIZERS["CoapAdamW"](model.parameters())
    opt2.load_state_dict(sd)
    fc2 = list(model.parameters())[FC2]
    assert not opt2.state[fc2]
    x, y = batch(9)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt2.step()
    assert int(opt2.state[fc2]["step"]) == 1 and "proj" in opt2.state[fc2]
