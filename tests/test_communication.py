"""FSDP2 optimizer traffic from shapes: the payload formulas of every layout and the schedule (the paper's LLaMA-1B against the
1% target is the benchmark suite's: benchmarks/tests/test_fsdp2_communication.py).

The formulas are checked to the byte against the collectives counted on real two-process FSDP2
runs in ``tests/distributed/test_fsdp.py::test_collectives_are_coalesced_per_step`` and
``tests/distributed/test_fsdp_kernels.py::test_traffic_is_the_estimate_to_the_byte``.
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


def test_every_layout_counts_and_fsdp2_moves_three_model_payloads():
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Conv2d(64, 64, 3), torch.nn.LayerNorm(128))
    estimate = estimate_fsdp2_communication(model, rank=8, world_size=2)
    assert estimate.projected == 2
    n_params = sum(p.numel() for p in model.parameters())
    assert estimate.fsdp2_bytes_per_step == 3 * 4 * n_params
    # The (128, 32) matrix: P on its smaller, unsharded side: refresh sums only.
    matrix = low_cost_svd_payload_bytes(32, 8, 4)
    # The Tucker-2 kernel (ranks 45, 45): P_O on the sharded side. Every step sums the core;
    # a refresh first moves P_O's (576, 64) matrix to row shards (this rank's 32 columns).
    core = 45 * 45 * 9 * 4
    share = 64 * 9 * 32 * 4
    kernel = share + low_cost_svd_payload_bytes(64, 45, 4) + low_cost_svd_payload_bytes(64, 45, 4)
    assert estimate.steady_step_bytes == core
    assert estimate.first_step_bytes == estimate.svd_step_bytes == matrix + kernel
    eq2 = share + 2 * correlation_step_payload_bytes(64, 45, 4) + correlation_step_payload_bytes(32, 8, 4)
    assert estimate.correlation_step_bytes == eq2
    half = estimate_fsdp2_communication(model, rank=8, param_bytes=2)
    assert half.fsdp2_bytes_per_step == estimate.fsdp2_bytes_per_step // 2


def test_input_side_layouts_send_nothing_on_steady_steps():
    model = torch.nn.Sequential(torch.nn.Linear(128, 32), torch.nn.Conv2d(64, 64, 3))
    tucker = estimate_fsdp2_communication(model, rank=8)
    assert tucker.steady_step_bytes > 0  # P on the (32, 128) matrix's sharded side, and P_O
    none = estimate_fsdp2_communication(model, rank=8, projection_side="input", conv_projection="input")
    assert none.steady_step_bytes == 0
    # Each refresh: the row-split sums, and one finiteness flag for the input-mode kernel (r_I 45).
    assert none.svd_step_bytes == low_cost_svd_payload_bytes(128, 8, 4) + 4 + low_cost_svd_payload_bytes(64, 45, 4)


def test_adafactor_adds_its_statistics_every_step():
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.LayerNorm(128))
    adamw = estimate_fsdp2_communication(model, rank=8)
    adafactor = estimate_fsdp2_communication(model, rank=8, optimizer="coap_adafactor")
    assert adamw.steady_step_bytes == 0
    # The (128, 8) projected moment: 8 column sums, the row accumulator's sum, the weight's and
    # the update's sums of squares; each 1-D parameter (bias, norm weight and bias): the last two.
    assert adafactor.steady_step_bytes == 4 * ((8 + 1 + 1 + 1) + 3 * 2)
    assert adafactor.svd_step_bytes == adamw.svd_step_bytes
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        estimate_fsdp2_communication(model, optimizer="adam")


def test_bytes_over_follows_the_refresh_schedule():
    estimate = estimate_fsdp2_communication(torch.nn.Linear(64, 64), rank=8, update_interval=3, reproject_factor=2)
    svd, eq2 = estimate.svd_step_bytes, estimate.correlation_step_bytes
    assert estimate.first_step_bytes == svd
    assert estimate.bytes_over(1, 3, 2) == svd  # the first step's SVD
    assert estimate.bytes_over(5, 3, 2) == svd + eq2  # Eq. 2 at step 3
    assert estimate.bytes_over(7, 3, 2) == 2 * svd + eq2  # SVD at step 6
    assert estimate.optimizer_bytes_per_step == pytest.approx((svd + eq2) / 6)
