"""FSDP2 for every parameter COAP projects: Tucker-2 kernels, 1x1 convs, 3-D expert stacks,
dense kernels under Adafactor, and matrices with ``P`` on either side.

Two gloo ranks train a UNet-like net and an expert net in float32 at the default options (with
``update_interval=3, reproject_factor=2``, so that 8 steps cross an Eq. 2 step at 3 and a
re-projection at 6) for each optimizer; the tests compare them with one process on the whole
batch, check the collectives each step issued, and resume DCP checkpoints on 2 and on 1 rank.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_torch.utils import estimate_fsdp2_communication
from helpers.fsdp import (
    full_tensor,
    image_batch,
    make_expert_net,
    make_unet_like,
    make_unet_zero_head,
    token_batch,
    train_on,
)
from helpers.launch import launch

STEPS, SAVE_AT = 8, 4
# scale 1.0 as in helpers.fsdp.COAP; the net "experts_auto" trains at the norm-matched scale.
SCHEDULE = {"update_interval": 3, "reproject_factor": 2}
REFRESH = {**SCHEDULE, "scale": 1.0}
OPTIMIZERS = {
    "CoapAdamW": lambda params, **kw: CoapAdamW(params, **{**REFRESH, **kw}),
    "CoapAdamW8bit": lambda params, **kw: CoapAdamW8bit(params, **{**REFRESH, **kw}),
    "CoapAdafactor": lambda params, **kw: CoapAdafactor(params, **{**REFRESH, **kw}),
    "CoapAdafactor8bit": lambda params, **kw: CoapAdafactor8bit(params, beta1=0.9, **{**REFRESH, **kw}),
}
#: Each net, its batches, and the options it is trained with: the defaults, and the layouts
#: that need no collective on steady steps (P on the input side of matrices and of kernels).
NETS = {
    "unet": (make_unet_like, image_batch, {}),
    "experts": (make_expert_net, token_batch, {}),
    "unet_input": (make_unet_like, image_batch, {"projection_side": "input", "conv_projection": "input"}),
    "unet_larger": (make_unet_like, image_batch, {"projection_side": "larger"}),
    # bfloat16 state: P (replicated and row-split) and the moments (sharded like the weight).
    "unet_bf16": (make_unet_like, image_batch, {"state_dtype": "bf16"}),
    # The norm-matched scale, from global shapes: a rank whose shard of the stack is empty too.
    "experts_auto": (make_expert_net, token_batch, {"scale": "auto"}),
    # A zero-initialised head: the layers below it build their projections at step 2, alike on every rank.
    "unet_zero_head": (make_unet_zero_head, image_batch, {}),
}
#: The nets trained at the default options.
DEFAULTS = ("unet", "experts")
#: FSDP2 against one process after 8 float32 steps at the default options.
TOLERANCE = {"CoapAdamW": 1e-5, "CoapAdafactor": 1e-5, "CoapAdamW8bit": 1e-4, "CoapAdafactor8bit": 1e-4}
FAST = ["CoapAdamW", "CoapAdafactor"]


def _mesh(world_size):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _sharded(net, mesh):
    from torch.distributed.fsdp import fully_shard

    model = NETS[net][0]()
    for block in model.blocks():
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def snapshot(model, opt) -> dict:
    params = [full_tensor(p.detach()).clone() for p in model.parameters()]
    state = [{k: full_tensor(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return {"params": params, "state": state}


def _train(net, name, mesh, rank, world_size, folder):
    model = _sharded(net, mesh)
    opt = OPTIMIZERS[name](model.parameters(), **NETS[net][2])
    log = []
    batches = NETS[net][1]
    on_step = lambda step: log.append((opt.communication.calls, opt.communication.bytes))
    train_on(model, opt, batches, SAVE_AT, rank=rank, world_size=world_size, on_step=on_step)
    _save(model, opt, f"{folder}/{net}-{name}")
    train_on(model, opt, batches, STEPS - SAVE_AT, rank=rank, world_size=world_size, start=SAVE_AT, on_step=on_step)
    return {**snapshot(model, opt), "log": log, "sharded": _sharded_keys(opt)}


def _sharded_keys(opt):
    from torch.distributed.tensor import DTensor

    return [sorted(k for k, v in s.items() if isinstance(v, DTensor)) for s in opt.state.values()]


def _save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)


def _resume(net, name, mesh, rank, world_size, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(net, mesh)
    for p in model.parameters():  # everything must come from the checkpoint
        p.data.mul_(0.5)
    opt = OPTIMIZERS[name](model.parameters(), **NETS[net][2])
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": opt_sd}, checkpoint_id=f"{folder}/{net}-{name}")
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd)
    # One rank trains on the whole batch, two on its halves: the same gradients.
    train_on(model, opt, NETS[net][1], STEPS - SAVE_AT, rank=rank, world_size=world_size, start=SAVE_AT)
    return snapshot(model, opt)


def train_worker(rank, world_size, folder, names):
    mesh = _mesh(world_size)
    return {(net, name): _train(net, name, mesh, rank, world_size, folder) for net in NETS for name in names}


def resume_worker(rank, world_size, folder, names):
    mesh = _mesh(world_size)
    return {(net, name): _resume(net, name, mesh, rank, world_size, folder) for net in NETS for name in names}


#: The nets with bfloat16 state: its stochastic rounding draws per shard (a row shard from a stream
#: of its own), so FSDP2 equals one process in distribution, not to float rounding.
STOCHASTIC = ("unet_bf16",)


def one_process(net: str, name: str, halves: bool = False, **override) -> dict:
    """One process on the whole batch; with ``halves``, its gradient summed from the two ranks'
    halves (the order of sums data parallelism uses)."""
    make, batches, options = NETS[net]
    model = make()
    opt = OPTIMIZERS[name](model.parameters(), **{**options, **override})
    train_on(model, opt, batches, STEPS, accumulate=2 if halves else 1)
    return snapshot(model, opt)


def _largest_gap(a: dict, b: dict) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a["params"], b["params"]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dcp"))


def _runs(folder, names):
    trained = launch(train_worker, folder, names, world_size=2, timeout=300)
    resumed_2 = launch(resume_worker, folder, names, world_size=2, timeout=300)
    resumed_1 = launch(resume_worker, folder, names, world_size=1, timeout=300)
    return {"trained": trained, "resumed_2": resumed_2[0], "resumed_1": resumed_1[0]}


@pytest.fixture(scope="module")
def fast_runs(folder):
    return _runs(folder, FAST)


@pytest.fixture(scope="module")
def slow_runs(folder):
    return _runs(folder, [name for name in OPTIMIZERS if name not in FAST])


@pytest.fixture
def runs(request, fast_runs):
    name = request.node.callspec.params["name"]
    return fast_runs if name in FAST else request.getfixturevalue("slow_runs")


def _cases(nets=NETS) -> list:
    return [
        pytest.param(net, name, marks=[] if name in FAST else [pytest.mark.slow], id=f"{net}-{name}")
        for net, name in itertools.product(nets, OPTIMIZERS)
    ]


#: The nets whose every projected parameter starts at step 1, as the traffic estimate counts: below
#: a zero head the first SVDs run at step 2, and those layers' refreshes one step after the others'.
SCHEDULED_FROM_STEP_1 = [net for net in NETS if net != "unet_zero_head"]


def _rounding_noise(net: str, name: str) -> float:
    """How far bfloat16 state moves one process from float32 state: the scale its rounding has."""
    return _largest_gap(one_process(net, name), one_process(net, name, state_dtype=torch.float32))


def assert_close(a, b, atol):
    for i, (p, q) in enumerate(zip(a["params"], b["params"])):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda m, i=i: f"parameter {i}: {m}")


@pytest.mark.parametrize(("net", "name"), _cases())
def test_fsdp2_equals_one_process(runs, net, name):
    fsdp, one = runs["trained"][0][net, name], one_process(net, name)
    if net in STOCHASTIC:
        # Other rounding draws on each shard: two independent draws are about sqrt(2) times as far
        # apart as one draw is from float32 state; FSDP2 stays within twice that (and ranks still
        # agree bitwise, and resume bitwise on 2 ranks).
        noise = _rounding_noise(net, name)
        assert 0 < _largest_gap(fsdp, one) <= 2 * noise
    elif net in DEFAULTS:
        assert_close(fsdp, one, TOLERANCE[name])
    else:
        # In float32 no two orders of sums agree bitwise, and Adam's first steps (the sign of
        # each projected coordinate) amplify that by the net's conditioning: FSDP2 must stay
        # within a small factor of what summing the two halves' gradients does to one process.
        # 8-bit moments that shard are quantized in blocks of whole rows (never across a shard
        # boundary), where one process takes blocks of 256 across rows: other blocks, other codes.
        floor = 1e-3 if name.endswith("8bit") else TOLERANCE[name]
        reordered = _largest_gap(one_process(net, name, halves=True), one)
        assert _largest_gap(fsdp, one) <= max(floor, 4 * reordered)


@pytest.mark.parametrize(("net", "name"), _cases())
def test_ranks_agree_bitwise(runs, net, name):
    first, second = (run[net, name] for run in runs["trained"])
    assert_close(first, second, 0.0)
    for x, y in zip(first["state"], second["state"]):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("net", "name"), _cases())
def test_dcp_resume_on_two_and_on_one_rank(runs, net, name):
    uninterrupted = runs["trained"][0][net, name]
    assert_close(runs["resumed_2"][net, name], uninterrupted, 0.0)
    if net in STOCHASTIC:  # one rank draws the rounding of the whole moment from one stream
        assert _largest_gap(runs["resumed_1"][net, name], uninterrupted) <= 2 * _rounding_noise(net, name)
    else:
        assert_close(runs["resumed_1"][net, name], uninterrupted, TOLERANCE[name])


#: What each optimizer of the file passes to the estimate (its routing and Adafactor options).
ESTIMATE_OPTIONS = {
    "CoapAdamW": ("coap_adamw", {}),
    "CoapAdamW8bit": ("coap_adamw8bit", {}),
    "CoapAdafactor": ("coap_adafactor", {}),
    "CoapAdafactor8bit": ("coap_adafactor8bit", {"beta1": 0.9}),
}


@pytest.mark.parametrize(("net", "name"), _cases(SCHEDULED_FROM_STEP_1))
def test_traffic_is_the_estimate_to_the_byte(runs, net, name):
    optimizer, options = ESTIMATE_OPTIONS[name]
    model, net_options = NETS[net][0](), NETS[net][2]
    estimate = estimate_fsdp2_communication(
        model, optimizer=optimizer, world_size=2, **{**REFRESH, **options, **net_options}
    )
    for rank in (0, 1):
        log = runs["trained"][rank][net, name]["log"]
        if rank == 0:  # the estimate counts rank 0's all-to-all share (the larger one)
            assert log[-1][1] == estimate.bytes_over(STEPS, **SCHEDULE)
        calls = [log[0][0]] + [b[0] - a[0] for a, b in itertools.pairwise(log)]
        steady = [calls[step - 1] for step in (2, 4, 5, 7, 8)]
        # One round per step for the projections summed over the ranks (and Adafactor's
        # statistics in two), whatever the number of parameters; refreshes add theirs.
        assert len(set(steady)) == 1 and steady[0] <= 3, calls
        assert all(calls[step - 1] > steady[0] for step in (1, 3, 6)), calls
        if net == "unet_input" and "AdamW" in name:
            assert steady == [0] * 5 and estimate.steady_step_bytes == 0


def test_input_side_layouts_are_what_the_net_is_trained_with():
    from coap_torch.optim import layout_of

    model = make_unet_like()
    kinds = [
        layout_of(p, {**CoapAdamW(model.parameters()).defaults, **NETS["unet_input"][2]}).kind
        for p in model.parameters()
    ]
    assert kinds.count("conv_input") == 2 and "tucker" not in kinds


def old_default_worker(rank, world_size):
    """A state built with P on the input side (FSDP2's default before it followed one process),
    loaded into an optimizer at today's default: refused, with what loads it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = _mesh(world_size)
    model = _sharded("unet", mesh)
    opt = OPTIMIZERS["CoapAdamW"](model.parameters(), projection_side="input")
    train_on(model, opt, image_batch, 2, rank=rank, world_size=world_size)
    model_sd, opt_sd = get_state_dict(model, opt)
    for group in opt_sd["param_groups"]:  # as those versions saved it: the default, None
        group["projection_side"] = None
    fresh = OPTIMIZERS["CoapAdamW"](model.parameters())
    try:
        set_state_dict(model, fresh, model_state_dict=model_sd, optim_state_dict=opt_sd)
    except ValueError as error:
        return str(error)
    return None


def test_state_of_the_old_fsdp2_default_is_refused_with_the_option_that_loads_it():
    message = launch(old_default_worker, world_size=2, timeout=120)[0]
    assert message is not None and "the FSDP2 default of earlier versions" in message
    assert "build the optimizer with projection_side='input' to load it" in message
    assert "(24, 33, 1, 1)" in message  # the first parameter whose side changed: the wide 1x1 conv
