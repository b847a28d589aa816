"""DistributedDataParallel: 2 gloo processes train exactly like one process on the whole batch.

Every rank must build the same ``P`` from the same averaged gradient: the optimizer draws its
sketches from its own seeded generators, never from the global RNG (seeded ``seed + rank`` here,
as training scripts often do). Steps 1-7 with ``update_interval=3, reproject_factor=2`` cross the
first low-cost SVD (step 1), an Eq. 2 step (3), a re-projection (6).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from helpers.launch import launch
from helpers.nets import batch, make_net
from helpers.optim_db import ENGINE_OPTIMIZERS as OPTIMIZERS

STEPS = 7
BATCH = 64  # well above every rank of SmallNet (see the rank-deficiency note in low_cost_svd)


def _micro_batches(step: int, rank: int, world_size: int, accumulation: int):
    x, y = batch(step, size=BATCH)
    share = BATCH // world_size
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    return list(zip(x.chunk(accumulation), y.chunk(accumulation)))


def train_ddp(model, opt, rank: int, world_size: int, accumulation: int) -> None:
    for step in range(STEPS):
        opt.zero_grad()
        micro = _micro_batches(step, rank, world_size, accumulation)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            context = torch.enable_grad() if last else model.no_sync()
            with context:
                loss = torch.nn.functional.cross_entropy(model(x), y) / accumulation
                loss.backward()
        opt.step()


def snapshot(model, opt) -> dict:
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return {"params": params, "state": state}


def ddp_worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, make_opt in OPTIMIZERS.items():
        for accumulation in (1, 2):
            model = DistributedDataParallel(make_net(0))
            torch.manual_seed(1234 + rank)  # a per-rank global RNG must not matter
            opt = make_opt(model.parameters())
            train_ddp(model, opt, rank, world_size, accumulation)
            results[name, accumulation] = snapshot(model.module, opt)
    return results


def single_process(make_opt) -> dict:
    model = make_net(0)
    opt = make_opt(model.parameters())
    for step in range(STEPS):
        x, y = batch(step, size=BATCH)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return snapshot(model, opt)


@pytest.fixture(scope="module")
def ddp_runs():
    return launch(ddp_worker, world_size=2, timeout=180)


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no-accumulation", "no_sync-accumulation"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_projections_and_moments_are_bitwise_equal_across_ranks(ddp_runs, name, accumulation):
    first, second = (run[name, accumulation] for run in ddp_runs)
    for p, q in zip(first["params"], second["params"]):
        assert torch.equal(p, q)
    for a, b in zip(first["state"], second["state"]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no-accumulation", "no_sync-accumulation"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_equals_single_process_on_the_whole_batch(ddp_runs, name, accumulation):
    reference = single_process(OPTIMIZERS[name])
    ddp = ddp_runs[0][name, accumulation]
    assert any("proj" in s for s in ddp["state"]) and any("proj_out" in s for s in ddp["state"])
    # The all-reduce sums in another order than one process does (gradients differ by ~1e-7
    # relative); the subspace refreshes amplify that by their singular-value gaps, and 8-bit
    # codes (and bfloat16 state, stochastic rounding included) can round to the neighbouring
    # value. After 7 steps of lr 3e-3 the weights moved ~2e-2.
    rounded = "8bit" in name or "bf16" in name
    atol = 3e-4 if rounded else 2e-5
    for p, q in zip(ddp["params"], reference["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    # A flipped 8-bit code changes a moment by up to 0.7% of its block's maximum, and the next
    # refresh turns that into a small rotation of P: measured up to 6e-3 on one machine, 2e-3 on
    # another, for P entries of about 0.3. The weights above are the tight check; with bfloat16
    # state, P itself is rounded (0.4%) before the refreshes amplify it, so they are the only one.
    if "bf16" in name:
        return
    proj_atol = 2e-2 if rounded else 10 * atol
    for a, b in zip(ddp["state"], reference["state"]):
        for key in ("proj", "proj_out", "proj_in"):
            if key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=proj_atol)
