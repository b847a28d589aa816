"""estimate_state_bytes against the real optimizer state, to the byte, for each of our optimizers.

Other libraries' optimizers are the benchmark suite's (benchmarks/tests/test_state_layouts.py)."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import coap_torch.utils.estimate
from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit, StateEstimate, estimate_state_bytes
from coap_torch.utils import optimizer_state_nbytes, state_nbytes_by_kind
from coap_torch.utils.estimate import OPTIMIZER_NAMES

COAP = {"coap_adamw": CoapAdamW, "coap_adamw8bit": CoapAdamW8bit,
        "coap_adafactor": CoapAdafactor, "coap_adafactor8bit": CoapAdafactor8bit}  # fmt: skip
ADAFACTOR = {"beta1": 0.9, "lr": 1e-3, "relative_step": False}
# Refreshes at steps 2 (Eq. 2 step) and 4 (low-cost SVD).
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
    options.update(COAP_OPTIONS)
    if name.endswith("8bit"):
        options["min_8bit_size"] = 256  # small models: exercise both the 8-bit and the float32 paths
    return options


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


def _unet() -> tuple[nn.Module, callable]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip
    return model, lambda: model(torch.randn(16, 3, 8, 8), torch.randint(0, 1000, (16,))).sample.square().mean()


MODELS = {"mlp": _mlp, "cnn": _cnn, "unet": _unet}


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


def test_the_names_are_our_four_optimizers():
    assert OPTIMIZER_NAMES == tuple(COAP)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # rank-deficient first gradients of tiny models
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_estimate_matches_the_real_state_to_the_byte(name, model_name, state_dtype):
    torch.manual_seed(0)
    model, loss = MODELS[model_name]()
    options = {**_options(name), "state_dtype": state_dtype}
    estimate = estimate_state_bytes(model, name, **options)
    optimizer = COAP[name](model.parameters(), **options)
    for step in range(1, 6):  # across both kinds of refresh
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        if step in (1, 5):
            assert optimizer_state_nbytes(optimizer) == estimate.total, f"after step {step}"
            assert _nonzero(state_nbytes_by_kind(optimizer)) == _nonzero(estimate.by_key)
            assert _per_parameter(optimizer) == list(estimate.per_parameter.values())


def test_inputs_module_tensors_named_pairs_and_groups_agree():
    model, _ = _mlp()
    by_module = estimate_state_bytes(model, "coap_adamw")
    assert list(by_module.per_parameter) == [name for name, _ in model.named_parameters()]
    assert estimate_state_bytes(list(model.parameters()), "coap_adamw").total == by_module.total
    assert estimate_state_bytes(list(model.named_parameters()), "coap_adamw").per_parameter == by_module.per_parameter
    groups = [{"params": list(model.named_parameters())[:2]}, {"params": list(model.named_parameters())[2:]}]
    assert estimate_state_bytes(groups, "coap_adamw").per_parameter == by_module.per_parameter


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # rank-deficient first gradients of tiny models
def test_groups_with_a_dense_opt_out_match_the_real_state():
    torch.manual_seed(0)
    model, loss = _mlp()
    named = list(model.named_parameters())
    estimate = estimate_state_bytes(
        [{"params": named[:2]}, {"params": named[2:], "coap": False}], "coap_adamw", **COAP_OPTIONS
    )
    optimizer = CoapAdamW(
        [{"params": [p for _, p in named[:2]]}, {"params": [p for _, p in named[2:]], "coap": False}], **COAP_OPTIONS
    )
    for _ in range(2):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert optimizer_state_nbytes(optimizer) == estimate.total
    assert _per_parameter(optimizer) == list(estimate.per_parameter.values())


def test_group_options_and_opt_out():
    weight = nn.Parameter(torch.empty(256, 128, device="meta"))
    dense = estimate_state_bytes([{"params": [weight], "coap": False}], "coap_adamw")
    assert dense.total == 2 * 4 * 256 * 128
    ranked = estimate_state_bytes([{"params": [weight], "rank": 16}], "coap_adamw", rank_ratio_matrix=2)
    assert ranked.total == 4 * (128 * 16 + 2 * 256 * 16)  # the group's rank beats the default ratio


def test_result_type_and_frozen_parameters():
    model, _ = _mlp()
    model[0].requires_grad_(False)
    estimate = estimate_state_bytes(model, "coap_adamw")
    assert isinstance(estimate, StateEstimate) and int(estimate) == estimate.total
    assert estimate.per_parameter["0.weight"] == 0 and estimate.per_parameter["0.bias"] == 0
    assert estimate.total == sum(estimate.per_parameter.values()) and estimate.shared == 0
    assert "coap_adamw" in str(estimate) and "MiB" in str(estimate)


@pytest.mark.parametrize("name", ["adam", "adamw", "galore_adamw"])
def test_unknown_name_lists_the_known_ones_and_where_the_peers_are(name):
    model, _ = _mlp()
    with pytest.raises(ValueError, match=f"unknown optimizer '{name}'.*coap_adamw8bit.*coap-bench memory"):
        estimate_state_bytes(model, name)


def test_bad_options_raise_the_optimizers_own_errors():
    model, _ = _mlp()
    with pytest.raises(TypeError, match="coap_adamw: .*rank_ratio"):
        estimate_state_bytes(model, "coap_adamw", rank_ratios=2)
    with pytest.raises(ValueError, match="rank_ratio_matrix"):
        estimate_state_bytes(model, "coap_adamw", rank_ratio_matrix=0.5)
    with pytest.raises(ValueError, match="no parameters"):
        estimate_state_bytes([], "coap_adamw")


def test_docstring_example_runs():
    result = doctest.testmod(coap_torch.utils.estimate, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bf16_parameters(name):
    """Our optimizers keep float32 state for bf16 parameters."""
    torch.manual_seed(0)
    model, _ = _mlp()
    model.to(torch.bfloat16)
    options = _options(name)
    estimate = estimate_state_bytes(model, name, **options)
    optimizer = COAP[name](model.parameters(), **options)
    model(torch.randn(64, 32, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    assert optimizer_state_nbytes(optimizer) == estimate.total
