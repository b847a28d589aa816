"""estimate_peak_bytes on the suite's LLaMA presets: the estimate, from a forward and backward of two
sequences scaled to the run's batch, against the peak of real training steps at that batch on the CPU
(``coap-bench llama``'s model, loss, batch and paper recipe), within 10%. At the runs' default batch the
activations set the peak (early in the backward); at a batch of one, the gradients and the update do
(at the optimizer step, or at a per-layer update).

The measured figure is every byte alive during three steps, the first included: the weights, the
optimizer state and what the steps allocate (PeakAllocations, with the weights and the state passed
as ``existing``). COAP refreshes P at every step after the first (a low-cost SVD at the second, an
Eq. 2 update at the third), so that both kinds of refresh are among the measured steps."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from coap_bench.llama import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN_CAP, LLAMA_PRESETS, PAPER_RANKS, causal_lm_loss
from coap_bench.llama_model import build_llama, projected_parameter_groups
from coap_torch import CoapAdamW
from coap_torch.optim import enable_per_layer_updates
from coap_torch.utils import optimizer_state_nbytes
from coap_torch.utils.allocations import PeakAllocations
from coap_torch.utils.memory import _tensors
from coap_torch.utils.peak import estimate_peak_bytes

VOCAB = 4096  # the CPU benchmark's vocabulary (LlamaConfig.vocab_size)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: one thread is faster, and immune to a busy machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REFRESHING = {"update_interval": 1, "reproject_factor": 2, "lr": 1e-3}


def _tokens(preset: str, batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, DEFAULT_SEQ_LEN_CAP[preset] + 1), generator=generator)


def _setup(preset: str, recipe: str) -> tuple[torch.nn.Module, list[dict]]:
    model = build_llama(LLAMA_PRESETS[preset], VOCAB, seed=0)
    model.train()
    if recipe == "dense":
        return model, [{"params": list(model.parameters()), "coap": False}]
    split = projected_parameter_groups(model, "paper")
    return model, split.param_groups({"rank": PAPER_RANKS[preset]}, {"coap": False})


def _measured(
    preset: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, per_layer: bool
) -> int:
    updates = enable_per_layer_updates(optimizer) if per_layer else None
    peak = 0
    for seed in range(3):
        batch = _tokens(preset, batch_size, seed)
        existing = itertools.chain(model.parameters(), model.buffers(), _tensors(optimizer.state))
        with PeakAllocations(existing=existing) as allocations:
            causal_lm_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = max(peak, allocations.peak_bytes)
    if updates is not None:
        updates.remove()
    return peak


def _check(preset: str, recipe: str, per_layer: bool, batch_size: int | None = None) -> None:
    batch_size = batch_size or DEFAULT_BATCH_SIZE[preset]
    model, groups = _setup(preset, recipe)
    estimate = estimate_peak_bytes(
        model, "coap_adamw", sample_batch=_tokens(preset, 2, 100), batch_size=batch_size,
        forward=causal_lm_loss, params=groups, per_layer_updates=per_layer, **REFRESHING,
    )  # fmt: skip
    optimizer = CoapAdamW(groups, **REFRESHING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*numerical rank", category=RuntimeWarning)
        real = _measured(preset, model, optimizer, batch_size, per_layer)
    assert estimate.state == optimizer_state_nbytes(optimizer)
    assert estimate.total == sum(estimate.parts.values())
    expected = "backward" if batch_size > 1 else "per-layer update" if per_layer else "optimizer step"
    assert estimate.phase == expected
    assert abs(estimate.total / real - 1) < 0.10, (preset, recipe, per_layer, estimate.total, real, str(estimate))


CASES = [("paper", False, None), ("paper", True, None), ("dense", False, None), ("paper", False, 1), ("paper", True, 1)]


@pytest.mark.parametrize(("recipe", "per_layer", "batch_size"), CASES)
def test_micro_preset(recipe, per_layer, batch_size):
    _check("micro", recipe, per_layer, batch_size)


def test_tiny_preset_with_per_layer_updates():
    _check("tiny", "paper", True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "per_layer", "batch_size"), [case for case in CASES if case != ("paper", True, None)]
)
def test_tiny_preset(recipe, per_layer, batch_size):
    _check("tiny", recipe, per_layer, batch_size)
