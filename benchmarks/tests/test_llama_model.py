"""LLaMA presets, the deterministic builder and the projected / dense parameter split."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from coap_bench.llama_model import (
    PAPER_VOCAB_SIZE,
    PRESETS,
    PROJECTED_MODULES,
    LlamaPreset,
    build_llama,
    projected_parameter_groups,
)

VOCAB = 256  # a byte-level vocabulary, as the CPU benchmark uses


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_presets_match_the_galore_configs():
    shapes = {
        name: (p.hidden_size, p.intermediate_size, p.num_attention_heads, p.num_hidden_layers)
        for name, p in PRESETS.items()
    }
    assert shapes == {
        "tiny": (256, 688, 4, 4),
        "60m": (512, 1376, 8, 8),
        "130m": (768, 2048, 12, 12),
        "350m": (1024, 2736, 16, 24),
        "1b": (2048, 5461, 32, 24),
        "7b": (4096, 11008, 32, 32),
    }
    assert PRESETS["tiny"].seq_len == 128
    assert all(PRESETS[name].max_position_embeddings == 256 for name in ("60m", "130m", "350m", "1b", "7b"))
    with pytest.raises(ValueError):
        LlamaPreset(100, 200, 3, 1, 16)  # 100 heads do not divide evenly
    with pytest.raises(ValueError, match="unknown LLaMA preset"):
        build_llama("13b", VOCAB, seed=0, device="meta")


@pytest.mark.parametrize(
    ("name", "reported"),
    [("60m", 58e6), ("130m", 134e6), ("350m", 368e6), ("1b", 1.34e9), ("7b", 6.74e9)],
)
def test_paper_sizes_on_meta(name, reported):
    model = build_llama(name, PAPER_VOCAB_SIZE, seed=0, device="meta")
    assert all(p.is_meta for p in model.parameters())
    count = _count(model)
    assert count == PRESETS[name].num_parameters(PAPER_VOCAB_SIZE)
    assert abs(count - reported) / reported < 0.03
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tiny_size():
    model = build_llama("tiny", VOCAB, seed=0)
    count = _count(model)
    assert count == PRESETS["tiny"].num_parameters(VOCAB) == 3_295_488
    assert 2e6 < count < 6e6
    assert not model.config.tie_word_embeddings
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    a = build_llama("tiny", VOCAB, seed=7)
    b = build_llama("tiny", VOCAB, seed=7)
    c = build_llama("tiny", VOCAB, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_llama_initialization():
    model = build_llama("tiny", VOCAB, seed=0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert param.ndim == 2, name
            assert abs(param.std().item() - 0.02) < 0.002, name
            assert abs(param.mean().item()) < 0.002, name
    rotary = model.model.rotary_emb.inv_freq
    head_dim = 256 // 4
    assert torch.allclose(rotary, 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def test_dtype_is_a_rounding_of_the_float32_weights():
    fp32 = build_llama("tiny", VOCAB, seed=3)
    bf16 = build_llama("tiny", VOCAB, seed=3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.lm_head.weight, fp32.lm_head.weight.to(torch.bfloat16))


def test_tiny_forward_loss_near_uniform():
    model = build_llama("tiny", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (2, PRESETS["tiny"].seq_len), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(VOCAB)) < 0.25
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_split():
    model = build_llama("tiny", VOCAB, seed=0)
    split = projected_parameter_groups(model, "paper")
    layers = PRESETS["tiny"].num_hidden_layers
    assert len(split.projected) == layers * len(PROJECTED_MODULES)
    for name in split.projected_names:
        assert name.split(".")[-2] in PROJECTED_MODULES, name
    for index in range(layers):
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            assert f"model.layers.{index}.{module}.weight" in split.projected_names
    dense = set(split.dense_names)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= dense
    assert all(
        name.endswith("layernorm.weight")
        for name in dense - {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    )
    assert len(dense) == 2 * layers + 3
    everything = [name for name, _ in model.named_parameters()]
    assert sorted(split.projected_names + split.dense_names) == sorted(everything)
    groups = split.param_groups(dense_options={"coap": False})
    assert [len(g["params"]) for g in groups] == [len(split.projected), len(split.dense)]
    assert groups[1]["coap"] is False and "coap" not in groups[0]


def test_drop_in_split_and_unknown_recipe():
    model = build_llama("tiny", VOCAB, seed=0, device="meta")
    split = projected_parameter_groups(model, "drop-in")
    assert split.dense == []
    assert [name for name, _ in split.projected] == [name for name, _ in model.named_parameters()]
    assert len(split.param_groups()) == 1
    with pytest.raises(ValueError, match="unknown recipe"):
        projected_parameter_groups(model, "galore")


def test_missing_transformers_is_a_clear_error(monkeypatch):
    from coap_bench._deps import MissingExtraError

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="transformers"):
        build_llama("tiny", VOCAB, seed=0, device="meta")
