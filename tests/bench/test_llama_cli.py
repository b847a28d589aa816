"""``coap-bench llama`` end to end on the micro preset: results, table, plots, exact resume."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from coap_torch.bench.cli import main

# Short COAP refresh schedule so that a few steps include Eq. 2 updates and SVDs on both sides of a resume.
_SMALL = ["--preset", "micro", "--vocab-size", "512", "--max-documents", "300", "--max-heldout-windows", "16",
          "--update-interval", "2", "--reproject-factor", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("COAP_TORCH_CACHE", str(tmp_path_factory.getbasetemp() / "coap-cache"))


def _run(tmp_path, *extra: str, name: str = "r.json") -> dict:
    path = tmp_path / name
    assert main(["llama", *_SMALL, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def test_llama_compares_adamw_and_coap(tmp_path, capsys):
    run = _run(tmp_path, "--steps", "8", "--plots", str(tmp_path / "plots"))
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adamw"]
    for result in results.values():
        for key in ("lr", "state_bytes", "heldout_loss", "iteration_ms", "step_ms", "tokens_per_s", "final_loss",
                    "heldout_perplexity", "peak_memory_bytes"):
            assert math.isfinite(result[key]), (result["name"], key)
        assert result["lr"] == 1e-3
        assert len(result["loss_curve"]) == 8 and result["completed"]
        assert result["heldout_perplexity"] == pytest.approx(math.exp(result["heldout_loss"]))
    assert results["coap_adamw"]["state_bytes"] < results["adamw"]["state_bytes"]
    assert results["coap_adamw"]["state_ratio_to_adamw"] < 1 == results["adamw"]["state_ratio_to_adamw"]
    # Same init and first batch for every optimizer.
    assert results["adamw"]["loss_curve"][0] == results["coap_adamw"]["loss_curve"][0]
    assert run["data"]["train_sha256"] and run["data"]["heldout_sha256"]
    assert run["versions"]["torch"] and run["argv"][:2] == ["coap-bench", "llama"]

    captured = capsys.readouterr()
    assert "| coap_adamw" in captured.out and "held-out loss" in captured.out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plots" / "llama_loss.png").exists()
        assert (tmp_path / "plots" / "llama_heldout_vs_state.png").exists()
    else:
        assert "matplotlib is not installed" in captured.err


def test_resumed_run_ends_with_the_same_numbers(tmp_path):
    common = ["--steps", "10", "--checkpoint-every", "4", "--warmup-steps", "2"]
    whole = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "a"), name="whole.json")
    # Interrupted after 6 steps (the last checkpoint is at step 4), then started again.
    part = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), "--stop-after", "6", name="part.json")
    assert all(not r["completed"] and r["steps_done"] == 6 for r in part["results"])
    assert (tmp_path / "b" / "adamw.pt").exists() and (tmp_path / "b" / "coap_adamw.pt").exists()
    resumed = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"]):
        assert b["resumed_from_step"] == 4
        assert a["loss_curve"] == b["loss_curve"], a["name"]
        assert a["heldout_loss"] == b["heldout_loss"], a["name"]
        assert a["final_loss"] == b["final_loss"]


def test_lr_sweep_keeps_the_best_heldout_loss(tmp_path):
    run = _run(tmp_path, "--steps", "4", "--optimizers", "adamw", "--lr-sweep")
    (result,) = run["results"]
    sweep = result["lr_sweep"]
    assert [s["lr"] for s in sweep] == pytest.approx([5e-4, 1e-3, 2e-3])
    assert result["heldout_loss"] == min(s["heldout_loss"] for s in sweep)


def test_unknown_optimizer_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["llama", "--optimizers", "adamw,nope"])
    assert exit_info.value.code == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err


def test_default_command_is_still_digits():
    from coap_torch.bench.cli import build_parser

    args = build_parser().parse_args(["digits"])
    assert args.command == "digits"
    args = build_parser().parse_args(["llama"])
    assert (args.command, args.preset, args.optimizers, args.recipe) == ("llama", "tiny", ["adamw", "coap_adamw"],
                                                                         "paper")
