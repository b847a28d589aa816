"""estimate_peak_bytes against the measured peak of real training steps on the CPU.

The measured figure is every byte alive during the steps: the weights, the optimizer state and
everything the steps allocate, counted by PeakAllocations (the weights and the state passed as
``existing``, so that a refresh that replaces state tensors is counted as the memory it holds).
LLaMA presets of the benchmark suite are checked in benchmarks/tests/test_peak_llama.py."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coap_torch.utils.peak
from coap_torch import CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_torch.optim import enable_per_layer_updates
from coap_torch.utils import optimizer_state_nbytes
from coap_torch.utils.allocations import PeakAllocations
from coap_torch.utils.memory import _tensors
from coap_torch.utils.peak import PeakEstimate, estimate_peak_bytes

VOCAB, SEQ, WIDTH = 512, 16, 128
#: COAP refreshes P at every step after the first (a low-cost SVD at the second, an Eq. 2 update at the
#: third): the three measured steps include the initial P and both kinds of refresh.
REFRESHING = {"update_interval": 1, "reproject_factor": 2, "lr": 1e-3}


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention written out (the same ops on every device,
    meta included), then a GELU MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.out(scores.masked_fill(causal, float("-inf")).softmax(-1) @ v)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, depth: int = 3, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(tokens))))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def tokens(batch_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(device=device, dtype=dtype)


def measured_peak(net: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, per_layer: bool) -> int:
    """The most bytes alive during three training steps, the first (which creates the state) included."""
    updates = enable_per_layer_updates(optimizer) if per_layer else None
    peak = 0
    for seed in range(3):
        batch = tokens(batch_size, seed)  # made before: the estimate leaves the batch out
        existing = itertools.chain(net.parameters(), net.buffers(), _tensors(optimizer.state))
        with PeakAllocations(existing=existing) as allocations:
            lm_loss(net, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = max(peak, allocations.peak_bytes)
    if updates is not None:
        updates.remove()
    return peak


CASES = {
    # name: (optimizer, its class, options, batch size, per-layer updates, where the peak is)
    "coap-small-batch": ("coap_adamw", CoapAdamW, {"rank_ratio_matrix": 2}, 4, False, "optimizer step"),
    "coap-per-layer": ("coap_adamw", CoapAdamW, {"rank_ratio_matrix": 2}, 4, True, "per-layer update"),
    "coap-large-batch": ("coap_adamw", CoapAdamW, {"rank_ratio_matrix": 2}, 96, False, "backward"),
    "dense-small-batch": ("coap_adamw", CoapAdamW, {"coap": False}, 4, False, "optimizer step"),
    "dense-per-layer": ("coap_adamw", CoapAdamW, {"coap": False}, 4, True, "per-layer update"),
    "8bit-per-layer": ("coap_adafactor8bit", CoapAdafactor8bit, {"beta1": 0.9, "min_8bit_size": 256}, 4, True,
                       "per-layer update"),
    "torch-adamw": ("adamw", torch.optim.AdamW, {}, 4, False, "optimizer step"),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*numerical rank:RuntimeWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_estimate_is_within_ten_percent_of_the_measured_peak(case):
    name, cls, options, batch_size, per_layer, phase = CASES[case]
    options = {**options, **(REFRESHING if name != "adamw" else {"lr": 1e-3})}
    net = model()
    estimate = estimate_peak_bytes(
        net, name, sample_batch=tokens(2, 0), batch_size=batch_size, forward=lm_loss,
        per_layer_updates=per_layer, **options,
    )  # fmt: skip
    optimizer = cls(net.parameters(), **options)
    real = measured_peak(net, optimizer, batch_size, per_layer)
    assert estimate.phase == phase
    assert estimate.state == optimizer_state_nbytes(optimizer)
    assert abs(estimate.total / real - 1) < 0.10, (case, estimate.total, real, str(estimate))


def test_the_parts_add_up_and_follow_the_documented_rules():
    net = model()
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    largest = max(p.numel() * p.element_size() for p in net.parameters())
    regular = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(2, 0), batch_size=2, forward=lm_loss)
    per_layer = estimate_peak_bytes(
        net, "coap_adamw", sample_batch=tokens(2, 0), batch_size=2, forward=lm_loss, per_layer_updates=True
    )
    for estimate in (regular, per_layer):
        assert isinstance(estimate, PeakEstimate) and int(estimate) == estimate.total
        assert estimate.total == sum(estimate.parts.values()) == round(estimate.mib * 2**20)
        assert estimate.weights == weights and estimate.all_gradients == weights  # every parameter trains
    # At the step every gradient is alive; with per-layer updates never more than one or two at once.
    assert regular.phase == "optimizer step" and regular.gradients == weights
    assert 0 < per_layer.gradients <= 2 * largest and per_layer.total < regular.total
    assert "per-layer updates" in str(per_layer) and f"{per_layer.total:,} bytes" in str(per_layer)


def test_activations_scale_with_the_batch():
    net = model()
    kwargs = {"forward": lm_loss, "batch_size": 64, "rank_ratio_matrix": 2}
    scaled = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(4, 0), **kwargs)
    direct = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(64, 0), **kwargs)
    assert scaled.phase == direct.phase == "backward"
    assert (scaled.sample_batch_size, scaled.batch_size) == (4, 64)
    # The causal mask and the like do not grow with the batch: scaled, they overestimate a little.
    assert direct.activations <= scaled.activations < 1.02 * direct.activations


def test_a_meta_model_gives_the_cpu_figures():
    kwargs = {"forward": lm_loss, "batch_size": 32, "rank_ratio_matrix": 2}
    on_cpu = estimate_peak_bytes(model(), "coap_adamw", sample_batch=tokens(2, 0), **kwargs)
    with torch.device("meta"):
        meta = TinyLM()
    on_meta = estimate_peak_bytes(meta, "coap_adamw", sample_batch=tokens(2, 0), **kwargs)  # batch moved to meta
    assert on_meta == on_cpu


def test_bf16_weights_and_state_dtype():
    net = model(dtype=torch.bfloat16)
    fp32 = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(2, 0), forward=lm_loss)
    bf16 = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(2, 0), forward=lm_loss, state_dtype="bfloat16")
    assert fp32.weights == sum(p.numel() * 2 for p in net.parameters())
    assert 2 * bf16.state == fp32.state  # P and both moments at 2 bytes instead of 4


def test_param_groups_and_an_optimizer_class():
    net = model()
    matrices = [p for n, p in net.named_parameters() if n.startswith("blocks") and p.dim() == 2]
    rest = [p for p in net.parameters() if all(p is not m for m in matrices)]
    groups = [{"params": matrices, "rank": 16}, {"params": rest, "coap": False}]
    grouped = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(2, 0), forward=lm_loss, params=groups)
    assert grouped.state == optimizer_state_nbytes(_stepped(CoapAdamW(groups), net))
    flat = estimate_peak_bytes(net, "coap_adamw", sample_batch=tokens(2, 0), forward=lm_loss, params=net.parameters())
    assert flat.state == optimizer_state_nbytes(_stepped(CoapAdamW(net.parameters()), net))  # a generator, used twice
    # Any optimizer class, given its state's bytes; its update measured by running it.
    by_class = estimate_peak_bytes(
        net, torch.optim.SGD, sample_batch=tokens(2, 0), forward=lm_loss, state_bytes=0, lr=0.1
    )
    assert by_class.optimizer == "SGD" and by_class.state == 0


def _stepped(optimizer: torch.optim.Optimizer, net: nn.Module) -> torch.optim.Optimizer:
    lm_loss(net, tokens(8, 0)).backward()  # 128 tokens: gradients of a higher rank than the projections
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 1))
    net[0].weight.grad = torch.ones_like(net[0].weight)  # a gradient being accumulated
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = torch.randn(4, 8)
    rng = torch.get_rng_state()  # the forward's dropout draws from it
    estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward=lambda m, x: m(x).square().mean())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics included
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight)) and net[3].weight.grad is None


def test_the_default_forward_takes_the_loss_of_the_output():
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, labels: torch.Tensor):
            return type("Output", (), {"loss": F.mse_loss(self.linear(x), labels)})()

    estimate = estimate_peak_bytes(
        WithLoss(), "adamw", sample_batch={"x": torch.randn(4, 8), "labels": torch.zeros(4, 8)}
    )
    assert estimate.batch_size == estimate.sample_batch_size == 4


def test_replaced_state_is_counted_as_the_memory_it_holds():
    state = {"m": torch.zeros(1024)}
    with PeakAllocations(existing=state.values()) as peak:
        state["m"] = torch.ones(1024)  # the old tensor is freed: 8 KiB at most, 4 KiB after
    assert (peak.peak_bytes, peak.live_bytes) == (8192, 4096)


def test_bad_input_is_refused_with_the_argument_and_its_value():
    net = model()
    batch = tokens(2, 0)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*coap_adamw"):
        estimate_peak_bytes(net, "lion", sample_batch=batch, forward=lm_loss)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad!r}"):
            estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, batch_size=bad, forward=lm_loss)
    with pytest.raises(ValueError, match="sample_batch must hold a tensor with a batch dimension"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=3, forward=lm_loss)
    with pytest.raises(ValueError, match=r"forward must return the scalar loss, got a tensor of shape \(2, 16, 512\)"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward=lambda m, b: m(b[:, :-1]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        estimate_peak_bytes(list(net.parameters()), "coap_adamw", sample_batch=batch)
    with pytest.raises(TypeError, match="forward must be callable"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward="loss")
    with pytest.raises(TypeError, match="coap_adamw.*'rank_ratio'"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward=lm_loss, rank_ratio=4)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward=lm_loss, state_dtype="float16")
    with pytest.raises(ValueError, match="state_bytes is required for an optimizer class"):
        estimate_peak_bytes(net, torch.optim.SGD, sample_batch=batch, forward=lm_loss, lr=0.1)
    with pytest.raises(ValueError, match="state_bytes must be a non-negative int, got -1"):
        estimate_peak_bytes(net, torch.optim.SGD, sample_batch=batch, forward=lm_loss, state_bytes=-1, lr=0.1)
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        estimate_peak_bytes(frozen, "coap_adamw", sample_batch=torch.randn(2, 4), forward=lambda m, x: m(x).sum())
    updates = enable_per_layer_updates(CoapAdamW(net.parameters()))
    with pytest.raises(ValueError, match="parameter 'embed.weight' has a post-accumulate-grad hook"):
        estimate_peak_bytes(net, "coap_adamw", sample_batch=batch, forward=lm_loss)
    updates.remove()
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="reads a tensor's value"):
        estimate_peak_bytes(
            meta, "coap_adamw", sample_batch=torch.randn(2, 4), forward=lambda m, x: m(x).sum() * float(x.max())
        )


def test_docstring_example_runs():
    result = doctest.testmod(coap_torch.utils.peak, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("name", "cls", "options"),
    [("coap_adamw8bit", CoapAdamW8bit, {}), ("coap_adamw", CoapAdamW, {"state_dtype": torch.bfloat16})],
)
def test_large_dense_parameters_stepped_in_chunks(name, cls, options):
    # A dense weight of 2.56M entries with converted state is stepped a chunk at a time: its update's
    # temporaries do not grow with its size, and the estimate must not extend them as if they did.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 40000), nn.Tanh(), nn.Linear(40000, 8))
    options = {**options, "coap": False, "lr": 1e-3}

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    def batch(size: int, seed: int) -> torch.Tensor:
        return torch.randn(size, 64, generator=torch.Generator().manual_seed(seed))

    estimate = estimate_peak_bytes(net, name, sample_batch=batch(2, 0), batch_size=4, forward=loss, **options)
    optimizer = cls(net.parameters(), **options)
    assert optimizer.steps_in_chunks(net[0].weight)
    real = 0
    for seed in range(3):
        x = batch(4, seed)
        existing = itertools.chain(net.parameters(), _tensors(optimizer.state))
        with PeakAllocations(existing=existing) as allocations:
            loss(net, x).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        real = max(real, allocations.peak_bytes)
    assert abs(estimate.total / real - 1) < 0.10, (estimate.total, real, str(estimate))
