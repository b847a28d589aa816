"""Generic tests driven by the optimizer database (tests/helpers/optim_db.py), for every optimizer.

Each entry's constructor inputs build and train, its error inputs are refused by the constructor
and by ``add_param_group`` with a message naming the argument and the value, it trains every dtype
it lists with state of the expected dtypes, and its supported features do what they say
(unsupported ones are unknown keywords).
"""

from __future__ import annotations

import pytest
import torch

from helpers.nets import batch, make_net, train
from helpers.optim_db import OPTIM_DB, OptimizerInfo

ERROR_CASES = [(entry, bad) for entry in OPTIM_DB for bad in entry.error_inputs]
GROUP_ERROR_CASES = [(entry, bad) for entry, bad in ERROR_CASES if bad.group]
INPUT_CASES = [(entry, kwargs) for entry in OPTIM_DB for kwargs in entry.constructor_inputs]
DTYPE_CASES = [(entry, dtype) for entry in OPTIM_DB for dtype in entry.dtypes]
FEATURES = ("amsgrad", "maximize", "relative_step")


def _weight(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(shape))


def _ids(cases) -> list[str]:
    return [f"{entry}-{other}" for entry, other in cases]


@pytest.mark.parametrize(("entry", "bad"), ERROR_CASES, ids=_ids(ERROR_CASES))
def test_constructor_refuses_error_inputs(entry: OptimizerInfo, bad):
    with pytest.raises(bad.error, match=bad.match):
        entry.make([_weight(8, 8)], **bad.kwargs)


@pytest.mark.parametrize(("entry", "bad"), GROUP_ERROR_CASES, ids=_ids(GROUP_ERROR_CASES))
def test_add_param_group_refuses_error_inputs_and_keeps_nothing(entry: OptimizerInfo, bad):
    opt = entry.make([_weight(8, 8)])
    extra = _weight(4, 4)
    with pytest.raises(bad.error, match=r"param group 1: .*" + bad.match):
        opt.add_param_group({"params": [extra], **bad.kwargs})
    assert len(opt.param_groups) == 1 and all(p is not extra for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize(("entry", "kwargs"), INPUT_CASES, ids=[f"{e}-{k or 'config'}" for e, k in INPUT_CASES])
def test_constructor_inputs_build_and_train(entry: OptimizerInfo, kwargs):
    model = make_net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = entry.make(model.parameters(), **kwargs)
    train(model, opt, 7)  # past an Eq. 2 step (3) and a low-cost SVD (6)
    for name, (p, q) in zip([n for n, _ in model.named_parameters()], zip(before, model.parameters())):
        assert torch.isfinite(q).all(), name
        assert not torch.equal(p, q), f"{name} did not move"
    projected = opt.state[model.fc1.weight]
    assert projected["proj"].shape[-1] == kwargs.get("rank", 20)
    first = any(key in projected for key in ("exp_avg", "exp_avg_codes"))
    assert first == (entry.first_moment or entry.config.get("beta1") is not None)


@pytest.mark.parametrize(("entry", "dtype"), DTYPE_CASES, ids=_ids(DTYPE_CASES))
def test_every_listed_dtype_trains_with_state_of_the_expected_dtype(entry: OptimizerInfo, dtype):
    model = make_net(dtype=dtype)
    opt = entry.make(model.parameters(), **({"lr": 1e-2} if entry.rule == "adam" else {}))
    x, y = batch(0, dtype)
    first = torch.nn.functional.cross_entropy(model(x).float(), y).item()
    train(model, opt, 7, dtype=dtype)  # past an Eq. 2 step and a low-cost SVD
    float_state = entry.float_state_dtype(dtype)  # fp32 state below fp32, unless bf16 state is asked for
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            expected = (
                torch.int64
                if key == "step"
                else torch.uint8
                if key.endswith("_codes")
                else (torch.float32 if key.endswith("_absmax") else float_state)
            )
            assert value.dtype == expected, key
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x).float(), y).item() < first  # it trains


@pytest.mark.parametrize("entry", OPTIM_DB, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_unsupported_features_are_unknown_keywords(entry: OptimizerInfo, feature):
    if feature in entry.supports:
        entry.make([_weight(8, 8)], **{feature: True} if feature != "relative_step" else {"lr": None, feature: True})
    else:
        with pytest.raises(TypeError, match=feature):
            entry.make([_weight(8, 8)], **{feature: True})


@pytest.mark.parametrize("entry", [e for e in OPTIM_DB if "maximize" in e.supports], ids=str)
def test_maximize_steps_like_minimizing_the_negated_gradient(entry: OptimizerInfo):
    models = [make_net(), make_net()]
    opts = [entry.make(models[0].parameters(), maximize=True), entry.make(models[1].parameters())]
    for step in range(7):
        grads = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            for i, p in enumerate(models[0].parameters())
        ]
        for sign, model in zip((1, -1), models):
            for p, g in zip(model.parameters(), grads):
                p.grad = sign * g
        for opt in opts:
            opt.step()
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("entry", [e for e in OPTIM_DB if "amsgrad" in e.supports], ids=str)
def test_amsgrad_keeps_the_running_maximum_in_the_subspace(entry: OptimizerInfo):
    model = make_net()
    opt = entry.make(model.parameters(), amsgrad=True)
    train(model, opt, 2)
    state = opt.state[model.fc1.weight]
    # 8-bit storage keeps the maximum as codes with one absmax per block, like the other moments.
    suffix = "_codes" if entry.eight_bit else ""
    assert state["max_exp_avg_sq" + suffix].shape == state["exp_avg" + suffix].shape
    assert state["exp_avg" + suffix].numel() == 192 * 20


@pytest.mark.parametrize("entry", OPTIM_DB, ids=str)
def test_state_dict_round_trips_through_torch_save_weights_only(entry: OptimizerInfo, tmp_path):
    model = make_net()
    opt = entry.make(model.parameters())
    train(model, opt, 4)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = entry.make(model.parameters())
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    saved, loaded = opt.state_dict(), fresh.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, state in saved["state"].items():
        assert state.keys() == loaded["state"][index].keys()
        for key, value in state.items():
            assert (
                torch.equal(value, loaded["state"][index][key]) and value.dtype == loaded["state"][index][key].dtype
            ), key
    x, y = batch(0)
    assert torch.isfinite(torch.nn.functional.cross_entropy(model(x), y))
