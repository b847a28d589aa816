"""Errors that are not a table row of tests/helpers/optim_db.py: group indices, tensor kinds, sparse gradients, stale state."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.optim import SparseGradientError


def test_group_passed_to_constructor_is_validated_with_its_index():
    good, bad = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"param group 1: Invalid update_interval: 0"):
        CoapAdamW([{"params": [good]}, {"params": [bad], "update_interval": 0}])


@pytest.mark.parametrize(
    "param,message",
    [
        (torch.zeros(3, 3, dtype=torch.complex64), r"shape \(3, 3\) has dtype torch.complex64"),
        (torch.zeros(3, 3, dtype=torch.int64), r"shape \(3, 3\) has dtype torch.int64"),
    ],
)
def test_unsupported_tensors_are_rejected_with_their_shape(param, message):
    with pytest.raises(ValueError, match=message):
        CoapAdamW([param])


def test_sparse_gradient_raises_naming_the_parameter():
    emb = torch.nn.Embedding(20, 6, sparse=True)
    opt = CoapAdamW(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(SparseGradientError, match=r"sparse gradients \(parameter 0 of shape \(20, 6\)\)"):
        opt.step()
    assert issubclass(SparseGradientError, RuntimeError) and issubclass(SparseGradientError, ValueError)


def test_state_from_other_options_is_refused_not_misused():
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = CoapAdamW([w], rank=4)
    w.grad = torch.randn(32, 24)
    opt.step()
    opt.param_groups[0]["rank"] = 8
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(32, 24\) holds projections of shapes \[\(24, 4\)\]"):
        opt.step()
    opt.param_groups[0]["rank"], opt.param_groups[0]["coap"] = 4, False
    with pytest.raises(ValueError, match=r"dense projections of shapes \[\]"):
        opt.step()
    opt.state[w].clear()
    opt.step()  # a fresh dense state
    assert "proj" not in opt.state[w]
