"""``coap-bench llama`` end to end on the micro preset: results, table, plots, failures, exact resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from coap_bench import llama as llama_module
from coap_bench import optimizers as registry
from coap_bench.arguments import config_from_args
from coap_bench.cli import build_parser, main
from coap_bench.llama import DEFAULT_LLAMA_OPTIMIZERS, LlamaConfig, format_llama_table

HAS_GALORE = importlib.util.find_spec("galore_torch") is not None

# Short COAP refresh schedule so that a few steps include Eq. 2 updates and SVDs on both sides of a resume.
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
    "--proj-gap",
    "3",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("COAP_TORCH_CACHE", str(tmp_path_factory.getbasetemp() / "coap-cache"))


def _run(tmp_path, *extra: str, name: str = "r.json", in_process: bool = True) -> dict:
    path = tmp_path / name
    args = ["llama", *_SMALL, "--json", str(path), *extra]
    assert main([*args, "--in-process"] if in_process else args) == 0
    return json.loads(path.read_text())


def test_llama_compares_adamw_and_coap(tmp_path, capsys):
    run = _run(tmp_path, "--steps", "8", "--optimizers", "adamw,coap_adamw", "--plots", str(tmp_path / "plots"))
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adamw"]
    for result in results.values():
        for key in (
            "lr",
            "state_bytes",
            "heldout_loss",
            "iteration_ms",
            "step_ms",
            "tokens_per_s",
            "final_loss",
            "heldout_perplexity",
            "peak_memory_bytes",
        ):
            assert math.isfinite(result[key]), (result["name"], key)
        assert len(result["loss_curve"]) == 8 and result["completed"] and not result["failed"]
        assert result["heldout_perplexity"] == pytest.approx(math.exp(result["heldout_loss"]))
    # The paper recipe: dense optimizers at 1e-3, low-rank ones at 1e-2 with scale 0.25.
    assert results["adamw"]["lr"] == 1e-3 and results["coap_adamw"]["lr"] == 1e-2
    assert run["config"]["low_rank"]["scale"] == 0.25 and run["config"]["low_rank"]["rank"] == 16
    assert results["coap_adamw"]["state_bytes"] < results["adamw"]["state_bytes"]
    assert results["coap_adamw"]["state_ratio_to_adamw"] < 1 == results["adamw"]["state_ratio_to_adamw"]
    assert results["coap_adamw"]["iteration_ratio_to_adamw"] == pytest.approx(
        results["coap_adamw"]["iteration_ms"] / results["adamw"]["iteration_ms"]
    )
    # Our optimizers report their refreshes and the size of their Eq. 2 steps.
    refresh = results["coap_adamw"]["refresh"]
    assert refresh["count"] == 1 + 8 // 2 and refresh["total_ms"] >= 0
    assert results["coap_adamw"]["p_step_rel_change"] is not None and results["adamw"]["refresh"] is None
    # Same init and first batch for every optimizer.
    assert results["adamw"]["loss_curve"][0] == results["coap_adamw"]["loss_curve"][0]
    assert run["data"]["train_sha256"] and run["data"]["heldout_sha256"] and run["data"]["corpus_sha256"]
    assert run["versions"]["torch"] and run["hardware"]["cpu_count"] >= 1
    assert run["argv"][:2] == ["coap-bench", "llama"]

    out = capsys.readouterr()
    assert "| coap_adamw" in out.out and "held-out loss" in out.out and "median |dP|/|P|" in out.out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plots" / "llama_loss.png").stat().st_size > 0
        assert (tmp_path / "plots" / "llama_heldout_vs_state.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in out.err


@pytest.mark.slow  # the same runner as ddpm, whose test of it is in the fast tier
def test_each_run_gets_its_own_process_by_default(tmp_path):
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw,coap_adamw", in_process=False)
    pids = {r["process_id"] for r in run["results"]}
    assert len(pids) == 2 and os.getpid() not in pids
    for result in run["results"]:
        assert result["rss_before_model_bytes"] <= result["peak_memory_bytes"]


def _boom(*args, **kwargs):
    raise RuntimeError("kernel not available on this machine")


def test_a_crashing_peer_is_a_failed_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "adamw_fused",
        registry.OptimizerSpec("adamw_fused", "dense", "broken", _boom, package="torch"),
    )
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw,adamw_fused,coap_adamw")
    results = {r["name"]: r for r in run["results"]}
    assert results["adamw_fused"]["failed"] and results["adamw_fused"]["error"] == (
        "RuntimeError: kernel not available on this machine"
    )
    assert results["adamw_fused"]["state_bytes"] is None and results["adamw_fused"]["heldout_loss"] is None
    assert not results["coap_adamw"]["failed"] and results["coap_adamw"]["state_ratio_to_adamw"] < 1
    out = capsys.readouterr().out
    assert "| adamw_fused" in out and "failed" in out
    assert "failed: adamw_fused: RuntimeError: kernel not available on this machine" in out


def test_a_missing_peer_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from coap_bench._deps import MissingExtraError

    def missing(*args, **kwargs):
        raise MissingExtraError("coap-bench needs apollo-torch, which is not installed: run `pip install apollo-torch`")

    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "apollo_adamw",
        registry.OptimizerSpec("apollo_adamw", "apollo", "APOLLO", missing, package="apollo-torch"),
    )
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw,apollo_adamw")
    assert run["results"][1]["failed"] and "not installed" in run["results"][1]["error"]
    assert "pip install apollo-torch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "optimizers",
    [
        "adamw,coap_adamw,coap_adafactor8bit",
        pytest.param(
            "galore_adamw",
            marks=[pytest.mark.slow, pytest.mark.skipif(not HAS_GALORE, reason="galore-torch not installed")],
        ),
    ],
)
def test_resumed_run_ends_with_the_same_numbers(tmp_path, optimizers):
    common = ["--steps", "10", "--checkpoint-every", "4", "--warmup-steps", "2", "--optimizers", optimizers]
    whole = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "a"), name="whole.json")
    # Interrupted after 6 steps (the last checkpoint is at step 4), then started again.
    part = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), "--stop-after", "6", name="part.json")
    assert all(not r["completed"] and r["steps_done"] == 6 for r in part["results"])
    for name in optimizers.split(","):
        assert (tmp_path / "b" / f"{name}.pt").exists()
    resumed = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert not a["failed"] and not b["failed"], (a.get("error"), b.get("error"))
        assert b["resumed_from_step"] == 4
        assert a["loss_curve"] == b["loss_curve"], a["name"]
        assert a["heldout_loss"] == b["heldout_loss"], a["name"]
        assert a["state_bytes"] == b["state_bytes"], a["name"]
        assert a["p_step_rel_changes"] == b["p_step_rel_changes"], a["name"]


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, capsys):
    _run(tmp_path, "--steps", "4", "--optimizers", "adamw", "--checkpoint-dir", str(tmp_path / "c"))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "llama",
                *_SMALL,
                "--steps",
                "4",
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
    assert "different run configuration (lr 0.001 there, 0.5 here)" in err, err  # what differs, and only that


@pytest.mark.slow  # the same sweep code as ddpm, whose test of it is in the fast tier
def test_lr_sweep_keeps_the_best_heldout_loss(tmp_path):
    run = _run(tmp_path, "--steps", "4", "--optimizers", "adamw", "--lr-sweep")
    (result,) = run["results"]
    sweep = result["lr_sweep"]
    assert [s["lr"] for s in sweep] == pytest.approx([5e-4, 1e-3, 2e-3])
    assert result["heldout_loss"] == min(s["heldout_loss"] for s in sweep)
    assert result["lr"] == next(s["lr"] for s in sweep if s["heldout_loss"] == result["heldout_loss"])
    assert result["lr_at_sweep_edge"] == (result["lr"] in (5e-4, 2e-3))


def test_drop_in_state_at_rank_ratio_4_is_the_readme_formula(tmp_path):
    """Every matrix projected at r = min // 4 with P (min, r) on the smaller side (the library's
    default) and two moments (max, r): 4 (2 max r + min r) bytes each, 8 bytes per other entry."""
    from coap_bench.llama_model import build_llama

    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw,coap_adamw", "--recipe", "drop-in", "--rank-ratio", "4")
    model = build_llama(llama_module.LLAMA_PRESETS["micro"], run["data"]["vocab_size"], seed=0, device="meta")
    expected = 0
    for param in model.parameters():
        if param.ndim == 2:
            m, n = max(param.shape), min(param.shape)
            r = n // 4
            expected += 4 * (2 * m * r + n * r)
        else:
            expected += 8 * param.numel()
    coap = run["results"][1]
    assert coap["state_bytes"] == expected
    assert coap["state_ratio_to_adamw"] <= 0.40
    assert all(r["lr"] == 1e-3 for r in run["results"])


def test_unknown_optimizer_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["llama", "--optimizers", "adamw,nope"])
    assert exit_info.value.code == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err


def test_defaults():
    args = build_parser().parse_args(["digits"])
    assert args.command == "digits"
    args = build_parser().parse_args(["llama"])
    assert (args.command, args.preset, args.optimizers, args.recipe) == (
        "llama",
        "tiny",
        list(DEFAULT_LLAMA_OPTIMIZERS),
        "paper",
    )
    assert {"adamw", "coap_adamw", "galore_adamw"} <= set(DEFAULT_LLAMA_OPTIMIZERS)
    config = LlamaConfig().resolved()
    assert config.isolate and config.steps == 400 and config.batch_size == 16 and config.seq_len == 128
    assert LlamaConfig(device="cuda").resolved().isolate is False


def test_projection_side_flag():
    def config(*flags: str) -> LlamaConfig:
        return config_from_args(LlamaConfig, build_parser().parse_args(["llama", *flags]), list(flags))

    assert config().projection_side is None and "projection_side" not in config().settings().coap_options()
    larger = config("--projection-side", "larger")
    assert larger.resolved().projection_side == "larger"
    assert larger.settings().coap_options()["projection_side"] == "larger"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["llama", "--projection-side", "output"])
    with pytest.raises(ValueError, match="unknown projection_side 'output'"):
        LlamaConfig(projection_side="output").resolved()


def test_state_dtype_flag():
    def config(*flags: str) -> LlamaConfig:
        return config_from_args(LlamaConfig, build_parser().parse_args(["llama", *flags]), list(flags))

    assert config().state_dtype == "float32" and config().settings().state_options() == {}  # the library's default
    bf16 = config("--state-dtype", "bf16")
    assert bf16.resolved().state_dtype == "bf16"
    assert bf16.settings().state_options() == {"state_dtype": "bf16"}
    assert "state_dtype" not in bf16.settings().coap_options()  # given to every group, not the projected one only
    with pytest.raises(SystemExit):
        build_parser().parse_args(["llama", "--state-dtype", "fp16"])
    with pytest.raises(ValueError, match="unknown state_dtype 'fp16'"):
        LlamaConfig(state_dtype="fp16").resolved()


def test_bf16_state_halves_coap_state_and_resumes_exactly(tmp_path, capsys):
    """``--state-dtype bf16``: P and every moment of CoapAdamW (its dense group too) in bfloat16, so the
    state is half the float32 one, to the byte; the peers ignore it; a run resumes bitwise; a float32
    checkpoint is not continued by a bf16 run."""
    common = ["--steps", "6", "--warmup-steps", "1", "--checkpoint-every", "2"]
    fp32 = _run(tmp_path, *common, "--optimizers", "adamw,coap_adamw", name="fp32.json")
    bf16 = _run(
        tmp_path, *common, "--optimizers", "adamw,coap_adamw", "--state-dtype", "bf16", "--checkpoint-dir",
        str(tmp_path / "b"), name="bf16.json",
    )  # fmt: skip
    assert "state in bf16" in capsys.readouterr().out
    assert fp32["config"]["low_rank"]["state_dtype"] == "float32" and bf16["config"]["state_dtype"] == "bf16"
    a, b = ({r["name"]: r for r in run["results"]} for run in (fp32, bf16))
    assert b["coap_adamw"]["state_bytes"] * 2 == a["coap_adamw"]["state_bytes"]
    assert b["adamw"]["state_bytes"] == a["adamw"]["state_bytes"]  # torch's AdamW: unchanged
    assert b["adamw"]["heldout_loss"] == a["adamw"]["heldout_loss"]
    assert (
        math.isfinite(b["coap_adamw"]["heldout_loss"])
        and b["coap_adamw"]["heldout_loss"] != a["coap_adamw"]["heldout_loss"]
    )
    # Interrupted after 3 steps (last checkpoint at 2), then continued: the same numbers.
    part = ["--optimizers", "coap_adamw", "--state-dtype", "bf16", "--checkpoint-dir", str(tmp_path / "c")]
    _run(tmp_path, *common, *part, "--stop-after", "3", name="part.json")
    resumed = _run(tmp_path, *common, *part, name="resumed.json")
    (again,) = resumed["results"]
    assert again["resumed_from_step"] == 2
    assert again["loss_curve"] == b["coap_adamw"]["loss_curve"]
    assert again["heldout_loss"] == b["coap_adamw"]["heldout_loss"]
    # A float32 run does not continue the bf16 checkpoint.
    with pytest.raises(SystemExit) as exit_info:
        main(["llama", *_SMALL, *common, "--optimizers", "coap_adamw", "--in-process", "--checkpoint-dir",
              str(tmp_path / "c")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "settings.state_dtype 'bf16' there, None here" in capsys.readouterr().err


def test_table_of_a_run_with_only_failures():
    run = {
        "config": {
            "preset": "micro",
            "parameters": 1,
            "steps": 1,
            "batch_size": 1,
            "seq_len": 2,
            "warmup_steps": 0,
            "final_lr_fraction": 0.1,
            "seed": 0,
            "device": "cpu",
            "torch_threads": 1,
            "recipe": "paper",
            "lrs": {"x": 0.1},
            "low_rank": {
                "rank": 2,
                "rank_ratio": None,
                "update_interval": 1,
                "reproject_factor": 1,
                "proj_gap": 1,
                "scale": 1.0,
                "weight_decay": 0.0,
            },
        },
        "data": {"vocab_size": 3, "corpus": {"name": "c"}, "train_tokens": 1, "heldout_tokens": 1},
        "results": [{"name": "x", "lr": 0.1, "failed": True, "error": "E: no"}],
    }
    text = format_llama_table(run)
    assert "| x " in text and "failed: x: E: no" in text


def test_scale_auto_reaches_every_low_rank_optimizer(tmp_path, capsys):
    run = _run(
        tmp_path, "--steps", "2", "--optimizers", "coap_adamw,galore_adamw", "--recipe", "drop-in", "--scale", "auto"
    )
    assert run["config"]["low_rank"]["scale"] == "auto"
    assert "update scale auto" in capsys.readouterr().out
    assert all(math.isfinite(r["heldout_loss"]) for r in run["results"])
