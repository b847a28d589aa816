"""The suite's estimate_state_bytes against the real optimizer state, to the byte, for every optimizer name:
the peers' layouts written down in coap_bench.state_layouts, and ours (the library's own estimate)."""

from __future__ import annotations

import doctest
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import coap_bench.state_layouts
from coap_bench.optimizers import DEFAULT_RANK_RATIO
from coap_bench.state_layouts import OPTIMIZER_NAMES, PEER_NAMES, estimate_state_bytes
from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit, StateEstimate
from coap_torch import estimate_state_bytes as estimate_our_state_bytes
from coap_torch.utils import optimizer_state_nbytes, state_nbytes_by_kind

COAP = {"coap_adamw": CoapAdamW, "coap_adamw8bit": CoapAdamW8bit,
        "coap_adafactor": CoapAdafactor, "coap_adafactor8bit": CoapAdafactor8bit}  # fmt: skip
GALORE = {"galore_adamw": "GaLoreAdamW", "galore_adamw8bit": "GaLoreAdamW8bit", "galore_adafactor": "GaLoreAdafactor"}
ADAFACTOR = {"beta1": 0.9, "lr": 1e-3, "relative_step": False}
# Refreshes at steps 2 (Eq. 2 step) and 4 (low-cost SVD) for COAP, every 2 steps for GaLore.
COAP_OPTIONS = {"rank_ratio_matrix": 2, "rank_ratio_cnn": 2, "update_interval": 2, "reproject_factor": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster, and immune to a busy machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _options(name: str) -> dict:
    options = dict(ADAFACTOR) if "adafactor" in name else {}
    if name in COAP:
        options.update(COAP_OPTIONS)
    if name.endswith("8bit"):
        options["min_8bit_size"] = 256  # small models: exercise both the 8-bit and the float32 paths
    return options


def _real(name: str, params, options: dict) -> torch.optim.Optimizer:
    if name in COAP:
        return COAP[name](params, **options)
    if name == "adamw":
        return torch.optim.AdamW(params, **options)
    if name == "adafactor":
        return pytest.importorskip("transformers.optimization").Adafactor(params, **options)
    if name == "adamw8bit":
        return pytest.importorskip("bitsandbytes").optim.AdamW8bit(params, **options)
    galore = pytest.importorskip("galore_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(galore, GALORE[name])(params, **options)


# -- the models ------------------------------------------------------------------------------------
def _mlp() -> tuple[nn.Module, callable]:
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 160), nn.LayerNorm(160), nn.Linear(160, 10))
    return model, lambda: model(torch.randn(64, 32)).square().mean()


def _cnn() -> tuple[nn.Module, callable]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # 432 entries: dense
        nn.Conv2d(16, 48, 3, padding=1),  # Tucker-2
        nn.Conv2d(48, 64, 3, padding=1),  # Tucker-2
        nn.Conv2d(64, 40, 1),  # 1x1: the (40, 64) matrix
        nn.Conv2d(40, 4, 1),  # small 1x1
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )
    return model, lambda: model(torch.randn(32, 3, 6, 6)).square().mean()


def _llama() -> tuple[nn.Module, callable]:
    pytest.importorskip("transformers")
    from coap_bench.llama_model import LlamaPreset, build_llama

    model = build_llama(LlamaPreset(64, 128, 2, 2, 32), 101, seed=0)
    return model, lambda: model(input_ids=torch.randint(0, 101, (8, 32)), labels=torch.randint(0, 101, (8, 32))).loss


def _unet() -> tuple[nn.Module, callable]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip
    return model, lambda: model(torch.randn(16, 3, 8, 8), torch.randint(0, 1000, (16,))).sample.square().mean()


MODELS = {"mlp": _mlp, "cnn": _cnn, "llama": _llama, "unet": _unet}


def _inputs(name: str, model: nn.Module) -> tuple[object, object, dict]:
    """(what the estimator gets, what the real optimizer gets, options): the same configuration."""
    options = _options(name)
    if name.startswith("galore_"):
        matrices = [p for p in model.parameters() if p.ndim == 2 and min(p.shape) > 8]
        rest = [p for p in model.parameters() if all(p is not q for q in matrices)]
        groups = [{"params": matrices, "rank": 8, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"},
                  {"params": rest}]  # fmt: skip
        return groups, groups, options
    if name in COAP and hasattr(model, "lm_head"):  # the paper's LLaMA recipe: embeddings and head dense
        from coap_bench.llama_model import projected_parameter_groups

        split = projected_parameter_groups(model, "paper")
        named = [{"params": split.projected}, {"params": split.dense, "coap": False}]
        return named, split.param_groups(dense_options={"coap": False}), options
    return model, model.parameters(), options


def _per_parameter(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes of each parameter's own state (bitsandbytes' shared code maps left out)."""
    sizes = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = {k: v for k, v in optimizer.state.get(param, {}).items() if not str(k).startswith("qmap")}
            sizes.append(
                optimizer_state_nbytes(SimpleNamespace(state={param: state}, param_groups=[{"params": [param]}]))
            )
    return sizes


def _nonzero(by_key: dict[str, int]) -> dict[str, int]:
    return {key: value for key, value in by_key.items() if value}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # rank-deficient first gradients of tiny models
# Ours are tests/test_estimate.py's (the suite passes them to the library: test_ours_are_the_library_estimate).
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", PEER_NAMES)
def test_estimate_matches_the_real_state_to_the_byte(name, model_name, monkeypatch):
    # GaLore's 8-bit AdamW synchronizes CUDA after every parameter; on a CPU-only build that raises.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model, loss = MODELS[model_name]()
    estimated_from, params, options = _inputs(name, model)
    estimate = estimate_state_bytes(estimated_from, name, **options)
    optimizer = _real(name, params, options)
    for step in range(1, 6):  # across both kinds of refresh
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        if step in (1, 5):
            assert optimizer_state_nbytes(optimizer) == estimate.total, f"after step {step}"
            assert _nonzero(state_nbytes_by_kind(optimizer)) == _nonzero(estimate.by_key)
            assert _per_parameter(optimizer) == list(estimate.per_parameter.values())


def test_a_7b_model_on_meta_costs_nothing():
    pytest.importorskip("transformers")
    from coap_bench.llama_model import build_llama, projected_parameter_groups

    model = build_llama("7b", 32000, seed=0, device="meta", dtype=torch.bfloat16)
    split = projected_parameter_groups(model, "paper")
    groups = split.param_groups(projected_options={"rank": 1024}, dense_options={"coap": False})
    started = time.perf_counter()
    adamw = estimate_state_bytes(model, "adamw")
    coap = estimate_state_bytes(groups, "coap_adamw8bit")
    assert time.perf_counter() - started < 2.0
    assert adamw.total == 2 * 2 * sum(p.numel() for p in model.parameters())  # two bf16 moments
    # Float32 P on the smaller side (the library's default) of every matrix: (4096, 1024) for
    # q, k, v, o, gate, up and down alike.
    assert coap.by_key["proj"] == 4 * 32 * (4 * 4096 * 1024 + 3 * 4096 * 1024)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_inputs_module_tensors_named_pairs_and_groups_agree():
    model, _ = _mlp()
    by_module = estimate_state_bytes(model, "coap_adamw")
    assert list(by_module.per_parameter) == [name for name, _ in model.named_parameters()]
    assert estimate_state_bytes(list(model.parameters()), "coap_adamw").total == by_module.total
    assert estimate_state_bytes(list(model.named_parameters()), "coap_adamw").per_parameter == by_module.per_parameter
    groups = [{"params": list(model.named_parameters())[:2]}, {"params": list(model.named_parameters())[2:]}]
    assert estimate_state_bytes(groups, "coap_adamw").per_parameter == by_module.per_parameter


def test_group_options_and_opt_out():
    weight = nn.Parameter(torch.empty(256, 128, device="meta"))
    dense = estimate_state_bytes([{"params": [weight], "coap": False}], "coap_adamw")
    assert dense.total == 2 * 4 * 256 * 128
    ranked = estimate_state_bytes([{"params": [weight], "rank": 16}], "coap_adamw", rank_ratio_matrix=2)
    assert ranked.total == 4 * (128 * 16 + 2 * 256 * 16)  # the group's rank beats the default ratio


def test_result_type_and_frozen_parameters():
    model, _ = _mlp()
    model[0].requires_grad_(False)
    estimate = estimate_state_bytes(model, "adamw")
    assert isinstance(estimate, StateEstimate) and int(estimate) == estimate.total
    assert estimate.per_parameter["0.weight"] == 0 and estimate.per_parameter["0.bias"] == 0
    assert estimate.total == sum(estimate.per_parameter.values()) + estimate.shared
    assert "adamw" in str(estimate) and "MiB" in str(estimate)


def test_bitsandbytes_code_maps_count_once():
    pytest.importorskip("bitsandbytes")
    model, _ = _mlp()
    estimate = estimate_state_bytes(model, "adamw8bit", min_8bit_size=256)
    assert estimate.shared == 2 * 256 * 4
    assert estimate.by_key["qmap1"] == estimate.by_key["qmap2"] == 256 * 4


def test_the_names_are_the_peers_then_ours():
    assert OPTIMIZER_NAMES == (*PEER_NAMES, *COAP) and not set(PEER_NAMES) & set(COAP)


@pytest.mark.parametrize("name", list(COAP))
def test_ours_are_the_library_estimate(name):
    model, _ = _cnn()
    options = _options(name)
    ours, library = estimate_state_bytes(model, name, **options), estimate_our_state_bytes(model, name, **options)
    assert (ours.total, ours.per_parameter, ours.by_key) == (library.total, library.per_parameter, library.by_key)


def test_the_default_rank_ratio_is_the_optimizers():
    """coap_bench.optimizers.DEFAULT_RANK_RATIO: the rank our optimizers give a matrix when no ratio is set."""
    weight = torch.empty(96, 160, device="meta")
    planned = CoapAdamW([weight]).planned_state(weight)
    assert planned["proj"].shape[-1] == int(96 // DEFAULT_RANK_RATIO)


def test_unknown_name_lists_the_known_ones():
    model, _ = _mlp()
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*coap_adamw8bit"):
        estimate_state_bytes(model, "adam")


def test_bad_options_raise_the_optimizers_own_errors():
    model, _ = _mlp()
    with pytest.raises(TypeError, match="coap_adamw: .*rank_ratio"):
        estimate_state_bytes(model, "coap_adamw", rank_ratios=2)
    with pytest.raises(ValueError, match="rank_ratio_matrix"):
        estimate_state_bytes(model, "coap_adamw", rank_ratio_matrix=0.5)
    with pytest.raises(TypeError, match="adamw: "):
        estimate_state_bytes(model, "adamw", rank=4)
    with pytest.raises(ValueError, match="no parameters"):
        estimate_state_bytes([], "adamw")


def test_galore_options():
    pytest.importorskip("galore_torch")
    model, _ = _cnn()
    with pytest.raises(ValueError, match="GaLore projects matrices only.*0.weight"):
        estimate_state_bytes([{"params": list(model.named_parameters()), "rank": 4}], "galore_adamw")
    with pytest.raises(ValueError, match="set 'rank' in the groups"):
        estimate_state_bytes([{"params": list(model.parameters())}], "galore_adamw", rank=4)
    # A model with rank=...: every matrix projected, everything else plain.
    projected = estimate_state_bytes(model, "galore_adamw", rank=4)
    assert projected.by_key["projector"] > 0 and projected.total < estimate_state_bytes(model, "galore_adamw").total


def test_missing_peer_package_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    model, _ = _mlp()
    with pytest.raises(ImportError, match="bitsandbytes is not installed"):
        estimate_state_bytes(model, "adamw8bit")


def test_docstring_example_runs():
    result = doctest.testmod(coap_bench.state_layouts, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", PEER_NAMES)
def test_bf16_parameters(name, monkeypatch):
    """Each peer's own state dtypes (ours: tests/test_estimate.py): torch keeps bf16 moments, Adafactor float32,
    GaLore a compact bf16 projector (its float32 view only pins the SVD for float32 gradients)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model, _ = _mlp()
    model.to(torch.bfloat16)
    estimated_from, params, options = _inputs(name, model)
    estimate = estimate_state_bytes(estimated_from, name, **options)
    optimizer = _real(name, params, options)
    model(torch.randn(64, 32, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    assert optimizer_state_nbytes(optimizer) == estimate.total
