"""FSDP2 optimizer traffic of the paper's LLaMA-1B, built on meta by the suite: under 1% of FSDP2's
own with P on the unsharded input side, several times that with P on the paper's smaller side
(the wide down-projections then sum their projected gradients at every step)."""

from __future__ import annotations

import pytest

from coap_torch.utils import estimate_fsdp2_communication


def test_llama_1b_optimizer_traffic_by_projection_side():
    pytest.importorskip("transformers")
    from coap_bench.memory import _llama

    model = _llama("1b")()  # bf16 on meta, as in the GaLore / COAP runs
    projected = [p for n, p in model.named_parameters() if "self_attn" in n or "mlp" in n]
    rest = [p for n, p in model.named_parameters() if not ("self_attn" in n or "mlp" in n)]
    groups = [{"params": projected}, {"params": rest, "coap": False}]
    paper = estimate_fsdp2_communication(groups, rank=512, update_interval=40, reproject_factor=5)
    estimate = estimate_fsdp2_communication(
        groups, rank=512, update_interval=40, reproject_factor=5, projection_side="input"
    )
    assert estimate.steady_step_bytes == 0
    # The 24 (2048, 5461) down-projections: one (5461, 512) float32 sum per step each.
    assert paper.steady_step_bytes == 24 * 5461 * 512 * 4
    assert 0.03 < paper.ratio < 0.04
    assert estimate.projected == 24 * 7
    assert estimate.fsdp2_bytes_per_step == 3 * 2 * 1_339_082_752
    assert estimate.ratio < 0.01
