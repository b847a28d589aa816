"""Large dense parameters with converted state (8-bit, bfloat16) are stepped a chunk at a time:
the same result as the whole-tensor step (8-bit: bitwise), and a fraction of its memory."""

from __future__ import annotations

import io

import pytest
import torch

from coap_torch import CoapAdamW, CoapAdamW8bit
from coap_torch.optim import _base
from coap_torch.utils.allocations import PeakAllocations

CHUNK = _base.DENSE_CHUNK_NUMEL
#: Five chunks, the last one shorter than min_8bit_size (4096) and not a whole number of blocks.
SHAPE = (4 * CHUNK // 512 + 1, 512 + 1)


def _train(cls, steps, *, whole=False, start=0, state=None, **options):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(SHAPE) * 0.02)
    bias = torch.nn.Parameter(torch.zeros(SHAPE[1]))
    opt = cls([weight, bias], lr=1e-2, coap=False, **options)
    if state is not None:
        weight.data.copy_(state["weight"])
        opt.load_state_dict(state["opt"])
    chunk = _base.DENSE_CHUNK_NUMEL
    try:
        if whole:
            _base.DENSE_CHUNK_NUMEL = 10**12  # the whole-tensor path
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(step)
            weight.grad = torch.randn(SHAPE, generator=g) * 1e-3
            bias.grad = torch.randn(SHAPE[1], generator=g) * 1e-3
            opt.step()
    finally:
        _base.DENSE_CHUNK_NUMEL = chunk
    return weight, opt


@pytest.mark.parametrize(
    "options", [{}, {"amsgrad": True}, {"block_size": 96}, {"weight_decay": 0.1, "maximize": True}]
)
def test_8bit_chunked_step_is_the_whole_tensor_step_bitwise(options):
    assert SHAPE[0] * SHAPE[1] > CHUNK
    chunked, chunked_opt = _train(CoapAdamW8bit, 4, **options)
    whole, whole_opt = _train(CoapAdamW8bit, 4, whole=True, **options)
    assert torch.equal(chunked, whole)
    state, reference = chunked_opt.state[chunked], whole_opt.state[whole]
    assert state.keys() == reference.keys() and "exp_avg_codes" in state
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdamW8bit])
def test_bf16_chunked_step_rounds_like_the_whole_tensor_step_and_resumes_bitwise(cls):
    chunked, chunked_opt = _train(cls, 4, state_dtype="bf16")
    whole, _ = _train(cls, 4, whole=True, state_dtype="bf16")
    # Other stochastic-rounding draws: the weights agree to about a bfloat16 unit (2^-8) of the
    # 4 updates of lr 1e-2 they made.
    torch.testing.assert_close(chunked, whole, rtol=0, atol=4 * 1e-2 * 2**-6)
    assert chunked_opt.state[chunked]["step"] == 4
    assert all(
        v.dtype in (torch.bfloat16, torch.uint8, torch.float32, torch.int64)
        for v in chunked_opt.state[chunked].values()
    )
    buffer = io.BytesIO()
    torch.save({"weight": chunked.detach().clone(), "opt": chunked_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    straight, _ = _train(cls, 7, state_dtype="bf16")
    resumed, _ = _train(cls, 3, start=4, state=saved, state_dtype="bf16")
    assert torch.equal(resumed, straight)


def test_chunked_step_holds_a_chunk_of_widened_moments_not_the_tensor():
    # Measured with the allocation tracker: the whole-tensor step widens both moments of the
    # 1.05M-entry weight (2 x 4 MiB, and its temporaries); the chunked one holds a chunk at a time.
    weight, opt = _train(CoapAdamW8bit, 1)
    whole, whole_opt = _train(CoapAdamW8bit, 1, whole=True)
    weight.grad = torch.randn(SHAPE) * 1e-3
    whole.grad = weight.grad.clone()
    with PeakAllocations() as chunked_peak:
        opt.step()
    chunk = _base.DENSE_CHUNK_NUMEL
    _base.DENSE_CHUNK_NUMEL = 10**12
    try:
        with PeakAllocations() as whole_peak:
            whole_opt.step()
    finally:
        _base.DENSE_CHUNK_NUMEL = chunk
    numel = SHAPE[0] * SHAPE[1]
    assert whole_peak.peak_bytes >= 2 * 4 * numel  # both moments widened at once
    assert chunked_peak.peak_bytes < 0.6 * whole_peak.peak_bytes


@pytest.mark.parametrize("options", [{}, {"state_dtype": "bf16"}])
def test_the_first_step_is_chunked_too(options):
    # No state yet: it is created as stored zeros (8-bit: zero scales) and stepped in chunks, so
    # the first step does not widen whole moments either.
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(SHAPE) * 0.02)
    opt = CoapAdamW8bit([weight], lr=1e-2, coap=False, **options)
    assert opt.steps_in_chunks(weight)
    weight.grad = torch.randn(SHAPE) * 1e-3
    with PeakAllocations() as peak:
        opt.step()
    state_bytes = sum(v.numel() * v.element_size() for k, v in opt.state[weight].items() if k != "step")
    assert peak.peak_bytes - state_bytes < 8 * 2**20  # a few chunk-sized temporaries (4 MiB moments otherwise)
    assert not CoapAdamW([weight], coap=False).steps_in_chunks(weight)  # float32 state: in place already
