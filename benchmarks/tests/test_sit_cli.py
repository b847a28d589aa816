"""``coap-bench sit``: the SiT model and objective, the per-optimizer schedules of the paper's SiT rows, the
comparison end to end on the micro preset (results, planned vs real state, plots, exact resume, seeds, lr
sweep), and the SiT-XL/2 preset planned on the meta device."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from coap_bench import optimizers as registry
from coap_bench.cli import build_parser, main
from coap_bench.sit import (
    DEFAULT_SIT_OPTIMIZERS,
    SIT_PRESETS,
    SitBatches,
    SitConfig,
    build_sit,
    count_parameters,
    format_sit_table,
    generate_samples,
    heldout_set,
    interpolate,
    planned_state_bytes,
    velocity_loss,
)

HAS_GALORE = importlib.util.find_spec("galore_torch") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

#: One thread, no bars, a quick feature classifier: a micro run takes about a second per optimizer.
QUICK = ["--preset", "micro", "--threads", "1", "--classifier-steps", "40", "--no-progress", "--in-process"]
#: Every default optimizer whose package is installed.
AVAILABLE = [
    name
    for name in DEFAULT_SIT_OPTIMIZERS
    if (name != "galore_adamw" or HAS_GALORE)
    and (name != "adamw8bit" or HAS_BNB)
    and (name != "adafactor" or HAS_TRANSFORMERS)
]


def _run(tmp_path, *extra: str, name: str = "r.json") -> dict:
    path = tmp_path / name
    assert main(["sit", *QUICK, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ the model


def test_sit_xl_2_has_the_parameter_layout_coap_bench_memory_counts():
    from coap_bench.memory import SiT as MemoryJobSiT

    with torch.device("meta"):
        reference = MemoryJobSiT()
    ours = build_sit("xl-2", device="meta")
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in reference.named_parameters()
    }
    # SiT-XL/2's 675M parameters (the frozen position embedding is not trained).
    assert count_parameters("xl-2") == 674_834_720


def test_adaln_zero_model_starts_as_the_zero_map_and_depends_on_label_and_time():
    model = build_sit("micro", seed=0)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))
    # Same seed, same weights; the global RNG is left alone.
    state = torch.get_rng_state()
    again = build_sit("micro", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Once the zero-initialised layers move, the output depends on the label and on t.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    base = model(x, t, labels)
    assert not torch.allclose(base, model(x, t, torch.tensor([3, 4, 5, 6])))
    assert not torch.allclose(base, model(x, 1 - t, labels))
    assert base.shape == x.shape


def test_linear_interpolant_and_velocity_target():
    x, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    x_0, v = interpolate(x, noise, torch.zeros(3))
    x_1, _ = interpolate(x, noise, torch.ones(3))
    assert torch.equal(x_0, x) and torch.equal(x_1, noise) and torch.equal(v, noise - x)
    x_half, _ = interpolate(x, noise, torch.full((3,), 0.5))
    assert torch.allclose(x_half, (x + noise) / 2)

    class Oracle(nn.Module):  # predicts the true velocity: zero loss
        def forward(self, x_t, t, labels):
            return noise - x

    assert velocity_loss(Oracle(), x, torch.zeros(3, dtype=torch.long), noise, torch.rand(3)) == 0


class _ConstantVelocity(nn.Module):
    """A stand-in SiT whose velocity is its label (class ``num_classes`` is the null class), everywhere."""

    in_channels, grid, patch, num_classes = 1, 2, 2, 3

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels):
        assert bool((t >= 0).all()) and bool((t <= 1).all())
        return labels.float().view(-1, 1, 1, 1).expand_as(x) / 10


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 1), ("euler", 5), ("heun", 3)])
def test_ode_sampler_integrates_from_noise_at_t1_to_t0(sampler, steps):
    labels = torch.tensor([0, 1, 2, 1])
    samples = generate_samples(_ConstantVelocity(), labels, sampler=sampler, steps=steps, seed=7)
    noise = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    # dx/dt = v constant from t = 1 to t = 0: x_0 = x_1 - v, whatever the solver and the steps.
    expected = (noise - labels.float().view(-1, 1, 1, 1) / 10).clamp(-1, 1)
    assert torch.allclose(samples, expected, atol=1e-6)
    # Classifier-free guidance: v = v_null + s (v_y - v_null), the null class being 3.
    guided = generate_samples(_ConstantVelocity(), labels, sampler=sampler, steps=steps, seed=7, cfg_scale=2.0)
    velocity = (3 + 2.0 * (labels.float() - 3)).view(-1, 1, 1, 1) / 10
    assert torch.allclose(guided, (noise - velocity).clamp(-1, 1), atol=1e-6)


def test_batches_resume_exactly_and_drop_labels_to_the_null_class():
    images, labels = torch.randn(40, 1, 4, 4), torch.arange(40) % 10
    stream = SitBatches(images, labels, 8, seed=3, class_dropout=0.5, null_class=10)
    first = stream.next()
    saved = stream.state_dict()
    expected = [stream.next() for _ in range(7)]  # crosses an epoch boundary
    stream.load_state_dict(saved)
    again = [stream.next() for _ in range(7)]
    for a, b in zip(expected, again):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "labels", "noise", "t"))
    dropped = torch.cat([b.labels for b in [first, *expected]])
    assert 0 < int((dropped == 10).sum()) < len(dropped)
    assert bool(((first.t >= 0) & (first.t < 1)).all())
    held = heldout_set(images[:10], labels[:10], 3)
    assert len(held) == 30 and torch.equal(held.labels, labels[:10].repeat(3))
    # Stratified: one time in each of the 30 strata of [0, 1].
    assert torch.equal((held.t * 30).floor().sort().values, torch.arange(30, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ settings


def test_each_coap_optimizer_gets_its_paper_sit_schedule():
    config = SitConfig().resolved()
    adamw, adafactor = config.settings("coap_adamw"), config.settings("coap_adafactor")
    assert (adamw.update_interval, adamw.reproject_factor) == (30, 10)
    assert (adafactor.update_interval, adafactor.reproject_factor) == (200, 5)
    assert config.settings("coap_adamw8bit") == adamw and config.settings("coap_adafactor8bit") == adafactor
    # The paper's rank 512 of 1152 as a ratio on the small presets, the absolute rank on xl-2; GaLore alike.
    assert adamw.rank is None and adamw.rank_ratio == pytest.approx(1152 / 512)
    xl = SitConfig(preset="xl-2").resolved()
    assert xl.settings("coap_adamw").rank == xl.settings("galore_adamw").rank == 512
    assert SitConfig(preset="xl-2", rank_ratio=4).settings("coap_adamw").rank is None
    # Flags override every COAP optimizer; drop-in is the library defaults.
    both = SitConfig(update_interval=7).resolved()
    assert both.settings("coap_adamw").update_interval == both.settings("coap_adafactor").update_interval == 7
    drop_in = SitConfig(recipe="drop-in").settings("coap_adafactor")
    assert (drop_in.rank_ratio, drop_in.update_interval, drop_in.reproject_factor) == (2.0, 32, 5)


def test_parser_defaults_and_bad_values(capsys):
    args = build_parser().parse_args(["sit"])
    assert args.preset == "small" and tuple(args.optimizers) == DEFAULT_SIT_OPTIMIZERS and args.cfg_scale == 1.0
    for bad in (["--cfg-scale", "0.5"], ["--preset", "xl-3"], ["--optimizers", "sgd"], ["--sampler", "dopri5"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["sit", *bad])
        assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(ValueError, match="warmup_steps"):
        SitConfig(steps=3, warmup_steps=3).resolved()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Every available default optimizer on the micro preset for 30 steps, with the paper's schedules."""
    folder = tmp_path_factory.mktemp("sit")
    plots = folder / "plots"
    run = _run(
        folder, "--steps", "30", "--optimizers", ",".join(AVAILABLE), "--eval-every", "15", "--plots", str(plots)
    )
    return run, plots


def test_every_optimizer_trains_from_the_same_start(compared):
    run, _ = compared
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == AVAILABLE
    for result in results.values():
        assert not result["failed"], result.get("error")
        for key in ("state_bytes", "heldout_loss", "iteration_ms", "final_loss", "classifier_frechet_distance"):
            assert math.isfinite(result[key]), (result["name"], key)
        assert 0 <= result["sample_class_accuracy"] <= 1 and result["samples"] == SIT_PRESETS["micro"].samples
        assert [p["step"] for p in result["heldout_curve"]] == [0, 15, 30]
        assert result["heldout_curve"][-1]["loss"] == result["heldout_loss"]
        # Same weights, batches and held-out set: the same first loss and held-out loss before training.
        assert result["loss_curve"][0] == results["adamw"]["loss_curve"][0]
        assert result["heldout_curve"][0] == results["adamw"]["heldout_curve"][0]
        # Training helps: the held-out loss fell.
        assert result["heldout_loss"] < result["heldout_curve"][0]["loss"]
    coap_adamw, coap_adafactor = results["coap_adamw"], results["coap_adafactor"]
    # Each COAP optimizer refreshes on its own schedule: T_u 30 (steps 1 and 30), T_u 200 (step 1 only).
    assert coap_adamw["refresh"]["count"] == 2 and coap_adafactor["refresh"]["count"] == 1
    assert coap_adamw["low_rank"]["update_interval"] == 30 and coap_adafactor["low_rank"]["update_interval"] == 200
    for coap in (coap_adamw, coap_adafactor):
        assert coap["state_ratio_to_adamw"] < 1 and set(coap["projected"]) == {"matrix", "dense"}
        # adaLN-Zero: the blocks' matrices see an all-zero gradient at the first step; the library
        # builds their P from the next gradient instead of warning of a rank-0 one.
        assert not any("numerical rank 0 " in message for message in coap["warnings"])
    assert results["adamw"]["projected"] == {"dense": results["adamw"]["projected"]["dense"]}
    assert run["config"]["low_rank"]["coap_adafactor"]["reproject_factor"] == 5
    table = " ".join(format_sit_table(run).split())  # the setup lines are wrapped
    assert "coap_adamw rank ratio 2.25, T_u 30, lambda 10" in table and "T_u 200, lambda 5" in table
    assert "class acc" in table and "held-out loss" in table


def test_planned_state_is_the_trained_optimizers_state(compared):
    run, _ = compared
    config = SitConfig(preset="micro")
    model = build_sit("micro", device="meta")
    for result in run["results"]:
        name = result["name"]
        assert planned_state_bytes(model, name, config.settings(name), result["lr"]) == result["state_bytes"], name


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plots_and_sample_grids_are_written(compared):
    run, plots = compared
    for name in ("sit_loss.png", "sit_heldout_vs_state.png", "sit_samples.png", "sit_samples_coap_adamw.png"):
        assert (plots / name).stat().st_size > 0, name
    assert run["results"][0]["sample_grid"] == str(plots / f"sit_samples_{run['results'][0]['name']}.png")


def test_resumed_run_ends_with_the_same_numbers(tmp_path):
    common = ["--steps", "10", "--checkpoint-every", "4", "--warmup-steps", "2", "--eval-every", "5"]
    common += ["--optimizers", "adamw,coap_adamw", "--update-interval", "2", "--reproject-factor", "2"]
    whole = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "a"), name="whole.json")
    part = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), "--stop-after", "6", name="part.json")
    assert all(not r["completed"] and r["steps_done"] == 6 for r in part["results"])
    resumed = _run(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert b["resumed_from_step"] == 4
        for key in ("loss_curve", "heldout_loss", "heldout_curve", "classifier_frechet_distance", "state_bytes"):
            assert a[key] == b[key], (a["name"], key)


def test_seeds_and_lr_sweep(tmp_path):
    run = _run(tmp_path, "--steps", "3", "--optimizers", "adamw,coap_adafactor", "--seeds", "2", "--lr-sweep")
    for result in run["results"]:
        assert result["seeds"] == [0, 1] and len(result["heldout_loss_per_seed"]) == 2
        assert result["heldout_loss"] == pytest.approx(sum(result["heldout_loss_per_seed"]) / 2, rel=1e-12)
        sweep = result["lr_sweep"]
        assert [s["lr"] for s in sweep] == pytest.approx([5e-4, 1e-3, 2e-3])
        assert result["heldout_loss"] == min(s["heldout_loss"] for s in sweep)
    coap = run["results"][1]
    assert coap["heldout_loss_rel_to_adamw_per_seed"] == pytest.approx(
        [a / b - 1 for a, b in zip(coap["heldout_loss_per_seed"], run["results"][0]["heldout_loss_per_seed"])]
    )
    assert "seeds 0-1" in format_sit_table(run)


def test_each_run_gets_its_own_process_by_default(tmp_path):
    path = tmp_path / "r.json"
    quick = [flag for flag in QUICK if flag != "--in-process"]
    assert main(["sit", *quick, "--steps", "1", "--optimizers", "adamw", "--json", str(path)]) == 0
    (result,) = json.loads(path.read_text())["results"]
    assert not result["failed"], result.get("error")
    assert result["process_id"] != os.getpid()


def _boom(*args, **kwargs):
    raise RuntimeError("kernel not available on this machine")


def test_a_crashing_peer_is_a_failed_row_and_a_foreign_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    broken = registry.OptimizerSpec("adamw_fused", "dense", "broken", _boom, package="torch")
    monkeypatch.setitem(registry.OPTIMIZERS, "adamw_fused", broken)
    folder = str(tmp_path / "c")
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw_fused,coap_adamw", "--checkpoint-dir", folder)
    failed, coap = run["results"]
    assert failed["failed"] and failed["error"] == "RuntimeError: kernel not available on this machine"
    assert not coap["failed"] and "failed: adamw_fused: RuntimeError" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sit", *QUICK, "--steps", "2", "--optimizers", "coap_adamw", "--lr", "0.5", "--checkpoint-dir", folder])
    assert exit_info.value.code == 2
    assert "different run configuration (lr 0.001 there, 0.5 here)" in capsys.readouterr().err


def test_a_latent_preset_trains_on_images_with_a_fourth_channel(tmp_path, monkeypatch):
    # xl-2's data path (4 input channels from 3-channel images, 1000 classes, variance channels) at micro size.
    latent = dataclasses.replace(
        SIT_PRESETS["xl-2"], resolution=8, hidden=32, depth=1, heads=2, batch_size=16, samples=16, sample_steps=2,
        eval_batch_size=128, rank=None, cpu_training=True, lr=1e-3,
    )  # fmt: skip
    monkeypatch.setitem(SIT_PRESETS, "latent", latent)
    run = _run(tmp_path, "--preset", "latent", "--steps", "3", "--optimizers", "coap_adamw", "--cfg-scale", "2")
    (result,) = run["results"]
    assert not result["failed"], result.get("error")
    assert run["data"]["channels"] == 3 and run["config"]["model"]["in_channels"] == 4
    assert math.isfinite(result["heldout_loss"]) and math.isfinite(result["classifier_frechet_distance"])


def test_image_folder_with_class_subfolders(tmp_path):
    image = pytest.importorskip("PIL.Image")
    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(24):
            pixels = (torch.rand(12, 10, generator=generator) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels, mode="L").save(tmp_path / "images" / label / f"{i}.png")
    folder = str(tmp_path / "images")
    run = _run(tmp_path, "--steps", "2", "--optimizers", "adamw", "--batch-size", "4", "--image-dir", folder)
    assert run["data"]["name"] == "folder" and run["data"]["num_classes"] == 2
    (result,) = run["results"]
    assert not result["failed"], result.get("error")
    assert 0 <= result["sample_class_accuracy"] <= 1


def test_xl_2_on_a_cpu_prints_the_planned_state_without_training(tmp_path, capsys):
    names = ",".join(["adamw", "coap_adamw", "coap_adafactor", *(["galore_adamw"] if HAS_GALORE else [])])
    path = tmp_path / "xl.json"
    assert main(["sit", "--preset", "xl-2", "--optimizers", names, "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    assert run["config"]["memory_only"] and run["config"]["memory_job_layout"] is True
    results = {r["name"]: r for r in run["results"]}
    adamw = results["adamw"]["state_bytes"]
    assert adamw == 8 * 674_834_720  # two float32 moments per trained value
    for name in ("coap_adamw", "coap_adafactor"):
        assert results[name]["planned"] and results[name]["low_rank"]["rank"] == 512
        assert results[name]["state_ratio_to_adamw"] == pytest.approx(results[name]["state_bytes"] / adamw)
    assert results["coap_adafactor"]["state_bytes"] < results["coap_adamw"]["state_bytes"] < adamw
    # The bytes `coap-bench memory` prints for SiT-XL/2 at rank 512, optimizer by optimizer.
    from coap_bench.memory import run_memory

    memory_job = {row["optimizer"]: row["bytes"] for row in run_memory(["sit-xl-2"])["rows"]}
    assert all(result["state_bytes"] == memory_job[name] for name, result in results.items())
    out = " ".join(capsys.readouterr().out.split())
    assert "planned on the meta device" in out and "rank 512, T_u 30, lambda 10" in out
    assert "rank 512, T_u 200, lambda 5" in out


@pytest.mark.parametrize("module", ["presets", "data", "model"])
def test_module_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"coap_bench.sit.{module}"), raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0
