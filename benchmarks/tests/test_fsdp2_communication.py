"""FSDP2 refresh traffic of the paper's LLaMA-1B, built on meta by the suite, against the 1% target."""

from __future__ import annotations

import pytest

from coap_torch.utils import estimate_fsdp2_communication


def test_llama_1b_refreshes_cost_under_one_percent_of_fsdp2():
    pytest.importorskip("transformers")
    from coap_bench.memory import _llama

    model = _llama("1b")()  # bf16 on meta, as in the GaLore / COAP runs
    projected = [p for n, p in model.named_parameters() if "self_attn" in n or "mlp" in n]
    rest = [p for n, p in model.named_parameters() if not ("self_attn" in n or "mlp" in n)]
    estimate = estimate_fsdp2_communication(
        [{"params": projected}, {"params": rest, "coap": False}], rank=512, update_interval=40, reproject_factor=5
    )
    assert estimate.projected == 24 * 7
    assert estimate.fsdp2_bytes_per_step == 3 * 2 * 1_339_082_752
    assert estimate.ratio < 0.01
