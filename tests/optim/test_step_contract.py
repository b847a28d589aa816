"""``step()`` is all-or-nothing, counts exactly, and refuses what it cannot train at the door."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdamW
from coap_torch.optim import SparseGradientError
from helpers.nets import make_net, train
from helpers.optim_db import OPTIMIZERS


def _state_copy(opt) -> dict:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _assert_same(opt, params, weights, state) -> None:
    for p, w in zip(params, weights):
        assert torch.equal(p, w)
    assert {id(p) for p, s in opt.state.items() if s} == {k for k, s in state.items() if s}
    for p, s in opt.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key


class _WithEmbedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = make_net()
        self.emb = torch.nn.Embedding(30, 8, sparse=True)  # last: every other parameter comes first


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("steps_before", [0, 2], ids=["first-step", "later-step"])
def test_a_refused_step_changes_no_parameter_and_no_counter(name, steps_before):
    model = _WithEmbedding()
    opt = OPTIMIZERS[name](model.parameters())
    train(model.dense, opt, steps_before)  # the embedding has no gradient yet
    params = list(model.parameters())
    weights, state = [p.detach().clone() for p in params], _state_copy(opt)
    x = torch.randn(4, 8, 8, 8)
    (model.dense(x).sum() + model.emb(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(SparseGradientError, match=r"parameter 12 of shape \(30, 8\)"):
        opt.step()
    _assert_same(opt, params, weights, state)


def test_torch_adamw_refuses_the_same_step_untouched_too():
    model = _WithEmbedding()
    opt = torch.optim.AdamW(model.parameters())
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    (model.dense(torch.randn(4, 8, 8, 8)).sum() + model.emb(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_state_built_for_other_options_is_refused_before_any_update():
    model = make_net()
    opt = OPTIMIZERS["CoapAdamW"]([{"params": list(model.parameters())[:6]}, {"params": list(model.parameters())[6:]}])
    train(model, opt, 2)
    opt.param_groups[1]["rank_ratio_matrix"] = 4  # fc2's state no longer fits
    params = list(model.parameters())
    weights, state = [p.detach().clone() for p in params], _state_copy(opt)
    torch.nn.functional.cross_entropy(model(torch.randn(64, 8, 8, 8)), torch.randint(0, 10, (64,))).backward()
    with pytest.raises(ValueError, match=r"parameter 6 of shape \(48, 40\) holds projections"):
        opt.step()
    _assert_same(opt, params, weights, state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_step_counter_is_exact_past_2_to_the_24(name):
    # A float32 counter cannot hold 6 * 2**24 + 5: it would read a multiple of T_u at every step
    # and refresh P every step. Ours is an exact integer, and the schedule stays exact.
    model = make_net()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 1)
    fc2 = list(model.parameters())[6]
    for state in opt.state.values():
        assert state["step"].dtype == torch.int64 and state["step"].device.type == "cpu"
        state["step"].fill_(6 * 2**24 + 4)
    before = opt.state[fc2]["proj"].clone()
    train(model, opt, 1, start=1)  # 6 * 2**24 + 5: no refresh (T_u = 3)
    assert int(opt.state[fc2]["step"]) == 6 * 2**24 + 5
    assert torch.equal(opt.state[fc2]["proj"], before)
    train(model, opt, 1, start=2)  # 6 * 2**24 + 6 = 6 (2**24 + 1): a low-cost SVD
    assert int(opt.state[fc2]["step"]) == 6 * 2**24 + 6
    assert not torch.equal(opt.state[fc2]["proj"], before)


@pytest.mark.parametrize("optimizer", [CoapAdamW, CoapAdafactor])
def test_complex_parameters_are_refused_at_construction_saying_why(optimizer):
    weight = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.complex64))
    with pytest.raises(
        ValueError, match=r"parameter 0 of shape \(8, 6\) has dtype torch.complex64: complex parameters"
    ):
        optimizer([weight])
    opt = optimizer([torch.nn.Parameter(torch.randn(8, 6))])
    with pytest.raises(ValueError, match=r"param group 1: parameter 1 .*complex parameters are not supported"):
        opt.add_param_group({"params": [weight]})
    assert len(opt.param_groups) == 1


def test_an_infinite_bound_means_no_bound():
    w = torch.nn.Parameter(torch.randn(16, 12))
    CoapAdamW([w], correlation_max_norm=float("inf"))
    CoapAdafactor([w], clip_threshold=float("inf"))
