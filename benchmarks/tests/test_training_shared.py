"""What the training jobs share: the per-optimizer / lr / seed loop with a job's own methods and scores, the
held-out loop, evaluation and sampling in chunks, the batch order, and the pieces of their tables."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch import nn

from coap_bench.images import ShuffledBatches, heldout_draws
from coap_bench.report import failed_columns, job_table, measurement_columns, measurement_header, sweep_edge_listing
from coap_bench.runner import ratio_to_baseline
from coap_bench.training import SEED_AVERAGED, average_seeds, heldout_mean, run_optimizers, sample_in_chunks


@dataclasses.dataclass
class _Config:
    optimizers: tuple[str, ...]
    seed: int = 0
    seeds: int = 2
    lr_sweep: bool = False
    isolate: bool = False
    checkpoint_dir: str | None = None

    def lr_for(self, name: str) -> float:
        return 0.1


def _train(name: str, lr: float, config: _Config, offset: float, checkpoint) -> dict:
    if name == "broken":
        raise RuntimeError("no such package")
    score = offset + config.seed
    return {"name": name, "lr": lr, "heldout_loss": score, "final_loss": score, "edge_f1": 2.0 * score}


def test_a_job_runs_its_own_methods_and_averages_its_own_scores():
    specs = {"adamw": types.SimpleNamespace(package=None), "broken": types.SimpleNamespace(package="peft")}
    config = _Config(optimizers=("adamw", "broken"))
    adamw, broken = run_optimizers(config, _train, (config, 1.0), ("lr",), specs=specs, also_averaged=("edge_f1",))
    # Seeds 0 and 1: the config handed to each run is the seed's copy.
    assert adamw["heldout_loss_per_seed"] == [1.0, 2.0] and adamw["heldout_loss"] == 1.5
    assert adamw["edge_f1_per_seed"] == [2.0, 4.0] and adamw["edge_f1"] == 3.0
    assert broken["failed"] and broken["package"] == "peft"


def test_average_seeds_averages_the_keys_asked_for_only():
    runs = [{"seed": s, "heldout_loss": float(s), "edge_f1": float(s)} for s in (0, 1)]
    row = average_seeds(runs)
    assert row["heldout_loss"] == 0.5 and row["edge_f1"] == 0.0 and "edge_f1_per_seed" not in row
    assert average_seeds(runs, (*SEED_AVERAGED, "edge_f1"))["edge_f1"] == 0.5


def test_ratio_to_baseline_needs_a_finished_baseline():
    results = [{"name": "adamw", "fd": 2.0}, {"name": "coap_adamw", "fd": 1.0}, {"name": "x", "failed": True}]
    ratio_to_baseline(results, "fd")
    assert [r.get("fd_ratio_to_adamw") for r in results] == [1.0, 0.5, None]
    results = [{"name": "adamw", "failed": True}, {"name": "coap_adamw", "fd": 1.0}]
    ratio_to_baseline(results, "fd")
    assert "fd_ratio_to_adamw" not in results[1]


def test_heldout_mean_and_sampling_restore_the_mode():
    model = nn.Linear(2, 2)
    values = torch.arange(10.0)
    assert heldout_mean(model, 10, 3, lambda chunk: values[chunk].sum(), 5) == pytest.approx(9.0)
    assert model.training
    chunks = []

    def sample(chunk: slice) -> torch.Tensor:
        chunks.append((chunk.start, chunk.stop))
        return torch.full((chunk.stop - chunk.start, 1), 3.0)

    samples = sample_in_chunks(model, 5, 2, sample)
    assert chunks == [(0, 2), (2, 4), (4, 5)]
    assert samples.shape == (5, 1) and float(samples.max()) == 1.0  # clamped to [-1, 1]
    model.eval()
    sample_in_chunks(model, 1, 1, lambda chunk: torch.zeros(1, 1))
    assert not model.training


def test_shuffled_batches_resume_and_refuse_a_batch_larger_than_the_data():
    stream = ShuffledBatches(10, 4, seed=3)
    stream.next_index()
    state = stream.state_dict()
    expected = [stream.next_index() for _ in range(3)]
    again = ShuffledBatches(10, 4, seed=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next_index() for _ in range(3)]))
    with pytest.raises(ValueError, match="batch size 11 exceeds the 10 training images"):
        ShuffledBatches(10, 11, seed=0)


def test_heldout_draws_are_seeded_and_cover_every_stratum():
    images = torch.zeros(5, 1, 2, 2)
    tiled, times, noise = heldout_draws(images, 2, lambda n: torch.arange(n))
    again = heldout_draws(images, 2, lambda n: torch.arange(n))
    assert tiled.shape[0] == 10 and sorted(times.tolist()) == list(range(10))
    assert torch.equal(times, again[1]) and torch.equal(noise, again[2])


def _result(name: str, **more) -> dict:
    return {
        "name": name,
        "lr": 0.001,
        "state_bytes": 2048,
        "peak_memory_bytes": 4096,
        "iteration_ms": 10.0,
        "step_ms": 1.0,
        "refresh": None,
        "images_per_s": 100.0,
        "final_loss": 0.5,
        "heldout_loss": 0.25,
        **more,
    }


def test_table_pieces_line_up():
    header = measurement_header("img/s")
    assert len(header) == len(measurement_columns(_result("adamw"), "images_per_s"))
    failed = failed_columns({"name": "x", "lr": 0.01}, 6, skipped=1)
    assert failed == ["x", "0.01", "-", "failed", "-", "-"]
    text = job_table(["a title"], ["optimizer", "lr"], [["adamw", "0.001"]], ["a remark"], "some notes")
    assert text.splitlines() == [
        "a title",
        "",
        "| optimizer |    lr |",
        "|:----------|------:|",
        "| adamw     | 0.001 |",
        "",
        "a remark",
        "",
        "some notes",
    ]
    swept = _result("adamw", lr_sweep=[{"lr": 0.001, "heldout_loss": 0.25}, {"lr": 0.002, "heldout_loss": None}])
    assert sweep_edge_listing(swept, " (try --lr)").endswith(
        "(0.001: 0.2500, 0.002: -); the optimum may lie outside it (try --lr)"
    )
