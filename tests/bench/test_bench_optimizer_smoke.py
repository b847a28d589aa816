"""Smoke test of benchmarks/bench_optimizer.py: ``--quick`` runs end to end and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_optimizer.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_with_state_bytes_equal_to_formula(tmp_path, capsys):
    bench = _load_bench()
    threads = torch.get_num_threads()
    path = tmp_path / "b.json"

    assert bench.main(["--quick", "--json", str(path)]) == 0

    assert torch.get_num_threads() == threads  # the thread setting is restored
    out = capsys.readouterr().out
    for title in ("1. Optimizer-state bytes", "2a. Step time", "2b. Step time ratios", "3. Refresh cost"):
        assert title in out

    run = json.loads(path.read_text())
    assert {"meta", "state_bytes", "step_time", "refresh", "summary"} <= set(run)
    assert run["meta"]["quick"] is True
    shapes = [tuple(s) for s in run["meta"]["shapes"]]
    assert shapes == [tuple(s) for s in bench.QUICK_SHAPES]

    # Section 1: measured state bytes equal the closed form, and AdamW's 8 m n.
    assert [tuple(r["shape"]) for r in run["state_bytes"]] == shapes
    for row in run["state_bytes"]:
        m, n = row["shape"]
        r = row["rank"]
        assert row["coap_formula_bytes"] == 4 * (2 * max(m, n) * r + min(m, n) * r)
        assert row["coap_measured_bytes"] == row["coap_formula_bytes"]
        assert row["adamw_measured_bytes"] == row["adamw_formula_bytes"] == 8 * m * n
        assert row["target_state_bytes_equal_formula"] is True
    assert run["summary"]["state_bytes_equal_formula"] is True

    # Section 2: every timing and ratio is there and positive; the amortised time is the stated mix.
    ms_keys = {"coap_steady", "coap_eq2_refresh", "coap_svd_refresh", "coap_amortised", "adamw_foreach_false",
               "adamw_foreach_true", "floor", "floor_matmuls", "floor_adam_elementwise"}
    ratio_keys = {"steady_over_floor", "amortised_over_floor", "steady_over_adamw_foreach_false",
                  "steady_over_adamw_foreach_true", "amortised_over_adamw_foreach_false",
                  "amortised_over_adamw_foreach_true"}
    for row in run["step_time"]:
        assert ms_keys <= set(row["ms"])
        assert ratio_keys <= set(row["ratios"])
        assert all(row["ms"][k] > 0 for k in ms_keys)
        assert all(row["ratios"][k] > 0 for k in ratio_keys)
        assert set(row["targets"]) == {"steady_le_1.25x_floor", "amortised_le_1.5x_floor"}
        ms = row["ms"]
        expected = (155 * ms["coap_steady"] + 4 * ms["coap_eq2_refresh"] + ms["coap_svd_refresh"]) / 160
        assert abs(ms["coap_amortised"] - expected) <= 1e-9 * expected

    # Section 3: refresh costs against the full SVD and the autograd reference.
    refresh = run["refresh"]
    assert tuple(refresh["shape"]) == tuple(bench.QUICK_REFRESH_SHAPE)
    assert {"full_svd", "correlation_aware_step", "low_cost_svd_warm", "autograd_eq2_step"} <= set(refresh["ms"])
    assert {"correlation_aware_step_over_full_svd", "low_cost_svd_over_full_svd",
            "correlation_aware_step_over_autograd"} <= set(refresh["ratios"])
    assert refresh["closed_form_vs_autograd_step_rel_err"] < 1e-3
    for key in ("steady_le_1.25x_floor", "amortised_le_1.5x_floor", "correlation_aware_step_le_0.1x_full_svd",
                "low_cost_svd_le_0.1x_full_svd", "closed_form_faster_than_autograd"):
        assert isinstance(run["summary"][key], bool)
