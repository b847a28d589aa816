"""``coap-bench loss-scale``: mean- and sum-reduced runs of each optimizer, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from coap_bench.cli import main


def test_a_short_run_writes_both_reductions_per_optimizer(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "l.json"

    assert (
        main(
            [
                "loss-scale",
                "--steps",
                "4",
                "--batch",
                "32",
                "--optimizers",
                "adamw,coap_adamw",
                "--faithful",
                "--json",
                str(path),
            ]
        )
        == 0
    )

    assert torch.get_num_threads() == threads  # the thread setting is restored
    out = capsys.readouterr().out
    assert "Held-out loss, mean- vs sum-reduced training (4 steps, batch 32, target scale 30)" in out
    run = json.loads(path.read_text())
    assert run["meta"]["steps"] == 4 and run["meta"]["batch"] == 32
    rows = [(r["optimizer"], r["variant"]) for r in run["results"]]
    assert rows == [("adamw", "default"), ("coap_adamw", "default"), ("coap_adamw", "faithful")]
    adamw = run["results"][0]
    assert adamw["heldout_ratio_sum_to_mean"] == pytest.approx(1.0, abs=1e-3)  # AdamW ignores the gradient's scale
    for result in run["results"]:
        assert (
            set(result["mean"])
            == set(result["sum"])
            == {"heldout_loss", "largest_weight_change", "largest_defect", "first_grad_rms"}
        )


def test_an_unknown_optimizer_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["loss-scale", "--optimizers", "adamw,sgd", "--json", str(tmp_path / "l.json")])
    assert exit_info.value.code == 2
    assert "coap-bench: error: unknown --optimizers ['sgd']" in capsys.readouterr().err
