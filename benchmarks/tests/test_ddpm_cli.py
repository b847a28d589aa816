"""``coap-bench ddpm`` end to end on the micro preset: results, table, plots, failures, exact resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from bench_helpers import DDPM_QUICK

from coap_bench import optimizers as registry
from coap_bench.arguments import config_from_args
from coap_bench.cli import build_parser, main
from coap_bench.ddpm import (
    DDPM_PRESETS,
    DEFAULT_DDPM_OPTIMIZERS,
    DdpmConfig,
    format_ddpm_table,
    recipe_settings,
)

HAS_GALORE = importlib.util.find_spec("galore_torch") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# One thread (steady on a busy machine), a short COAP refresh schedule so that a few steps include
# Eq. 2 updates and SVDs (and GaLore's), a quick feature classifier.
_SMALL = [*DDPM_QUICK, "--proj-gap", "3"]


def _run(tmp_path, *extra: str, name: str = "r.json", in_process: bool = True) -> dict:
    path = tmp_path / name
    args = ["ddpm", *_SMALL, "--json", str(path), *extra]
    assert main([*args, "--in-process"] if in_process else args) == 0
    return json.loads(path.read_text())


def test_ddpm_compares_adamw_and_coap(tmp_path, capsys):
    plots = tmp_path / "plots"
    run = _run(tmp_path, "--steps", "6", "--optimizers", "adamw,coap_adamw", "--eval-every", "3", "--plots", str(plots))
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adamw"]
    for result in results.values():
        for key in (
            "lr",
            "state_bytes",
            "heldout_loss",
            "iteration_ms",
            "step_ms",
            "images_per_s",
            "final_loss",
            "peak_memory_bytes",
            "classifier_frechet_distance",
        ):
            assert math.isfinite(result[key]), (result["name"], key)
        assert len(result["loss_curve"]) == 6 and result["completed"] and not result["failed"]
        assert [p["step"] for p in result["heldout_curve"]] == [0, 3, 6]
        assert result["heldout_curve"][-1]["loss"] == result["heldout_loss"]
        assert result["fid"] is None and result["samples"] == DDPM_PRESETS["micro"].samples
    adamw, coap = results["adamw"], results["coap_adamw"]
    # Same init, batches and held-out set: identical first batch loss and held-out loss before training.
    assert adamw["loss_curve"][0] == coap["loss_curve"][0]
    assert adamw["heldout_curve"][0] == coap["heldout_curve"][0]
    # The paper recipe: rank ratio 1.5, T_u / lambda overridden here, the preset's lr for everyone.
    assert run["config"]["low_rank"]["rank_ratio"] == 1.5 and adamw["lr"] == coap["lr"] == 1e-3
    assert coap["state_bytes"] < adamw["state_bytes"] and coap["state_ratio_to_adamw"] < 1
    assert coap["iteration_ratio_to_adamw"] == pytest.approx(coap["iteration_ms"] / adamw["iteration_ms"])
    # COAP projects 3x3 kernels with Tucker-2 and matrices; AdamW projects nothing.
    assert set(coap["projected"]) == {"tucker", "matrix", "dense"} and set(adamw["projected"]) == {"dense"}
    assert sum(k["parameters"] for k in coap["projected"].values()) == run["config"]["parameters"]
    assert coap["refresh"]["count"] == 1 + 6 // 2 and adamw["refresh"] is None
    assert coap["p_step_rel_change"] is not None and adamw["p_step_rel_change"] is None
    assert set(coap["state_bytes_by_kind"]) >= {"exp_avg", "exp_avg_sq", "proj", "proj_out", "proj_in"}
    # Data hashes, environment, the Frechet set-up.
    assert run["data"]["name"] == "digits" and run["data"]["train_sha256"] and run["data"]["heldout_sha256"]
    assert run["data"]["resolution"] == 8 and run["data"]["train_images"] + run["data"]["heldout_images"] == 1797
    assert run["versions"]["diffusers"] and run["hardware"]["cpu_count"] >= 1
    assert run["argv"][:2] == ["coap-bench", "ddpm"]
    frechet = run["config"]["frechet"]
    assert "not FID" in frechet["metric"] and frechet["heldout_accuracy"] > 0.5
    assert math.isfinite(frechet["real_train_vs_heldout"])
    assert run["config"]["torch_threads"] == 1

    out = capsys.readouterr()
    assert "| coap_adamw" in out.out and "held-out loss" in out.out and "clf-FD" in out.out
    assert "NOT FID" in out.out and "Tucker-2 kernels" in out.out
    if HAS_MATPLOTLIB:
        for png in (
            "ddpm_loss.png",
            "ddpm_heldout_vs_state.png",
            "ddpm_samples.png",
            "ddpm_samples_adamw.png",
            "ddpm_samples_coap_adamw.png",
        ):
            assert (plots / png).stat().st_size > 0, png
        assert coap["sample_grid"] == str(plots / "ddpm_samples_coap_adamw.png")
    else:
        assert "matplotlib is not installed" in out.err


def test_each_run_gets_its_own_process_by_default(tmp_path):
    run = _run(tmp_path, "--steps", "1", "--optimizers", "adamw", in_process=False)
    (result,) = run["results"]
    assert not result["failed"], result.get("error")
    assert result["process_id"] != os.getpid()
    assert result["rss_before_model_bytes"] <= result["peak_memory_bytes"]


def _boom(*args, **kwargs):
    raise RuntimeError("kernel not available on this machine")


def test_a_crashing_peer_is_a_failed_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "adamw_fused",
        registry.OptimizerSpec("adamw_fused", "dense", "broken", _boom, package="torch"),
    )
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw,adamw_fused,coap_adafactor")
    results = {r["name"]: r for r in run["results"]}
    assert results["adamw_fused"]["failed"] and results["adamw_fused"]["error"] == (
        "RuntimeError: kernel not available on this machine"
    )
    assert not results["coap_adafactor"]["failed"] and results["coap_adafactor"]["state_ratio_to_adamw"] < 1
    out = capsys.readouterr().out
    assert "| adamw_fused" in out and "failed: adamw_fused: RuntimeError: kernel not available" in out


@pytest.mark.parametrize(
    "optimizers",
    [
        "adamw,coap_adamw",
        pytest.param("galore_adamw", marks=pytest.mark.skipif(not HAS_GALORE, reason="galore-torch not installed")),
    ],
)
def test_resumed_run_ends_with_the_same_numbers(tmp_path, optimizers):
    common = [
        "--steps",
        "10",
        "--checkpoint-every",
        "4",
        "--warmup-steps",
        "2",
        "--eval-every",
        "5",
        "--optimizers",
        optimizers,
    ]
    whole = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "a"), name="whole.json")
    # Interrupted after 6 steps (the last checkpoint is at step 4), then started again.
    part = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), "--stop-after", "6", name="part.json")
    assert all(not r["completed"] and r["steps_done"] == 6 for r in part["results"])
    resumed = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert not a["failed"] and not b["failed"], (a.get("error"), b.get("error"))
        assert b["resumed_from_step"] == 4
        for key in (
            "loss_curve",
            "heldout_loss",
            "heldout_curve",
            "classifier_frechet_distance",
            "state_bytes",
            "p_step_rel_changes",
        ):
            assert a[key] == b[key], (a["name"], key)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, capsys):
    _run(tmp_path, "--steps", "2", "--optimizers", "adamw", "--checkpoint-dir", str(tmp_path / "c"))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "ddpm",
                *_SMALL,
                "--steps",
                "2",
                "--optimizers",
                "adamw",
                "--lr",
                "0.5",
                "--in-process",
                "--checkpoint-dir",
                str(tmp_path / "c"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # What differs, and only that (the first run trained at the preset's lr).
    assert f"different run configuration (lr {DDPM_PRESETS['micro'].lr!r} there, 0.5 here)" in err, err


def test_lr_sweep_keeps_the_best_heldout_loss(tmp_path):
    run = _run(tmp_path, "--steps", "3", "--optimizers", "adamw", "--lr-sweep")
    (result,) = run["results"]
    sweep = result["lr_sweep"]
    assert [s["lr"] for s in sweep] == pytest.approx([5e-4, 1e-3, 2e-3])
    assert result["heldout_loss"] == min(s["heldout_loss"] for s in sweep)
    assert result["lr"] == next(s["lr"] for s in sweep if s["heldout_loss"] == result["heldout_loss"])
    assert all(math.isfinite(s["classifier_frechet_distance"]) for s in sweep)


def test_seeds_average_runs_that_equal_single_seed_runs(tmp_path):
    common = ("--steps", "3", "--optimizers", "adamw,coap_adamw", "--samples", "4", "--sample-steps", "2")
    run = _run(tmp_path, *common, "--seed", "3", "--seeds", "2", name="both.json")
    alone = _run(tmp_path, *common, "--seed", "4", name="alone.json")
    for result, single in zip(run["results"], alone["results"]):
        assert result["seeds"] == [3, 4]
        # The second seed's run is exactly the run started with --seed 4.
        assert result["heldout_loss_per_seed"][1] == single["heldout_loss"]
        assert result["heldout_loss"] == pytest.approx(sum(result["heldout_loss_per_seed"]) / 2, rel=1e-12)
        assert result["heldout_loss_std"] > 0
        # The sample-quality classifier is trained once per invocation (from --seed): every seed's
        # samples are scored by the same one, so only the per-seed values of one run compare.
        assert len(result["classifier_frechet_distance_per_seed"]) == 2
        assert all(math.isfinite(value) for value in result["classifier_frechet_distance_per_seed"])
    adamw, coap = run["results"]
    paired = [a / b - 1 for a, b in zip(coap["heldout_loss_per_seed"], adamw["heldout_loss_per_seed"])]
    assert coap["heldout_loss_rel_to_adamw_per_seed"] == pytest.approx(paired)
    assert run["config"]["seeds"] == 2
    assert "seeds 3-4" in format_ddpm_table(run)


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["ddpm", "--seeds", "0"])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds must be at least 1, got 0"):
        DdpmConfig(seeds=0).resolved()


def test_image_folder_with_class_subfolders(tmp_path):
    image = pytest.importorskip("PIL.Image")
    import torch

    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(24):
            pixels = (torch.rand(12, 10, generator=generator) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels, mode="L").save(tmp_path / "images" / label / f"{i}.png")
    run = _run(
        tmp_path, "--steps", "2", "--optimizers", "adamw", "--batch-size", "4", "--image-dir", str(tmp_path / "images")
    )
    data = run["data"]
    assert data["name"] == "folder" and data["classes"] == ["a", "b"] and data["label_source"] == "classes"
    assert data["train_images"] + data["heldout_images"] == 48 and data["resolution"] == 8
    assert not run["results"][0]["failed"], run["results"][0].get("error")


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is not None or importlib.util.find_spec("pytorch_fid") is not None,
    reason="a FID backend is installed",
)
def test_fid_without_a_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ddpm", *_SMALL, "--steps", "1", "--optimizers", "adamw", "--fid", "--in-process"])
    assert exit_info.value.code == 2
    assert "pip install torch-fidelity" in capsys.readouterr().err


def test_unknown_optimizer_and_dataset_clash_are_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ddpm", "--optimizers", "adamw,nope"])
    assert exit_info.value.code == 2 and "unknown optimizer 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["ddpm", "--cifar10", "--image-dir", "x", "--in-process"])
    assert exit_info.value.code == 2 and "two different datasets" in capsys.readouterr().err


def test_defaults_and_presets():
    args = build_parser().parse_args(["ddpm"])
    assert (args.command, args.preset, args.optimizers, args.recipe) == (
        "ddpm",
        "small",
        list(DEFAULT_DDPM_OPTIMIZERS),
        "paper",
    )
    config = DdpmConfig().resolved()
    assert config.isolate and (config.steps, config.batch_size, config.samples) == (500, 32, 256)
    assert config.sampler == "ddim" and config.warmup_steps == 50
    assert config.lr_for("adamw") == config.lr_for("coap_adamw") == 6e-3 and config.seeds == 1
    assert DdpmConfig(device="cuda").resolved().isolate is False
    cifar = DdpmConfig(preset="cifar10").resolved()
    assert cifar.lr_for("coap_adamw") == cifar.lr_for("adamw") == 2e-4 and cifar.batch_size == 128
    paper, drop_in = recipe_settings("paper"), recipe_settings("drop-in")
    assert (paper.rank_ratio, paper.update_interval, paper.reproject_factor) == (1.5, 16, 10)
    assert (drop_in.rank_ratio, drop_in.update_interval, drop_in.reproject_factor) == (2.0, 32, 5)
    assert recipe_settings("paper", rank_ratio=3).rank_ratio == 3


def test_projection_side_flag():
    def config(*flags: str) -> DdpmConfig:
        return config_from_args(DdpmConfig, build_parser().parse_args(["ddpm", *flags]), list(flags))

    assert config().projection_side is None and "projection_side" not in config().settings().coap_options()
    smaller = config("--projection-side", "smaller")
    assert smaller.resolved().projection_side == "smaller"
    assert smaller.settings().coap_options()["projection_side"] == "smaller"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ddpm", "--projection-side", "output"])
    with pytest.raises(ValueError, match="unknown projection_side 'output'"):
        DdpmConfig(projection_side="output").resolved()


def test_state_dtype_flag():
    def config(*flags: str) -> DdpmConfig:
        return config_from_args(DdpmConfig, build_parser().parse_args(["ddpm", *flags]), list(flags))

    assert config().state_dtype == "float32" and config().settings().state_options() == {}  # the library's default
    bf16 = config("--state-dtype", "bf16")
    assert bf16.resolved().state_dtype == "bf16"
    assert bf16.settings().state_options() == {"state_dtype": "bf16"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ddpm", "--state-dtype", "fp16"])
    with pytest.raises(ValueError, match="unknown state_dtype 'fp16'"):
        DdpmConfig(state_dtype="fp16").resolved()


def test_bf16_state_halves_coap_state(tmp_path, capsys):
    """``--state-dtype bf16``: P and every moment of the COAP optimizers in bfloat16 (Tucker-2 kernels,
    matrices and the dense tensors alike), half the float32 state to the byte; the peers ignore it."""
    names = "adamw,coap_adamw,coap_adafactor"
    fp32 = _run(tmp_path, "--steps", "3", "--optimizers", names, name="fp32.json")
    bf16 = _run(tmp_path, "--steps", "3", "--optimizers", names, "--state-dtype", "bf16", name="bf16.json")
    assert "state in bf16" in capsys.readouterr().out
    assert bf16["config"]["low_rank"]["state_dtype"] == "bf16"
    a, b = ({r["name"]: r for r in run["results"]} for run in (fp32, bf16))
    for name in ("coap_adamw", "coap_adafactor"):
        assert b[name]["state_bytes"] * 2 == a[name]["state_bytes"], name
        assert math.isfinite(b[name]["heldout_loss"]), name
    assert b["adamw"]["state_bytes"] == a["adamw"]["state_bytes"]
    assert b["adamw"]["heldout_loss"] == a["adamw"]["heldout_loss"]


def test_cifar10_preset_is_the_ddpm_cifar10_unet():
    """google/ddpm-cifar10-32's UNet, written in code: 35.7M parameters (counted on the meta device)."""
    assert DDPM_PRESETS["cifar10"].num_parameters() == 35_746_307
    assert DDPM_PRESETS["small"].num_parameters() < 1_000_000


def test_table_of_a_run_with_only_failures():
    run = {
        "config": {
            "preset": "micro",
            "parameters": 1,
            "steps": 1,
            "batch_size": 1,
            "warmup_steps": 0,
            "final_lr_fraction": 0.1,
            "seed": 0,
            "device": "cpu",
            "torch_threads": 1,
            "recipe": "paper",
            "lrs": {"x": 0.1},
            "samples": 2,
            "sampler": "ddim",
            "sample_steps": 1,
            "heldout_evaluations": 1,
            "unet": {"block_out_channels": [1], "sample_size": 8, "in_channels": 1},
            "frechet": {"heldout_accuracy": None, "label_source": "classes", "real_train_vs_heldout": 0.0},
            "low_rank": {
                "rank": None,
                "rank_ratio": 1.5,
                "update_interval": 1,
                "reproject_factor": 1,
                "proj_gap": 1,
                "scale": 1.0,
                "weight_decay": 0.0,
            },
        },
        "data": {"name": "digits", "train_images": 1, "heldout_images": 1},
        "results": [{"name": "x", "lr": 0.1, "failed": True, "error": "E: no"}],
    }
    text = format_ddpm_table(run)
    assert "| x " in text and "failed: x: E: no" in text


@pytest.mark.parametrize("module", ["presets", "data", "model"])
def test_module_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"coap_bench.ddpm.{module}"), raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0
