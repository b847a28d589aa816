"""Bad input raises a clear error naming the argument and the value, in __init__ and add_param_group."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.optim import SparseGradientError

BAD_KWARGS = [
    ({"lr": -1e-3}, r"lr: -0\.001"),
    ({"betas": (1.0, 0.999)}, r"beta parameter at index 0: 1\.0"),
    ({"betas": (0.9, -0.1)}, r"beta parameter at index 1: -0\.1"),
    ({"betas": (0.9,)}, r"betas"),
    ({"eps": -1.0}, r"eps: -1\.0"),
    ({"weight_decay": -0.1}, r"weight_decay: -0\.1"),
    ({"rank": 0}, r"rank: 0"),
    ({"rank": -3}, r"rank: -3"),
    ({"rank": 2.5}, r"rank: 2\.5"),
    ({"rank_ratio_matrix": 0.5}, r"rank_ratio_matrix: 0\.5"),
    ({"rank_ratio_cnn": 0.0}, r"rank_ratio_cnn: 0\.0"),
    ({"update_interval": 0}, r"update_interval: 0"),
    ({"update_interval": -32}, r"update_interval: -32"),
    ({"reproject_factor": 0}, r"reproject_factor: 0"),
    ({"correlation_lr": -0.1}, r"correlation_lr: -0\.1"),
    ({"correlation_max_norm": 0.0}, r"correlation_max_norm: 0\.0"),
    ({"correlation_normalize": "yes"}, r"correlation_normalize: 'yes'"),
    ({"scale": 0.0}, r"scale: 0\.0"),
    ({"min_conv_numel": -1}, r"min_conv_numel: -1"),
    ({"seed": -1}, r"seed: -1"),
    ({"coap": "no"}, r"coap: 'no'"),
    ({"amsgrad": 1}, r"amsgrad: 1"),
    ({"lr": float("nan")}, r"lr must be a real number"),
    ({"fused": True}, r"fused=True"),
    ({"foreach": True}, r"foreach=True"),
    ({"capturable": True}, r"capturable=True"),
    ({"differentiable": True}, r"differentiable=True"),
]


@pytest.mark.parametrize("kwargs,message", BAD_KWARGS, ids=[next(iter(k)) + "=" + repr(v) for k, v in (
    (kw, next(iter(kw.values()))) for kw, _ in BAD_KWARGS)])
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoapAdamW([torch.nn.Parameter(torch.zeros(8, 8))], **kwargs)


@pytest.mark.parametrize("kwargs,message", [kw for kw in BAD_KWARGS if not any(
    flag in kw[0] for flag in ("fused", "foreach", "capturable", "differentiable"))])
def test_add_param_group_rejects(kwargs, message):
    opt = CoapAdamW([torch.nn.Parameter(torch.zeros(8, 8))])
    with pytest.raises(ValueError, match=r"param group 1: .*" + message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], **kwargs})
    assert len(opt.param_groups) == 1


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
