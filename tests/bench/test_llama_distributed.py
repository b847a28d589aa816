"""``coap-bench llama --distributed`` under torchrun (2 CPU ranks, gloo), and ``--per-layer``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")
pytest.importorskip("torch.distributed")

from coap_torch.bench.cli import main
from coap_torch.bench.llama import LlamaConfig
from coap_torch.bench.llama_distributed import measure_per_layer_saving, run_llama_distributed

TIMEOUT = 240
STEPS = 6
# T_u 2, lambda 2: refreshes at steps 1, 2, 4 and 6 (Eq. 2 or SVD), steady steps 3 and 5.
_SMALL = ["--preset", "micro", "--vocab-size", "512", "--max-documents", "300", "--max-heldout-windows", "16",
          "--update-interval", "2", "--reproject-factor", "2", "--steps", str(STEPS), "--no-progress"]
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # The tokenizer cache that tests/bench/test_llama_cli.py uses too: trained once per session.
    return str(tmp_path_factory.getbasetemp() / "coap-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("COAP_TORCH_CACHE", cache)


def _torchrun(folder, cache: str, *args: str) -> dict:
    """``coap-bench llama`` on 2 ranks; the JSON rank 0 wrote. Killed with its workers after TIMEOUT s."""
    path = folder / f"run{len(list(folder.glob('*.json')))}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "coap_torch.bench.cli", "llama", *_SMALL, "--json", str(path), *args]
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(COAP_TORCH_CACHE=cache, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s")
    assert proc.returncode == 0, "\n".join(line for line in out.splitlines() if "Warning" not in line)[-6000:]
    assert "per rank:" in out and "engine/step" in out, out[-4000:]
    return json.loads(path.read_text())


def _results(run: dict) -> dict:
    return {r["name"]: r for r in run["results"]}


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, cache):
    return _torchrun(tmp_path_factory.mktemp("fsdp2"), cache, "--distributed", "fsdp2",
                     "--optimizers", "adamw,coap_adamw")


def test_fsdp2_shards_the_state_and_coap_steady_steps_are_silent(fsdp2_run):
    config = fsdp2_run["config"]
    assert (config["world_size"], config["backend"], config["engine"]) == (2, "gloo", "fsdp2")
    results = _results(fsdp2_run)
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
    assert main(["llama", *_SMALL, "--optimizers", "adamw,coap_adamw", "--in-process",
                 "--json", str(tmp_path / "single.json")]) == 0
    single = _results(json.loads((tmp_path / "single.json").read_text()))
    ddp, fsdp2 = _results(run), _results(fsdp2_run)
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
    run = _torchrun(tmp_path, cache, "--distributed", "fsdp2", "--per-layer", "--optimizers", "coap_adamw")
    result = _results(run)["coap_adamw"]
    assert result["per_layer"]
    assert result["loss_curve"] == pytest.approx(_results(fsdp2_run)["coap_adamw"]["loss_curve"], abs=1e-5)


def test_distributed_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["llama", *_SMALL, "--distributed", "fsdp2"])
    assert exit_info.value.code == 2
    assert "torchrun --nproc-per-node 2 -m coap_torch.bench.cli llama --distributed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distributed": "ddp", "per_layer": True}, "--per-layer cannot be combined with --distributed ddp"),
        ({"distributed": "fsdp2", "batch_size": 7}, "must be a multiple of the world size 2"),
        ({"distributed": "fsdp2", "checkpoint_dir": "ckpt"}, "--checkpoint-dir is not supported"),
    ],
)
def test_distributed_options_are_checked_before_any_process_group(monkeypatch, options, message):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=message):
        run_llama_distributed(LlamaConfig(preset="micro", steps=2, optimizers=("coap_adamw",), **options))


def _tiny_config(**options) -> LlamaConfig:
    return LlamaConfig(preset="micro", steps=4, vocab_size=512, max_documents=300, update_interval=2,
                       reproject_factor=2, optimizers=("adamw", "coap_adamw"), progress=False, **options)


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
    regular = _results(json.loads((tmp_path / "regular.json").read_text()))
    run = json.loads((tmp_path / "per_layer.json").read_text())
    per_layer = _results(run)
    assert per_layer["coap_adamw"]["per_layer"] and not per_layer["adamw"]["per_layer"]
    for name in ("adamw", "coap_adamw"):
        assert per_layer[name]["loss_curve"] == regular[name]["loss_curve"]
    rows = run["per_layer_saving"]["results"]
    assert [(r["name"], r["batch_size"]) for r in rows] == [("coap_adamw", 8), ("coap_adamw", 1)]
    assert "per-layer updates (peak allocated tensor bytes" in capsys.readouterr().out
