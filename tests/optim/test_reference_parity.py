"""The optimizers against the literal float64 transcription of the paper (tests/reference):
about 50 steps that cross Eq. 2 steps and low-cost SVDs, for every kind of projected parameter."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdamW
from reference.coap_loop import Adafactor, AdamW, Schedule

F64 = torch.float64
STEPS = 48
T_U, LAMBDA = 4, 3  # refreshes at 4, 8, ...: an SVD every 12 steps, Eq. 2 steps between


def _gradients(shape, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Full-rank gradients with a decaying spectrum (a unique top subspace), drifting slowly."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=F64)
    grads = []
    for _ in range(STEPS):
        noise = 0.3 * torch.randn(shape, generator=generator, dtype=F64)
        g = base + noise
        if g.dim() == 2:
            n = min(g.shape)
            spectrum = torch.linspace(3, 0.1, n, dtype=F64)
            g = g @ torch.diag(spectrum) if g.shape[1] == n else torch.diag(spectrum) @ g
        grads.append(scale * g)
    return grads


def _run_ours(optimizer: torch.optim.Optimizer, weight: torch.nn.Parameter, grads) -> torch.Tensor:
    for g in grads:
        weight.grad = g.clone()
        optimizer.step()
    return weight.detach()


#: The reference is the paper's algorithm, which puts P on a matrix's smaller side (a wide
#: matrix works on G^T) and does not scale the update: said explicitly.
PAPER = {"projection_side": "smaller", "scale": 1.0}


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["mean-scale", "sum-scale"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_coap_adamw_matrix_follows_the_reference(shape, scale):
    grads = _gradients(shape, seed=1, scale=scale)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    options = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    reference = AdamW(W0.clone(), Schedule(T_U, LAMBDA), rank=6, **options)
    for g in grads:
        reference.step(g)
    weight = torch.nn.Parameter(W0.clone())
    ours = _run_ours(
        CoapAdamW([weight], rank=6, update_interval=T_U, reproject_factor=LAMBDA, **PAPER, **options),
        weight,
        grads,
    )
    torch.testing.assert_close(ours, reference.weight, rtol=0, atol=1e-9)


def test_coap_adamw_conv_kernel_follows_the_reference():
    shape = (16, 12, 3, 3)
    grads = _gradients(shape, seed=2)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    options = {"lr": 1e-2, "weight_decay": 0.0}
    reference = AdamW(W0.clone(), Schedule(T_U, LAMBDA), rank=(8, 6), **options)  # floor(16/sqrt(4)), floor(12/2)
    for g in grads:
        reference.step(g)
    weight = torch.nn.Parameter(W0.clone())
    opt = CoapAdamW(
        [weight], rank_ratio_cnn=4, min_conv_numel=0, update_interval=T_U, reproject_factor=LAMBDA, **PAPER, **options
    )
    ours = _run_ours(opt, weight, grads)
    assert [tuple(opt.state[weight][k].shape) for k in ("proj_out", "proj_in")] == [(16, 8), (12, 6)]
    torch.testing.assert_close(ours, reference.weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale_parameter", [False, True])
@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_coap_adafactor_follows_our_reading_of_algorithm_1(shape, beta1, scale_parameter):
    grads = _gradients(shape, seed=4)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    options = {"lr": 1e-2, "beta1": beta1, "weight_decay": 0.05, "scale_parameter": scale_parameter}
    reference = Adafactor(W0.clone(), Schedule(T_U, LAMBDA), rank=6, **options)
    for g in grads:
        reference.step(g)
    weight = torch.nn.Parameter(W0.clone())
    opt = CoapAdafactor([weight], rank=6, update_interval=T_U, reproject_factor=LAMBDA, **PAPER, **options)
    torch.testing.assert_close(_run_ours(opt, weight, grads), reference.weight, rtol=0, atol=1e-9)
