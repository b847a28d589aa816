"""Non-finite and huge gradients: nothing raises later, P is never built from them, other
parameters are untouched, and dense parameters behave as torch.optim.AdamW does."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from coap_torch import CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from helpers.optim_db import OPTIMIZERS

# With update_interval=3 and reproject_factor=2 (helpers.optim_db): step 1 builds P, steps 2, 4
# and 5 are steady, step 3 is an Eq. 2 step and step 6 a low-cost SVD.
FIRST, STEADY, EQ2, SVD = 1, 2, 3, 6
STEPS = 9
SHAPES = [(40, 24), (16, 8, 3, 3), (24,), (30, 50)]  # matrix, Tucker-2 kernel, vector, wide matrix


def _params() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(SHAPES)
    ]


def _grad(shape, step: int, index: int) -> torch.Tensor:
    return 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index))


def _run(make_opt, poisoned: int | None = None, at: int | None = None, value: float = float("nan")):
    """Train the four parameters on fixed random gradients; ``value`` replaces a gradient entry of
    parameter ``poisoned`` at step ``at``. Returns the weights and projections after each step."""
    params = _params()
    opt = make_opt(params)
    history = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, STEPS + 1):
            for i, p in enumerate(params):
                p.grad = _grad(p.shape, step, i)
                if i == poisoned and step == at:
                    p.grad.view(-1)[7] = value
            opt.step()
            history.append(
                {
                    "params": [p.detach().clone() for p in params],
                    "proj": [{k: v.clone() for k, v in opt.state[p].items() if k.startswith("proj")} for p in params],
                    "steps": [int(opt.state[p]["step"]) if opt.state[p] else 0 for p in params],
                }
            )
    return history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@functools.cache
def _clean_run(name: str) -> list[dict]:
    """The run without a poisoned entry: computed once per optimizer (the tests only read it)."""
    return _run(OPTIMIZERS[name])[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("at", [FIRST, STEADY, EQ2, SVD], ids=["first", "steady", "eq2", "svd"])
@pytest.mark.parametrize("poisoned", [0, 1], ids=["matrix", "tucker"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_non_finite_gradient_never_bricks_the_optimizer(name, poisoned, at, value):
    clean = _clean_run(name)
    dirty, messages = _run(OPTIMIZERS[name], poisoned, at, value)
    where = f"parameter {poisoned} of shape {SHAPES[poisoned]}"
    for step, (a, b) in enumerate(zip(clean, dirty), start=1):
        # The other parameters never notice.
        for i in range(len(SHAPES)):
            if i != poisoned:
                assert torch.equal(a["params"][i], b["params"][i]), (step, i)
        # P is never built from non-finite values.
        for proj in b["proj"][poisoned].values():
            assert torch.isfinite(proj).all(), step
    if at == FIRST:
        # Initialisation is deferred: the parameter is left as it was, with no state, then
        # starts at the next step from a finite gradient.
        assert torch.equal(dirty[0]["params"][poisoned], _params()[poisoned])
        assert dirty[0]["steps"][poisoned] == 0 and dirty[-1]["steps"][poisoned] == STEPS - 1
        assert torch.isfinite(dirty[-1]["params"][poisoned]).all()
        assert any(where in m and "first step" in m for m in messages)
    else:
        # As in AdamW, the NaN flows into this parameter's weights; its step counter is exact.
        assert not torch.isfinite(dirty[at - 1]["params"][poisoned]).all()
        assert dirty[-1]["steps"][poisoned] == STEPS
    if at in (EQ2, SVD):
        # The refresh met the gradient: the previous P is kept, with a warning naming the parameter.
        for key, proj in dirty[at - 1]["proj"][poisoned].items():
            assert torch.equal(proj, dirty[at - 2]["proj"][poisoned][key]), key
        assert any(where in m and f"step {at}" in m for m in messages)
    if at != FIRST:
        # The SVD at step 6 (or, after an SVD-step NaN, the next refreshes) runs on finite
        # gradients again: P keeps being refreshed.
        last = dirty[-1]["proj"][poisoned]
        assert any(not torch.equal(v, dirty[at - 1]["proj"][poisoned][k]) for k, v in last.items()) or at == SVD


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_dense_parameters_follow_torch_adamw_through_non_finite_gradients(value):
    # A vector and an opted-out matrix: NaN and inf propagate exactly as in torch's AdamW.
    ours = [torch.nn.Parameter(torch.randn(24)), torch.nn.Parameter(torch.randn(32, 16))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = CoapAdamW([{"params": ours[:1]}, {"params": ours[1:], "coap": False}], lr=1e-2)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2)
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, ref)):
            g = _grad(p.shape, step, i)
            if step == 2:
                g[3] = value
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "make_opt",
    [CoapAdamW8bit, lambda p, **kw: CoapAdafactor8bit(p, beta1=0.9, **kw)],
    ids=["CoapAdamW8bit", "CoapAdafactor8bit"],
)
def test_8bit_block_stays_finite_on_one_huge_gradient_entry(make_opt):
    # 1e25 squares to inf in float32: torch's AdamW then never moves that entry again, and the
    # other entries are untouched. A quantization block holding that inf must not turn into NaN.
    weight = torch.nn.Parameter(torch.randn(8192, generator=torch.Generator().manual_seed(0)))
    ref = torch.nn.Parameter(weight.detach().clone())
    opt = make_opt([weight], lr=1e-2)
    opt_ref = torch.optim.AdamW([ref], lr=1e-2)
    assert "exp_avg_codes" in opt.planned_state(weight)  # really stored in 8 bits
    for step in range(12):
        g = _grad(weight.shape, step, 0)
        if step == 3:
            g[100] = 1e25
        weight.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        assert torch.isfinite(weight).all(), step
        assert torch.isfinite(ref).all(), step
    # Outside the struck block (entries 0-255) the 8-bit run tracks AdamW as usual.
    if isinstance(opt, CoapAdamW8bit):
        torch.testing.assert_close(weight[256:], ref[256:], rtol=0, atol=2e-2)


def test_huge_gradient_entry_in_a_projected_8bit_moment_stays_finite():
    weight = torch.nn.Parameter(torch.randn(128, 96, generator=torch.Generator().manual_seed(0)))
    opt = CoapAdamW8bit([weight], lr=1e-2, rank=32, update_interval=3, reproject_factor=2, min_8bit_size=256)
    for step in range(8):
        weight.grad = _grad(weight.shape, step, 0)
        if step == 1:
            weight.grad[5, 7] = 1e25
        opt.step()
        assert torch.isfinite(weight).all(), step
        assert torch.isfinite(opt.state[weight]["proj"]).all(), step
