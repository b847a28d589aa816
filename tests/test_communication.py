"""FSDP2 refresh traffic from shapes: the payload formulas and the schedule (the paper's LLaMA-1B against the
1% target is the benchmark suite's: benchmarks/tests/test_fsdp2_communication.py).

The formulas are checked to the byte against the all-reduces counted on a real two-process
FSDP2 run in ``tests/distributed/test_fsdp.py::test_collectives_are_coalesced_per_step``.
"""

from __future__ import annotations

import doctest

import pytest
import torch

from coap_torch.optim._sharded import correlation_step_payload_bytes, low_cost_svd_payload_bytes
from coap_torch.utils import communication, estimate_fsdp2_communication


def test_module_examples():
    assert doctest.testmod(communication).failed == 0


def test_payload_formulas():
    # (r, r) float64 Gram + (r, n) product; two (r, r) sums and two scalars + (n, r) sum.
    assert low_cost_svd_payload_bytes(64, 8, 4) == 8 * 64 + 4 * 8 * 64
    assert correlation_step_payload_bytes(64, 8, 4) == 4 * (2 * 64 + 2) + 4 * 64 * 8


def test_only_matrices_count_and_fsdp2_moves_three_model_payloads():
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Conv2d(64, 64, 3), torch.nn.LayerNorm(128))
    estimate = estimate_fsdp2_communication(model, rank=8)
    assert estimate.projected == 1  # the conv kernel cannot be projected on a row shard
    n_params = sum(p.numel() for p in model.parameters())
    assert estimate.fsdp2_bytes_per_step == 3 * 4 * n_params
    # P on the input side (n = 32) whatever the smaller side is.
    assert estimate.svd_step_bytes == low_cost_svd_payload_bytes(32, 8, 4)
    half = estimate_fsdp2_communication(model, rank=8, param_bytes=2)
    assert half.fsdp2_bytes_per_step == estimate.fsdp2_bytes_per_step // 2


def test_bytes_over_follows_the_refresh_schedule():
    estimate = estimate_fsdp2_communication(torch.nn.Linear(64, 64), rank=8, update_interval=3, reproject_factor=2)
    svd, eq2 = estimate.svd_step_bytes, estimate.correlation_step_bytes
    assert estimate.bytes_over(1, 3, 2) == svd  # the first step's SVD
    assert estimate.bytes_over(5, 3, 2) == svd + eq2  # Eq. 2 at step 3
    assert estimate.bytes_over(7, 3, 2) == 2 * svd + eq2  # SVD at step 6
    assert estimate.optimizer_bytes_per_step == pytest.approx((svd + eq2) / 6)
