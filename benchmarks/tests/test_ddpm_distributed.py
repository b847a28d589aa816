"""``coap-bench ddpm --distributed`` under torchrun (2 CPU ranks, gloo): the UNet sharded by FSDP2 or replicated
by DDP, trained on the one-process job's batches, with per-rank state and communication, and its checkpoints."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("torch.distributed")

from bench_helpers import DDPM_QUICK, as_rank_0_of_2, by_name, torchrun_json, without_torchrun

from coap_bench.cli import main
from coap_bench.ddpm import DdpmConfig
from coap_bench.ddpm.distributed import run_ddpm_distributed

TIMEOUT = 300
STEPS = 6
COAP = ("coap_adamw", "coap_adamw8bit", "coap_adafactor", "coap_adafactor8bit")
# T_u 2, lambda 2: refreshes at steps 1, 2, 4 and 6 (Eq. 2 or SVD), steady steps 3 and 5; a quick
# feature classifier and the held-out loss before training and at step 3 (collectives under FSDP2).
_SMALL = [*DDPM_QUICK, "--eval-every", "3", "--steps", str(STEPS)]
#: Checkpoints every 2 steps: a run stopped after 3 steps resumes from step 2.
_CHECKPOINTS = ["--checkpoint-every", "2"]


def _torchrun(folder, *args: str) -> dict:
    """``coap-bench ddpm`` on 2 ranks; the JSON rank 0 wrote."""
    return torchrun_json(folder, ["ddpm", *_SMALL], *args, timeout=TIMEOUT, shows=["clf-FD"])


@pytest.fixture(scope="module")
def fsdp2_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm-fsdp2")


@pytest.fixture(scope="module")
def fsdp2_run(fsdp2_folder):
    # Every COAP optimizer and AdamW, checkpointed as it goes: the uninterrupted run the resume test compares with.
    return _torchrun(
        fsdp2_folder,
        "--distributed",
        "fsdp2",
        "--optimizers",
        ",".join(("adamw", *COAP)),
        *_CHECKPOINTS,
        "--checkpoint-dir",
        str(fsdp2_folder / "checkpoints"),
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _torchrun(
        tmp_path_factory.mktemp("ddpm-ddp"), "--distributed", "ddp", "--optimizers", "adamw,coap_adamw,coap_adafactor"
    )


# Slow tier: torchrun runs of the whole job. The library's FSDP2 sharding of conv kernels and its
# collectives are the library's tests; this command's option checks are fast-tier tests (below).
@pytest.mark.slow
def test_fsdp2_trains_every_coap_optimizer_and_reports_state_and_traffic_per_rank(fsdp2_run):
    config = fsdp2_run["config"]
    assert (config["world_size"], config["backend"], config["engine"], config["batch_per_rank"]) == (
        2,
        "gloo",
        "fsdp2",
        8,
    )
    results = by_name(fsdp2_run)
    assert list(results) == ["adamw", *COAP]
    param_bytes = 4 * config["parameters"]
    for name, result in results.items():
        assert not result["failed"], (name, result.get("error"))
        assert len(result["loss_curve"]) == STEPS and all(map(math.isfinite, result["loss_curve"]))
        assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] > 0, name
        assert math.isfinite(result["classifier_frechet_distance"]), name
        assert [p["step"] for p in result["heldout_curve"]] == [0, 3, 6]
        assert result["heldout_curve"][-1]["loss"] == result["heldout_loss"]
        ranks = result["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert result["state_bytes_all_ranks"] == sum(r["state_bytes"] for r in ranks)
        for r in ranks:
            assert r["state_bytes"] > 0, (name, r)
            # Two all-gathers of the parameters and one reduce-scatter of the gradients: about 3 P (the
            # root's parameters stay gathered between forward and backward).
            assert r["engine_estimate_bytes_per_step"] == 3 * param_bytes
            assert 2 * param_bytes <= r["engine_bytes_per_step"] <= 3 * param_bytes
    # AdamW's moments are sharded with the parameters: the two ranks hold one process's state between them.
    full_adamw_state = 2 * 4 * config["parameters"]
    assert sum(r["state_bytes"] for r in results["adamw"]["ranks"]) == pytest.approx(full_adamw_state, rel=0.01)
    for r in results["adamw"]["ranks"]:
        assert r["optimizer_comm_bytes"] is None  # torch's AdamW issues no collectives of its own
    for name in COAP:
        for r in results[name]["ranks"]:
            by_step = r["optimizer_comm_bytes_by_step"]
            assert len(by_step) == STEPS and r["optimizer_comm_bytes"] == sum(by_step) > 0, (name, by_step)
            assert all(by_step[i] > 0 for i in (0, 1, 3, 5)), (name, by_step)  # refreshes all-reduce
            assert r["optimizer_comm_calls"] == sum(r["optimizer_comm_calls_by_step"]) > 0
            assert r["optimizer_comm_bytes_per_step"] == pytest.approx(sum(by_step) / STEPS)
            # A refresh step moves more than the steadiest step.
            assert r["optimizer_comm_refresh_step_bytes"] > r["optimizer_comm_steady_step_bytes"], (name, by_step)
            assert r["optimizer_to_engine"] == pytest.approx(
                r["optimizer_comm_bytes_per_step"] / r["engine_bytes_per_step"]
            )
    # The 8-bit variants send what their full-precision counterparts send.
    for full, quantized in (("coap_adamw", "coap_adamw8bit"), ("coap_adafactor", "coap_adafactor8bit")):
        assert [r["optimizer_comm_bytes"] for r in results[full]["ranks"]] == [
            r["optimizer_comm_bytes"] for r in results[quantized]["ranks"]
        ]


@pytest.mark.slow
def test_ddp_matches_one_process_and_replicates_the_state(tmp_path, ddp_run, fsdp2_run):
    names = ("adamw", "coap_adamw", "coap_adafactor")
    single_path = tmp_path / "single.json"
    assert main(["ddpm", *_SMALL, "--optimizers", ",".join(names), "--in-process", "--json", str(single_path)]) == 0
    single = by_name(json.loads(single_path.read_text()))
    ddp, fsdp2 = by_name(ddp_run), by_name(fsdp2_run)
    assert ddp_run["config"]["engine"] == "ddp"
    param_bytes = 4 * ddp_run["config"]["parameters"]
    for name in names:
        # The same global batches, noise and timesteps: the curves and held-out losses of one process,
        # under DDP (averaged gradients) and FSDP2 (reduce-scattered ones) alike.
        for run in (ddp, fsdp2):
            assert run[name]["loss_curve"] == pytest.approx(single[name]["loss_curve"], abs=1e-4), name
            assert run[name]["heldout_loss"] == pytest.approx(single[name]["heldout_loss"], abs=1e-4), name
        for r in ddp[name]["ranks"]:
            assert r["state_bytes"] == single[name]["state_bytes"] > 0  # DDP replicates the state
            # One all-reduce of every fp32 gradient.
            assert r["engine_bytes_per_step"] == r["engine_estimate_bytes_per_step"] == param_bytes
        # FSDP2 shards it: less per rank (COAP's Tucker-2 cores and P of dim-0-sharded sides are replicated).
        assert all(r["state_bytes"] < single[name]["state_bytes"] for r in fsdp2[name]["ranks"]), name
    for r in ddp["coap_adamw"]["ranks"]:  # gradients arrive averaged: no collective of its own
        assert r["optimizer_comm_bytes"] == 0


@pytest.mark.slow
def test_interrupted_fsdp2_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, fsdp2_run):
    options = ["--distributed", "fsdp2", "--optimizers", "adamw,coap_adafactor", *_CHECKPOINTS]
    folder = tmp_path / "interrupted"
    part = _torchrun(tmp_path, *options, "--checkpoint-dir", str(folder), "--stop-after", "3")
    for result in part["results"]:
        assert (result["steps_done"], result["completed"], result["resumed_from_step"]) == (3, False, None)
        latest = json.loads((folder / result["name"] / "latest.json").read_text())
        assert (latest["step"], latest["directory"], latest["world_size"]) == (2, "step-00000002", 2)
    resumed = by_name(_torchrun(tmp_path, *options, "--checkpoint-dir", str(folder)))
    whole = by_name(fsdp2_run)
    # Bitwise: the same collectives in the same order on the same shards (gloo, CPU), RNG and batch
    # stream restored, the optimizer state loaded exactly (and its communication log restored).
    for name, b in resumed.items():
        a = whole[name]
        assert not b["failed"], b.get("error")
        assert b["resumed_from_step"] == 2 and b["completed"]
        for key in ("loss_curve", "heldout_loss", "heldout_curve", "final_loss"):
            assert a[key] == b[key], (name, key)
        for ra, rb in zip(a["ranks"], b["ranks"], strict=True):
            for key in ("state_bytes", "optimizer_comm_calls_by_step", "optimizer_comm_bytes_by_step"):
                assert ra[key] == rb[key], (name, ra["rank"], key)


def test_distributed_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    without_torchrun(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["ddpm", *_SMALL, "--distributed", "fsdp2"])
    assert exit_info.value.code == 2
    assert "torchrun --nproc-per-node 2 -m coap_bench.cli ddpm --distributed" in capsys.readouterr().err


def test_distributed_refuses_several_seeds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ddpm", *_SMALL, "--distributed", "ddp", "--seeds", "2"])
    assert exit_info.value.code == 2
    assert "--seeds 2 is for single-process runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distributed": "fsdp2", "batch_size": 7}, "must be a multiple of the world size 2"),
        ({"distributed": "zero3"}, "unknown --distributed 'zero3'"),
    ],
)
def test_distributed_options_are_checked_before_any_process_group(monkeypatch, options, message):
    as_rank_0_of_2(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run_ddpm_distributed(DdpmConfig(preset="micro", steps=2, optimizers=("coap_adamw",), **options))
