"""Checkpoints written by earlier releases load, keep every saved tensor, and resume.

The fixtures under ``tests/fixtures/checkpoints/`` were written by ``tests/fixtures/make_checkpoints.py``
with the release in their folder's name (0.1.0: a float32 ``step``, no state checks at load,
``correlation_max_norm=None`` saved in every group). Each holds the model and optimizer state
after 5 steps of ``SmallNet`` and the losses and weights of the 4 steps that release took next.
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from helpers.nets import make_net, train
from helpers.optim_db import OPTIMIZERS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
CASES = sorted(FIXTURES.glob("v*/*.pt"))
BEFORE, AFTER = 5, 4


#: Configurations of the optimizer database that use options 0.1.0 did not have.
NEWER_THAN_0_1_0 = {"CoapAdamW-bf16", "CoapAdafactor8bit-bf16"}  # state_dtype


def test_every_release_and_optimizer_has_a_fixture():
    assert {path.stem for path in FIXTURES.glob("v0_1_0/*.pt")} == set(OPTIMIZERS) - NEWER_THAN_0_1_0


def _load(path: Path):
    checkpoint = torch.load(path, weights_only=True)
    model = make_net(seed=123)  # a different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt = OPTIMIZERS[path.stem](model.parameters())
    with pytest.warns(UserWarning, match=r"correlation_max_norm: checkpoint None, kept 1.0"):
        opt.load_state_dict(checkpoint["optimizer"])
    return checkpoint, model, opt


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}-{p.stem}" for p in CASES])
def test_old_checkpoint_loads_every_tensor_as_saved(path):
    checkpoint, model, opt = _load(path)
    saved = checkpoint["optimizer"]["state"]
    for index, param in enumerate(model.parameters()):
        state = opt.state[param]
        assert state.keys() == saved[index].keys()
        for key, value in saved[index].items():
            if key == "step":  # the float counter of 0.1.0 becomes the exact integer one
                assert state[key].dtype == torch.int64 and int(state[key]) == int(value.item()) == BEFORE
            else:
                assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}-{p.stem}" for p in CASES])
def test_old_checkpoint_resumes_bitwise_and_on_the_old_trajectory(path):
    checkpoint, model, opt = _load(path)
    # Saved again by this version and reloaded, it resumes bit for bit like the loaded one.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=True)
    twin = make_net(seed=7)
    twin.load_state_dict(again["model"])
    twin_opt = OPTIMIZERS[path.stem](twin.parameters())
    twin_opt.load_state_dict(again["optimizer"])

    losses = train(model, opt, AFTER, start=BEFORE)
    assert train(twin, twin_opt, AFTER, start=BEFORE) == losses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    # And it continues the trajectory the old release took, to float rounding (this version
    # rounds a few operations differently; 8-bit codes may then land on a neighbouring code).
    old = checkpoint["continuation"]
    atol = 2e-3 if "8bit" in path.stem else 1e-5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(old["losses"]), rtol=0, atol=atol)
    for p, q in zip(model.parameters(), old["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=atol)


#: Written with ``make_checkpoints.py`` by the code just before the optimizers were recomposed
#: from a moment rule and a storage (commit 4af287b, still 0.1.0 by its version): the redesign
#: promised that such a checkpoint resumes bit for bit, on the very trajectory it would have taken.
PRE_REDESIGN = sorted((FIXTURES / "pre_redesign").glob("*.pt"))


def test_every_optimizer_has_a_pre_redesign_fixture():
    assert {path.stem for path in PRE_REDESIGN} == set(OPTIMIZERS) - NEWER_THAN_0_1_0


@pytest.mark.parametrize("path", PRE_REDESIGN, ids=[p.stem for p in PRE_REDESIGN])
def test_a_checkpoint_from_before_the_redesign_resumes_bitwise(path):
    checkpoint = torch.load(path, weights_only=True)
    model = make_net(seed=123)
    model.load_state_dict(checkpoint["model"])
    opt = OPTIMIZERS[path.stem](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same options: nothing to warn about
        opt.load_state_dict(checkpoint["optimizer"])
    assert train(model, opt, AFTER, start=BEFORE) == checkpoint["continuation"]["losses"]
    for p, q in zip(model.parameters(), checkpoint["continuation"]["params"]):
        assert torch.equal(p, q)


#: Written with ``make_dcp_checkpoints.py`` by the code of :data:`PRE_REDESIGN` (0.1.0 by its
#: version, before ``conv_projection`` and ``state_dtype`` existed), the way FSDP2 users save:
#: ``get_state_dict``, then ``dcp.save``.
DCP_FIXTURES = sorted(path for path in (FIXTURES / "pre_redesign_dcp").iterdir() if path.is_dir())


def _dcp_load(checkpoint_id, model, opt, planner=None):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group", category=UserWarning)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint_id, planner=planner)
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optimizer_state)


def test_every_optimizer_has_a_dcp_fixture():
    assert {path.name for path in DCP_FIXTURES} == set(OPTIMIZERS) - NEWER_THAN_0_1_0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("path", DCP_FIXTURES, ids=[p.name for p in DCP_FIXTURES])
def test_an_earlier_dcp_checkpoint_resumes_bitwise_with_the_coap_planner(path):
    from coap_torch.integrations.dcp import CoapLoadPlanner

    dcp = pytest.importorskip("torch.distributed.checkpoint")
    model = make_net(seed=123)  # a different init: everything must come from the checkpoint
    opt = OPTIMIZERS[path.name](model.parameters())
    # The default planner refuses it: the checkpoint has no entry for the options added since.
    with pytest.raises(
        dcp.api.CheckpointException, match=r"Missing key in checkpoint state_dict: optimizer\.param_groups\.0\."
    ):
        _dcp_load(path, model, opt)
    model = make_net(seed=123)
    opt = OPTIMIZERS[path.name](model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*correlation_max_norm: checkpoint None, kept 1.0")
        _dcp_load(path, model, opt, CoapLoadPlanner())
    for group in opt.param_groups:  # the options it did not save are this optimizer's own
        assert group["conv_projection"] == "tucker2" and group["state_dtype"] == torch.float32
        assert group["scale"] == 1.0  # saved by that release, which did not scale
    continuation = torch.load(path.parent / f"{path.name}.continuation.pt", weights_only=True)
    assert train(model, opt, AFTER, start=BEFORE) == continuation["losses"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), continuation["params"]))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("entry", ["moment", "lr"])
def test_the_coap_planner_refuses_what_is_not_a_coap_option(tmp_path, entry):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from coap_torch.integrations.dcp import CoapLoadPlanner

    model = make_net(seed=0)
    opt = OPTIMIZERS["CoapAdamW"](model.parameters())
    train(model, opt, 2)
    model_state, optimizer_state = get_state_dict(model, opt)
    optimizer_state = copy.deepcopy(optimizer_state)  # its entries are the optimizer's own
    first = next(iter(optimizer_state["state"]))
    if entry == "moment":
        del optimizer_state["state"][first]["exp_avg"]
        missing = f"optimizer.state.{first}.exp_avg"
    else:
        del optimizer_state["param_groups"][0]["lr"]
        missing = "optimizer.param_groups.0.lr"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group", category=UserWarning)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path)
        model_state, optimizer_state = get_state_dict(model, opt)  # what a resume asks for: everything
        with pytest.raises(
            dcp.api.CheckpointException, match=re.escape(f"Missing key in checkpoint state_dict: {missing}.")
        ):
            dcp.load(
                {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path, planner=CoapLoadPlanner()
            )
