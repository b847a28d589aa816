"""``coap-bench llama --distributed`` under torchrun (2 CPU ranks, gloo), its checkpoints, and ``--per-layer``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")
pytest.importorskip("torch.distributed")

from bench_helpers import as_rank_0_of_2, by_name, launch_torchrun, torchrun_json, without_torchrun

from coap_bench.cli import main
from coap_bench.llama import LlamaConfig
from coap_bench.llama_distributed import measure_per_layer_saving, run_llama_distributed

TIMEOUT = 240
STEPS = 6
# T_u 2, lambda 2: refreshes at steps 1, 2, 4 and 6 (Eq. 2 or SVD), steady steps 3 and 5.
_SMALL = [
    "--preset",
    "micro",
    "--vocab-size",
    "512",
    "--max-documents",
    "300",
    "--max-heldout-windows",
    "16",
    "--update-interval",
    "2",
    "--reproject-factor",
    "2",
    "--steps",
    str(STEPS),
    "--no-progress",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # The tokenizer cache that benchmarks/tests/test_llama_cli.py uses too: trained once per session.
    return str(tmp_path_factory.getbasetemp() / "coap-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("COAP_TORCH_CACHE", cache)


def _launch(folder, cache: str, *args: str) -> tuple[int, str, object]:
    """``coap-bench llama`` on 2 ranks: exit status, output and the JSON path."""
    return launch_torchrun(folder, ["llama", *_SMALL], *args, timeout=TIMEOUT, COAP_TORCH_CACHE=cache)


def _torchrun(folder, cache: str, *args: str) -> dict:
    """``coap-bench llama`` on 2 ranks; the JSON rank 0 wrote."""
    return torchrun_json(folder, ["llama", *_SMALL], *args, timeout=TIMEOUT, COAP_TORCH_CACHE=cache)


#: Checkpoints every 2 steps: a run stopped after 3 steps resumes from step 2.
_CHECKPOINTS = ["--checkpoint-every", "2"]
#: P on the input side of every matrix, the side FSDP2 does not shard: steady steps send nothing
#: (the default, the paper's smaller side, sums the wide down-projection's gradient every step).
_UNSHARDED_SIDE = ["--projection-side", "input"]


@pytest.fixture(scope="module")
def fsdp2_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def fsdp2_run(fsdp2_folder, cache):
    # Checkpointed as it goes: the uninterrupted run the resume tests compare with.
    return _torchrun(
        fsdp2_folder,
        cache,
        "--distributed",
        "fsdp2",
        "--optimizers",
        "adamw,coap_adamw",
        *_UNSHARDED_SIDE,
        *_CHECKPOINTS,
        "--checkpoint-dir",
        str(fsdp2_folder / "checkpoints"),
    )


# Slow tier: a torchrun of the whole job. The library's FSDP2 sharding and per-step collectives are
# fast-tier tests (tests/distributed/test_fsdp.py), as are this command's option checks (below).
@pytest.mark.slow
def test_fsdp2_shards_the_state_and_coap_steady_steps_are_silent(fsdp2_run):
    config = fsdp2_run["config"]
    assert (config["world_size"], config["backend"], config["engine"]) == (2, "gloo", "fsdp2")
    results = by_name(fsdp2_run)
    full_adamw_state = 2 * 4 * config["parameters"]  # two fp32 moments per parameter on one process
    for result in results.values():
        ranks = result["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["engine_bytes_per_step"] > 0 for r in ranks)
        assert len(result["loss_curve"]) == STEPS and result["heldout_loss"] > 0
    # Every matrix is sharded on dim 0: each rank holds about half of AdamW's moments.
    for r in results["adamw"]["ranks"]:
        assert r["state_bytes"] == pytest.approx(full_adamw_state / 2, rel=0.02)
        assert r["optimizer_comm_bytes"] is None  # torch's AdamW issues no collectives of its own
    # FSDP2 all-gathers the parameters (forward and backward) and reduce-scatters the gradients:
    # at least twice the parameter bytes per step, the same on every rank.
    engine = {r["engine_bytes_per_step"] for r in results["adamw"]["ranks"]}
    assert len(engine) == 1 and engine.pop() >= 2 * 4 * config["parameters"]
    for r in results["coap_adamw"]["ranks"]:
        by_step = r["optimizer_comm_bytes_by_step"]
        assert by_step[2] == by_step[4] == 0 == r["optimizer_comm_steady_step_bytes"]  # steps 3 and 5
        assert all(by_step[i] > 0 for i in (0, 1, 3, 5))  # refreshes all-reduce
        assert r["optimizer_comm_bytes_per_step"] == pytest.approx(sum(by_step) / STEPS)
        assert r["optimizer_comm_bytes_per_step"] < 0.2 * r["engine_bytes_per_step"]
        assert r["state_bytes"] < results["adamw"]["ranks"][0]["state_bytes"]


@pytest.mark.slow
def test_ddp_matches_one_process_and_replicates_the_state(tmp_path, cache, fsdp2_run):
    run = _torchrun(tmp_path, cache, "--distributed", "ddp", "--optimizers", "adamw,coap_adamw")
    assert (
        main(
            [
                "llama",
                *_SMALL,
                "--optimizers",
                "adamw,coap_adamw",
                "--in-process",
                "--json",
                str(tmp_path / "single.json"),
            ]
        )
        == 0
    )
    single = by_name(json.loads((tmp_path / "single.json").read_text()))
    ddp, fsdp2 = by_name(run), by_name(fsdp2_run)
    for name in ("adamw", "coap_adamw"):
        # The same global batches, averaged gradients: the curve of one process on the whole batch.
        assert ddp[name]["loss_curve"] == pytest.approx(single[name]["loss_curve"], abs=1e-5)
        assert ddp[name]["heldout_loss"] == pytest.approx(single[name]["heldout_loss"], abs=1e-5)
        for r in ddp[name]["ranks"]:
            assert r["state_bytes"] == single[name]["state_bytes"]  # DDP replicates the state
            # One all-reduce of every fp32 gradient (plus DDP's broadcast of the rotary buffers).
            assert r["engine_bytes_per_step"] >= 4 * run["config"]["parameters"]
        # FSDP2 shards it: about half per rank (P, replicated, keeps COAP's ratio a little above).
        ratio = fsdp2[name]["ranks"][0]["state_bytes"] / ddp[name]["ranks"][0]["state_bytes"]
        assert 0.45 < ratio < 0.6, (name, ratio)
    for r in ddp["coap_adamw"]["ranks"]:  # gradients arrive averaged: no collective of its own
        assert r["optimizer_comm_bytes"] == 0


@pytest.mark.slow
def test_fsdp2_per_layer_updates_train_like_regular_steps(tmp_path, cache, fsdp2_run):
    run = _torchrun(
        tmp_path, cache, "--distributed", "fsdp2", "--per-layer", "--optimizers", "coap_adamw", *_UNSHARDED_SIDE
    )
    result = by_name(run)["coap_adamw"]
    assert result["per_layer"]
    assert result["loss_curve"] == pytest.approx(by_name(fsdp2_run)["coap_adamw"]["loss_curve"], abs=1e-5)


def test_distributed_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    without_torchrun(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["llama", *_SMALL, "--distributed", "fsdp2"])
    assert exit_info.value.code == 2
    assert "torchrun --nproc-per-node 2 -m coap_bench.cli llama --distributed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distributed": "ddp", "per_layer": True}, "--per-layer cannot be combined with --distributed ddp"),
        ({"distributed": "fsdp2", "batch_size": 7}, "must be a multiple of the world size 2"),
    ],
)
def test_distributed_options_are_checked_before_any_process_group(monkeypatch, options, message):
    as_rank_0_of_2(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run_llama_distributed(LlamaConfig(preset="micro", steps=2, optimizers=("coap_adamw",), **options))


def _final_checkpoint(folder, name: str) -> dict:
    """The model and optimizer state of the checkpoint ``latest.json`` names, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = json.loads((folder / name / "latest.json").read_text())
    assert latest["step"] == STEPS and latest["world_size"] == 2
    assert sorted(p.name for p in (folder / name).glob("step-*")) == [latest["directory"]]  # older ones removed
    dcp_to_torch_save(folder / name / latest["directory"], folder / f"{name}.pt")
    return torch.load(folder / f"{name}.pt", weights_only=False)


def _assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# Two interrupted torchrun runs each: slow tier (tests/distributed/test_fsdp.py resumes FSDP2 from DCP).
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_interrupted_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, cache, engine, request):
    options = ["--distributed", engine, "--optimizers", "adamw,coap_adamw", *_CHECKPOINTS]
    if engine == "fsdp2":
        options += _UNSHARDED_SIDE  # as the run it compares with
        whole = request.getfixturevalue("fsdp2_run")
        whole_folder = request.getfixturevalue("fsdp2_folder") / "checkpoints"
    else:
        whole_folder = tmp_path / "whole"
        whole = _torchrun(tmp_path, cache, *options, "--checkpoint-dir", str(whole_folder))
    folder = tmp_path / "interrupted"
    part = _torchrun(tmp_path, cache, *options, "--checkpoint-dir", str(folder), "--stop-after", "3")
    for result in part["results"]:
        assert (result["steps_done"], result["completed"], result["resumed_from_step"]) == (3, False, None)
        latest = json.loads((folder / result["name"] / "latest.json").read_text())
        assert (latest["step"], latest["directory"]) == (2, "step-00000002")
        # What a save killed half-way leaves: files of step 4 that latest.json does not name.
        (folder / result["name"] / "step-00000004").mkdir()
        (folder / result["name"] / "step-00000004" / ".metadata").write_bytes(b"half written")
    resumed = _torchrun(tmp_path, cache, *options, "--checkpoint-dir", str(folder))

    # Bitwise: the same collectives in the same order on the same shards (gloo, CPU), RNG and batch
    # stream restored, the optimizer state loaded exactly (and its communication log restored).
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert not a["failed"] and not b["failed"], (a.get("error"), b.get("error"))
        assert b["resumed_from_step"] == 2 and b["completed"]
        for key in ("loss_curve", "heldout_loss", "final_loss", "p_step_rel_changes"):
            assert a[key] == b[key], (a["name"], key)
        for ra, rb in zip(a["ranks"], b["ranks"], strict=True):
            for key in (
                "state_bytes",
                "optimizer_comm_calls",
                "optimizer_comm_bytes",
                "optimizer_comm_bytes_by_step",
                "engine_bytes_per_step",
                "engine_collectives",
            ):
                assert ra[key] == rb[key], (a["name"], ra["rank"], key)
        # The final weights and optimizer state, as saved at the last step.
        _assert_identical(_final_checkpoint(whole_folder, a["name"]), _final_checkpoint(folder, a["name"]), a["name"])


# Slow tier: a torchrun of the whole job; --state-dtype reaching the optimizers is tested in the fast tier
# (test_llama_cli.py), bf16 state under FSDP2 in the library's tests.
@pytest.mark.slow
def test_fsdp2_bf16_state_halves_each_ranks_coap_state(tmp_path, cache, fsdp2_run):
    run = _torchrun(
        tmp_path, cache, "--distributed", "fsdp2", "--optimizers", "adamw,coap_adamw", *_UNSHARDED_SIDE,
        "--state-dtype", "bf16",
    )  # fmt: skip
    assert run["config"]["low_rank"]["state_dtype"] == "bf16"
    bf16, fp32 = by_name(run), by_name(fsdp2_run)
    for a, b in zip(fp32["coap_adamw"]["ranks"], bf16["coap_adamw"]["ranks"], strict=True):
        assert b["state_bytes"] * 2 == a["state_bytes"], a["rank"]
        assert b["optimizer_comm_bytes_by_step"] == a["optimizer_comm_bytes_by_step"]  # the same collectives
    assert [r["state_bytes"] for r in bf16["adamw"]["ranks"]] == [r["state_bytes"] for r in fp32["adamw"]["ranks"]]
    assert bf16["adamw"]["loss_curve"] == fp32["adamw"]["loss_curve"]  # the peers ignore it
    assert 0 < bf16["coap_adamw"]["heldout_loss"] < 2 * fp32["coap_adamw"]["heldout_loss"]


def _refused(folder, cache: str, checkpoints, engine: str, *options: str) -> tuple[list[str], str]:
    """A 2-rank run of adamw and coap_adamw continuing ``checkpoints`` that must stop: the error line of each
    rank (every rank says why, and stops) and the output."""
    returncode, out, _ = _launch(
        folder,
        cache,
        "--distributed",
        engine,
        "--optimizers",
        "adamw,coap_adamw",
        *options,
        *_CHECKPOINTS,
        "--checkpoint-dir",
        str(checkpoints),
    )
    assert returncode != 0
    errors = [line for line in out.splitlines() if "coap-bench: error:" in line]
    assert len(errors) == 2, out[-4000:]
    return errors, out


# Slow tier: torchrun runs; the checkpoint checks they reach are the single-process ones, tested in the fast tier
# (test_cli_robustness.py, test_llama_cli.py).
@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_refused(tmp_path, cache, fsdp2_folder, fsdp2_run):
    folder = fsdp2_folder / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    errors, _ = _refused(tmp_path, cache, folder, "ddp", "--lr", "0.5")
    assert "was saved by a different run configuration" in errors[0], errors[0]
    assert "lr 0.001 there, 0.5 here; " in errors[0] and "engine 'fsdp2' there, 'ddp' here" in errors[0], errors[0]
    assert "remove it or use another --checkpoint-dir" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written


# Slow tier: torchrun runs; the checkpoint checks they reach are the single-process ones, tested in the fast tier
# (test_cli_robustness.py, test_llama_cli.py).
@pytest.mark.slow
def test_a_damaged_checkpoint_stops_every_rank_with_one_line_naming_it(tmp_path, cache, fsdp2_folder, fsdp2_run):
    folder = tmp_path / "checkpoints"
    shutil.copytree(fsdp2_folder / "checkpoints", folder)
    marker = folder / "adamw" / "latest.json"
    marker.write_text(marker.read_text()[:20])  # as a copy cut short leaves it
    errors, out = _refused(tmp_path, cache, folder, "fsdp2", *_UNSHARDED_SIDE)
    for line in errors:
        assert line.endswith(
            f"coap-bench: error: checkpoint {marker} cannot be loaded: it is truncated or corrupted "
            f"(JSONDecodeError); delete the run's folder {folder / 'adamw'} to start that run over, "
            "or use another --checkpoint-dir"
        ), line
    assert "weights_only" not in out


def _tiny_config(**options) -> LlamaConfig:
    return LlamaConfig(
        preset="micro",
        steps=4,
        vocab_size=512,
        max_documents=300,
        update_interval=2,
        reproject_factor=2,
        optimizers=("adamw", "coap_adamw"),
        progress=False,
        **options,
    )


def test_per_layer_updates_lower_the_peak_and_keep_the_loss_curve():
    # One 8-token sequence: the gradients (644 KiB), not the activations, set the peak.
    saving = measure_per_layer_saving(_tiny_config(seq_len=8), batch_sizes=(1,))
    (row,) = saving["results"]  # adamw has no per-layer mode
    assert row["name"] == "coap_adamw" and row["batch_size"] == 1
    assert row["per_layer_peak_bytes"] < row["regular_peak_bytes"]
    assert row["saving_bytes"] > 0.5 * row["gradient_bytes"], row
    assert row["per_layer_losses"] == row["regular_losses"]  # the same updates, only earlier


def test_per_layer_cli_trains_like_regular_steps(tmp_path, capsys):
    args = ["llama", *_SMALL, "--optimizers", "adamw,coap_adamw", "--in-process"]
    assert main([*args, "--json", str(tmp_path / "regular.json")]) == 0
    assert main([*args, "--per-layer", "--json", str(tmp_path / "per_layer.json")]) == 0
    regular = by_name(json.loads((tmp_path / "regular.json").read_text()))
    run = json.loads((tmp_path / "per_layer.json").read_text())
    per_layer = by_name(run)
    assert per_layer["coap_adamw"]["per_layer"] and not per_layer["adamw"]["per_layer"]
    for name in ("adamw", "coap_adamw"):
        assert per_layer[name]["loss_curve"] == regular[name]["loss_curve"]
    rows = run["per_layer_saving"]["results"]
    assert [(r["name"], r["batch_size"]) for r in rows] == [("coap_adamw", 8), ("coap_adamw", 1)]
    assert "per-layer updates (peak allocated tensor bytes" in capsys.readouterr().out
