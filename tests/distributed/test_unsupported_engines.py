"""Engines that cannot work say so at the first step, naming the engine; nothing falls back silently.

FSDP1, tensor parallelism and 2-D meshes need a process group and are covered in test_fsdp.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from coap_torch import CoapAdamW
from helpers.nets import batch, make_net


def _flatten_like_zero(opt: torch.optim.Optimizer) -> None:
    # DeepSpeed ZeRO-1/2 replace each group's parameters by one flat fp32 partition after the
    # optimizer is built.
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        partition = torch.nn.Parameter(flat[: flat.numel() // 2].clone())
        partition.grad = torch.ones_like(partition)
        group["params"] = [partition]


def test_deepspeed_zero_flat_partitions_are_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    opt = CoapAdamW(make_net().parameters())
    _flatten_like_zero(opt)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO partitions parameters this way.*DistributedDataParallel"):
        opt.step()


def test_any_flattening_engine_is_refused():
    opt = CoapAdamW(make_net().parameters())
    _flatten_like_zero(opt)
    with pytest.raises(ValueError, match="now flat 1-D tensors.*FSDP2"):
        opt.step()


def test_deepspeed_zero3_parameters_are_refused():
    model = make_net()
    opt = CoapAdamW(model.parameters())
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.fc1.weight.ds_id = 3  # what ZeRO-3 puts on the parameters it partitions
    with pytest.raises(ValueError, match=r"parameter 4 of shape \(40, 192\) is partitioned by DeepSpeed ZeRO"):
        opt.step()


def test_vectors_only_optimizers_still_work():
    # An optimizer built over 1-D parameters only was never given matrices: nothing to refuse.
    bias = torch.nn.Parameter(torch.zeros(8))
    bias.grad = torch.ones(8)
    CoapAdamW([bias], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(bias.detach(), torch.full((8,), -0.1))
