"""The main job, ``coap-bench digits``, run end to end on a few steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from coap_bench.cli import main


def _run(tmp_path, *extra: str, name: str = "r.json") -> dict:
    path = tmp_path / name
    assert main(["digits", "--steps", "20", "--json", str(path), "--no-progress", *extra]) == 0
    return json.loads(path.read_text())


def test_digits_compares_adamw_and_coap(tmp_path, capsys):
    # Short refresh schedule so that 20 steps include Eq. 2 steps (4, 8, 16, 20) and an SVD (12).
    run = _run(
        tmp_path,
        "--optimizers",
        "adamw,coap_adamw",
        "--update-interval",
        "4",
        "--reproject-factor",
        "3",
        "--plots",
        str(tmp_path / "plots"),
    )
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adamw"]
    adamw, coap = results["adamw"], results["coap_adamw"]
    assert coap["state_bytes"] < adamw["state_bytes"]
    assert coap["state_ratio_to_adamw"] < 1 and adamw["state_ratio_to_adamw"] == 1
    for result in (adamw, coap):
        for key in ("final_loss", "heldout_loss", "iteration_ms", "step_ms"):
            assert math.isfinite(result[key]), (result["name"], key)
        assert 0 <= result["heldout_accuracy"] <= 1
        assert len(result["loss_curve"]) == 20 and all(math.isfinite(v) for v in result["loss_curve"])
        assert result["first_nonfinite_step"] is None
    # Same init and first batch for every optimizer.
    assert adamw["loss_curve"][0] == coap["loss_curve"][0]
    # Both projection paths are exercised.
    assert set(coap["projections"].values()) == {"tucker", "matrix", "dense"}
    assert set(adamw["projections"].values()) == {"dense"}
    # The Eq. 2 change is measured on the Eq. 2 steps only, for COAP only.
    assert adamw["p_step_rel_change"] is None
    assert math.isfinite(coap["p_step_rel_change"]) and coap["p_step_rel_change"] >= 0
    assert {c["step"] for c in coap["p_step_rel_changes"]} == {4, 8, 16, 20}
    assert run["config"]["steps"] == 20 and run["config"]["optimizers"] == ["adamw", "coap_adamw"]

    captured = capsys.readouterr()
    assert "coap_adamw" in captured.out and "held-out acc" in captured.out
    assert (tmp_path / "plots" / "digits_loss.png").exists() or "matplotlib is not installed" in captured.err


@pytest.mark.slow  # six optimizers; test_digits_compares_adamw_and_coap runs the command in the fast tier
def test_default_run_has_every_optimizer_next_to_its_dense_counterpart(tmp_path):
    pytest.importorskip("transformers")
    results = {r["name"]: r for r in _run(tmp_path, "--steps", "6")["results"]}
    assert list(results) == [
        "adamw",
        "coap_adamw",
        "coap_adamw8bit",
        "adafactor",
        "coap_adafactor",
        "coap_adafactor8bit",
    ]
    bytes_ = {name: r["state_bytes"] for name, r in results.items()}
    assert bytes_["coap_adamw8bit"] < bytes_["coap_adamw"] < bytes_["adamw"]
    assert bytes_["coap_adafactor8bit"] < bytes_["coap_adafactor"] < bytes_["adafactor"]
    assert all(math.isfinite(r["final_loss"]) for r in results.values())


@pytest.mark.slow  # two full runs; seeded determinism is also what the resume tests check
def test_same_seed_same_losses(tmp_path):
    first = _run(tmp_path, "--seed", "3", name="a.json")
    second = _run(tmp_path, "--seed", "3", name="b.json")
    for a, b in zip(first["results"], second["results"], strict=True):
        assert a["final_loss"] == b["final_loss"]
        assert a["heldout_loss"] == b["heldout_loss"]
        assert a["loss_curve"] == b["loss_curve"]


def test_table_flags_a_diverged_run(tmp_path):
    from coap_bench.report import format_table

    run = _run(tmp_path, "--optimizers", "adamw")
    run["results"][0].update(final_loss=float("nan"), first_nonfinite_step=7)
    table = format_table(run)
    assert "nan" in table and "adamw: the training loss became non-finite at step 7" in table


def test_unknown_optimizer_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["digits", "--optimizers", "adamw,sgdx", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'sgdx'" in err and "coap_adamw" in err


def test_missing_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "1", "--no-progress"])
    assert exc.value.code == 2
    assert "pip install -e ./benchmarks" in capsys.readouterr().err


def test_the_library_does_not_import_the_suite():
    code = (
        "import sys, coap_torch; "
        "bad = [m for m in sys.modules if m.startswith(('coap_bench', 'sklearn'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
