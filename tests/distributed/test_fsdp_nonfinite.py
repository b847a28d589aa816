"""FSDP2: a non-finite gradient on one rank's rows is handled on every rank alike (no hang, no
rank building P from it), as in one process: initialisation waits, a refresh keeps P."""

from __future__ import annotations

import warnings

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdamW
from helpers.launch import launch

SHAPE = (64, 32)
STEPS = 7  # update_interval=3, reproject_factor=2: an Eq. 2 step at 3, a low-cost SVD at 6
OPTIMIZERS = {
    "CoapAdamW": lambda params: CoapAdamW(params, lr=1e-2, rank=8, update_interval=3, reproject_factor=2),
    "CoapAdafactor": lambda params: CoapAdafactor(params, beta1=0.9, rank=8, update_interval=3, reproject_factor=2),
}


def _poisoned_runs(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, make_opt in OPTIMIZERS.items():
        for at in (None, 1, 3, 6):
            full = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
            weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
            opt = make_opt([weight])
            projections, counters = [], []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(1, STEPS + 1):
                    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step))
                    if step == at:
                        grad[-1, 5] = float("nan")  # a row of the last rank only
                    weight.grad = distribute_tensor(grad, mesh, [Shard(0)])
                    opt.step()
                    state = opt.state[weight]
                    projections.append(state["proj"].clone() if "proj" in state else None)
                    counters.append(int(state["step"]) if state else 0)
            results[name, at] = {
                "projections": projections,
                "counters": counters,
                "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            }
    return results


@pytest.fixture(scope="module")
def runs():
    return launch(_poisoned_runs, world_size=2, timeout=180)


@pytest.mark.parametrize("at", [1, 3, 6], ids=["first", "eq2", "svd"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_rank_handles_a_nan_on_one_rank_alike(runs, name, at):
    first, second = (run[name, at] for run in runs)
    clean = runs[0][name, None]
    assert first["counters"] == second["counters"]
    for a, b in zip(first["projections"], second["projections"]):
        assert (a is None and b is None) or torch.equal(a, b)  # the same P on both ranks
    for P in first["projections"]:
        assert P is None or torch.isfinite(P).all()
    for run in (first, second):
        assert any("parameter 0 of shape (64, 32)" in message for message in run["warnings"])
    if at == 1:
        assert first["counters"][0] == 0 and first["projections"][0] is None  # deferred
        assert first["counters"][-1] == STEPS - 1
    else:
        assert torch.equal(first["projections"][at - 1], first["projections"][at - 2])  # P kept
        assert torch.equal(first["projections"][at - 2], clean["projections"][at - 2])
