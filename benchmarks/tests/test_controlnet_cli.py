"""``coap-bench controlnet`` end to end on the micro preset: results, table, plots, the cached frozen UNet,
control fidelity, failures, seeds and exact resume; the sdxl preset's memory."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import torch
from bench_helpers import DDPM_QUICK

from coap_bench import optimizers as registry
from coap_bench.cli import main
from coap_bench.controlnet import (
    CONTROLNET_PRESETS,
    ControlNetConfig,
    build_controlnet,
    build_unet,
    edge_f1,
    edge_map,
    format_controlnet_table,
    prompt_embedding,
)
from coap_bench.controlnet.model import predict_noise

HAS_GALORE = importlib.util.find_spec("galore_torch") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# The DDPM tests' micro preset on one thread and short COAP refresh schedule (T_u 2, lambda 2; no feature
# classifier here), a short GaLore gap so that a few steps include Eq. 2 updates and SVDs, few samples.
_QUICK = [*DDPM_QUICK[: DDPM_QUICK.index("--classifier-steps")], "--proj-gap", "3", "--samples", "8", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: the micro frozen UNet is pretrained once, by the first test using it."""
    return tmp_path_factory.mktemp("cache")


def _run(tmp_path, cache, *extra: str, name: str = "r.json") -> dict:
    path = tmp_path / name
    assert main(["controlnet", *_QUICK, "--cache-dir", str(cache), "--json", str(path), "--in-process", *extra]) == 0
    return json.loads(path.read_text())


def test_controlnet_compares_adamw_and_coap(tmp_path, cache, capsys):
    plots = tmp_path / "plots"
    run = _run(
        tmp_path, cache, "--steps", "6", "--optimizers", "adamw,coap_adafactor", "--eval-every", "3", "--plots", plots
    )
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adafactor"]
    reference = run["config"]["reference"]
    for result in results.values():
        for key in ("state_bytes", "heldout_loss", "iteration_ms", "step_ms", "final_loss", "peak_memory_bytes"):
            assert math.isfinite(result[key]), (result["name"], key)
        assert 0 <= result["edge_f1"] <= 1 and result["samples"] == 8
        assert len(result["loss_curve"]) == 6 and result["completed"] and not result["failed"]
        assert [p["step"] for p in result["heldout_curve"]] == [0, 3, 6]
        # Zero convolutions: before its first step the ControlNet changes nothing, so the held-out loss at step 0
        # is the frozen UNet's own, measured without a ControlNet.
        assert result["heldout_curve"][0]["loss"] == pytest.approx(reference["heldout_loss"], rel=1e-5)
        assert result["heldout_curve"][-1]["loss"] == result["heldout_loss"]
    adamw, coap = results["adamw"], results["coap_adafactor"]
    assert adamw["loss_curve"][0] == coap["loss_curve"][0]  # same frozen UNet, ControlNet init and first batch
    assert adamw["lr"] == coap["lr"] == CONTROLNET_PRESETS["micro"].lr
    low = run["config"]["low_rank"]
    assert (low["rank_ratio"], low["update_interval"], low["reproject_factor"], low["proj_gap"]) == (2.0, 2, 2, 3)
    assert coap["state_bytes"] < adamw["state_bytes"] and coap["state_ratio_to_adamw"] < 1
    assert coap["iteration_ratio_to_adamw"] == pytest.approx(coap["iteration_ms"] / adamw["iteration_ms"])
    assert set(coap["projected"]) >= {"tucker", "matrix"} and set(adamw["projected"]) == {"dense"}
    assert sum(k["parameters"] for k in coap["projected"].values()) == run["config"]["parameters"]
    assert coap["refresh"]["count"] == 1 + 6 // 2 and adamw["refresh"] is None
    assert run["config"]["frozen_unet"]["steps"] == CONTROLNET_PRESETS["micro"].pretrain_steps
    assert 0 <= reference["edge_f1"] <= 1
    assert run["data"]["name"] == "digits" and run["data"]["resolution"] == 8
    assert run["argv"][:2] == ["coap-bench", "controlnet"] and run["config"]["torch_threads"] == 1

    out = capsys.readouterr()
    assert "| coap_adafactor" in out.out and "edge F1" in out.out and "The frozen UNet alone" in out.out
    if HAS_MATPLOTLIB:
        for png in ("controlnet_loss.png", "controlnet_heldout_vs_state.png", "controlnet_samples.png"):
            assert (plots / png).stat().st_size > 0, png
        assert coap["sample_grid"] == str(plots / "controlnet_samples_coap_adafactor.png")
    else:
        assert "matplotlib is not installed" in out.err


def test_the_frozen_unet_is_pretrained_once_deterministically_and_cached(tmp_path, capsys):
    first = _run(tmp_path, tmp_path / "a", "--steps", "1", "--optimizers", "adamw", name="1.json")
    again = _run(tmp_path, tmp_path / "a", "--steps", "1", "--optimizers", "adamw", name="2.json")
    elsewhere = _run(tmp_path, tmp_path / "b", "--steps", "1", "--optimizers", "adamw", name="3.json")
    other_seed = _run(tmp_path, tmp_path / "a", "--steps", "1", "--optimizers", "adamw", "--unet-seed", "1", name="4")
    frozen = [run["config"]["frozen_unet"] for run in (first, again, elsewhere, other_seed)]
    assert [f["source"] for f in frozen] == ["pretrained here", "cache", "pretrained here", "pretrained here"]
    assert frozen[0]["path"] == frozen[1]["path"] and frozen[0]["path"].startswith(str(tmp_path / "a"))
    # The same options give the same weights, in any cache; another UNet seed gives others, cached beside them.
    assert frozen[0]["sha256"] == frozen[1]["sha256"] == frozen[2]["sha256"] != frozen[3]["sha256"]
    assert len(list((tmp_path / "a" / "controlnet").glob("unet-micro-*.pt"))) == 2
    # The ControlNet's runs then see the same frozen UNet: identical results.
    assert first["results"][0]["loss_curve"] == again["results"][0]["loss_curve"]


def test_a_new_controlnet_predicts_what_the_frozen_unet_predicts():
    unet = build_unet("micro", seed=0).eval()
    controlnet = build_controlnet(unet, "micro", seed=1)
    preset = CONTROLNET_PRESETS["micro"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    control = edge_map(torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1, preset.edge_threshold)
    t = torch.tensor([1, 10, 100, 999])
    prompt = prompt_embedding(preset, 4)
    with torch.no_grad():
        alone = predict_noise(unet, None, x, t, prompt, control)
        controlled = predict_noise(unet, controlnet, x, t, prompt, control)
    assert torch.equal(alone, controlled)
    # ...because only its zero convolutions are zero: the copied encoder holds the UNet's weights.
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)
    assert all(not conv.weight.any() for conv in controlnet.controlnet_down_blocks)


def test_edge_f1_scores_how_well_samples_follow_their_edge_maps():
    images = torch.full((2, 1, 12, 12), -1.0)
    images[:, :, 3:9, 4:8] = 1.0  # a white bar: its outline is the edge map
    control = edge_map(images, 1.5)
    assert 0 < control.mean() < 0.5
    assert edge_f1(images, control, 1.5) == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    shifted = edge_f1(torch.roll(images, 3, dims=-1), control, 1.5)
    assert 0 < shifted["f1"] < 1 and shifted["precision"] == pytest.approx(shifted["recall"])
    blank = edge_f1(torch.full_like(images, -1.0), control, 1.5)
    assert blank["f1"] == 0.0 and blank["recall"] == 0.0
    assert edge_f1(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 1.0)["f1"] == 1.0


def _boom(*args, **kwargs):
    raise RuntimeError("kernel not available on this machine")


def test_a_crashing_peer_is_a_failed_row(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setitem(
        registry.OPTIMIZERS, "adamw8bit", registry.OptimizerSpec("adamw8bit", "dense", "broken", _boom, "bitsandbytes")
    )
    run = _run(tmp_path, cache, "--steps", "2", "--optimizers", "adamw,adamw8bit")
    results = {r["name"]: r for r in run["results"]}
    assert results["adamw8bit"]["failed"] and "kernel not available" in results["adamw8bit"]["error"]
    assert not results["adamw"]["failed"]
    assert "failed: adamw8bit: RuntimeError: kernel not available" in capsys.readouterr().out


def test_resumed_run_ends_with_the_same_numbers(tmp_path, cache):
    optimizers = "adamw,coap_adafactor8bit" + (",galore_adafactor" if HAS_GALORE else "")
    common = ["--steps", "8", "--checkpoint-every", "3", "--warmup-steps", "2", "--eval-every", "4"]
    common += ["--optimizers", optimizers]
    whole = _run(tmp_path, cache, *common, "--checkpoint-dir", str(tmp_path / "a"), name="whole.json")
    part = _run(tmp_path, cache, *common, "--checkpoint-dir", str(tmp_path / "b"), "--stop-after", "5", name="p.json")
    assert all(not r["completed"] and r["steps_done"] == 5 for r in part["results"])
    resumed = _run(tmp_path, cache, *common, "--checkpoint-dir", str(tmp_path / "b"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert not a["failed"] and not b["failed"], (a.get("error"), b.get("error"))
        assert b["resumed_from_step"] == 3
        for key in ("loss_curve", "heldout_loss", "heldout_curve", "edge_f1", "state_bytes", "p_step_rel_changes"):
            assert a[key] == b[key], (a["name"], key)


def test_seeds_average_the_loss_and_the_edge_f1(tmp_path, cache):
    common = ("--steps", "2", "--optimizers", "adamw,coap_adamw")
    run = _run(tmp_path, cache, *common, "--seed", "3", "--seeds", "2", name="both.json")
    alone = _run(tmp_path, cache, *common, "--seed", "4", name="alone.json")
    for result, single in zip(run["results"], alone["results"], strict=True):
        assert result["seeds"] == [3, 4]
        assert result["heldout_loss_per_seed"][1] == single["heldout_loss"]
        assert result["edge_f1_per_seed"][1] == single["edge_f1"]
        assert result["edge_f1"] == pytest.approx(sum(result["edge_f1_per_seed"]) / 2, rel=1e-12)
    assert "seeds 3-4" in format_controlnet_table(run)


def test_lr_sweep_keeps_the_best_heldout_loss(tmp_path, cache):
    run = _run(tmp_path, cache, "--steps", "2", "--optimizers", "adamw", "--lr-sweep")
    (result,) = run["results"]
    sweep = result["lr_sweep"]
    assert [s["lr"] for s in sweep] == pytest.approx([5e-4, 1e-3, 2e-3])
    assert result["heldout_loss"] == min(s["heldout_loss"] for s in sweep)
    assert all(0 <= s["edge_f1"] <= 1 for s in sweep)


def test_a_users_unet_folder_replaces_the_pretraining(tmp_path, capsys):
    build_unet("micro", seed=7).save_pretrained(tmp_path / "unet")
    run = _run(tmp_path, tmp_path / "cache", "--steps", "1", "--optimizers", "adamw", "--pretrained", tmp_path / "unet")
    frozen = run["config"]["frozen_unet"]
    assert frozen["source"] == "user" and frozen["path"] == str(tmp_path / "unet")
    assert not (tmp_path / "cache").exists()  # nothing pretrained, nothing cached
    with pytest.raises(SystemExit) as exit_info:
        main(["controlnet", "--preset", "small", "--pretrained", str(tmp_path / "unet"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "does not fit the small preset: sample_size 8 (the preset's 16)" in capsys.readouterr().err


def test_bad_options_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["controlnet", "--preset", "sdxl", "--pretrained", str(tmp_path)])
    assert exit_info.value.code == 2 and "not built into this job yet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["controlnet", "--preset", "micro", "--pretrained", str(tmp_path), "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds must be at least 1, got 0"):
        ControlNetConfig(seeds=0).resolved()


def test_sdxl_preset_prints_the_papers_memory_row(tmp_path, capsys):
    path = tmp_path / "sdxl.json"
    assert main(["controlnet", "--preset", "sdxl", "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    rows = {(r["optimizer"], r["setting"]): r for r in run["rows"] if not r.get("error")}
    assert run["model"]["parameters"] > 1.2e9
    adamw, coap = rows["adamw", "-"], rows["coap_adafactor", "ratio 2"]
    assert adamw["ratio_to_adamw"] == 1 and coap["bytes"] < rows["adafactor", "-"]["bytes"] < adamw["bytes"]
    assert coap["ours"] == pytest.approx(coap["paper"], rel=0.02)  # the paper's 3.6 GB
    assert {name for name, _ in rows} <= set(ControlNetConfig().optimizers)
    assert "| coap_adafactor | ratio 2 |" in capsys.readouterr().out
