"""Smoke test of ``coap-bench step``: ``--quick`` runs end to end and writes its JSON."""

from __future__ import annotations

import argparse
import json
import math

import torch

from coap_bench.cli import main
from coap_bench.step import formulas
from coap_bench.step.settings import QUICK_REFRESH_SHAPE, QUICK_SHAPES

OPTIMIZERS = ("CoapAdamW", "CoapAdamW8bit", "CoapAdafactor", "CoapAdafactor8bit")


def _q(k: int) -> int:
    """Bytes of an 8-bit moment of k entries (uint8 codes + fp32 absmax per 256), fp32 below 4096."""
    return k + 4 * math.ceil(k / 256) if k >= 4096 else 4 * k


def _expected_bytes(name: str, shape, r: int) -> int:
    """The closed forms (docs/memory.md) of the matrix (m, n) the optimizer works on (P (n, r), moments (m, r)),
    written out independently of the benchmark's."""
    m, n = shape
    return {
        "CoapAdamW": 4 * (2 * m * r + n * r),
        "CoapAdamW8bit": 4 * n * r + 2 * _q(m * r),
        "CoapAdafactor": 4 * (n * r + m * r + m + r),
        "CoapAdafactor8bit": 4 * n * r + _q(m * r) + _q(m) + _q(r),
    }[name]


def test_quick_run_writes_json_with_state_bytes_equal_to_formula(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "b.json"

    assert main(["step", "--quick", "--json", str(path)]) == 0

    assert torch.get_num_threads() == threads  # the thread setting is restored
    out = capsys.readouterr().out
    for title in (
        "1. Optimizer-state bytes",
        "2a. Step time",
        "2b. Step time ratios",
        "2c. Step time of the four COAP optimizers",
        "3. Refresh cost",
    ):
        assert title in out

    run = json.loads(path.read_text())
    assert {"meta", "state_bytes", "step_time", "refresh", "summary"} <= set(run)
    assert run["meta"]["quick"] is True
    shapes = [tuple(s) for s in run["meta"]["shapes"]]
    assert shapes == [tuple(s) for s in QUICK_SHAPES]

    # Section 1: measured state bytes equal the closed form, and AdamW's 8 m n.
    assert [tuple(r["shape"]) for r in run["state_bytes"]] == shapes
    for row in run["state_bytes"]:
        # The library's default puts P on the smaller side (the paper): the optimizer works on
        # the (max, min) orientation, P (min, r) and moments (max, r).
        out, inp = row["shape"]
        transposed = out < inp
        m, n = (inp, out) if transposed else (out, inp)
        r = row["rank"]
        assert row["projection_side"] is None and row["transposed"] is transposed
        assert row["proj_shape"] == [n, r] and row["moment_shape"] == [m, r]
        assert row["coap_formula_bytes"] == 4 * (2 * m * r + n * r)
        assert row["coap_measured_bytes"] == row["coap_formula_bytes"]
        assert row["adamw_measured_bytes"] == row["adamw_formula_bytes"] == 8 * m * n
        assert row["target_state_bytes_equal_formula"] is True
        # ... and so do the other three COAP optimizers', exactly.
        assert tuple(row["optimizers"]) == OPTIMIZERS
        for name, o in row["optimizers"].items():
            assert o["transposed"] is transposed and o["worked_on_shape"] == [m, n]
            assert o["formula_bytes"] == _expected_bytes(name, (m, n), r) == formulas.FORMULAS[name]((m, n), r)
            assert o["measured_bytes"] == o["formula_bytes"], name
            assert o["minus_formula_bytes"] == 0
            assert o["equal_formula"] is True
            assert o["over_adamw"] == o["measured_bytes"] / row["adamw_measured_bytes"]
        assert row["optimizers"]["CoapAdamW"]["measured_bytes"] == row["coap_measured_bytes"]
        for eight, twin in (("CoapAdamW8bit", "CoapAdamW"), ("CoapAdafactor8bit", "CoapAdafactor")):
            o = row["optimizers"][eight]
            assert 0 < o["over_32bit"] < 1
            assert o["over_32bit"] == o["measured_bytes"] / row["optimizers"][twin]["measured_bytes"]
    assert run["summary"]["state_bytes_equal_formula"] is True

    # Section 2: every timing and ratio is there and positive; the amortised time is the stated mix.
    ms_keys = {
        "coap_steady",
        "coap_eq2_refresh",
        "coap_svd_refresh",
        "coap_amortised",
        "adamw_foreach_false",
        "adamw_foreach_true",
        "floor",
        "floor_matmuls",
        "floor_adam_elementwise",
    }
    ratio_keys = {
        "steady_over_floor",
        "amortised_over_floor",
        "steady_over_adamw_foreach_false",
        "steady_over_adamw_foreach_true",
        "amortised_over_adamw_foreach_false",
        "amortised_over_adamw_foreach_true",
    }
    for row in run["step_time"]:
        assert ms_keys <= set(row["ms"])
        assert ratio_keys <= set(row["ratios"])
        assert all(row["ms"][k] > 0 for k in ms_keys)
        assert all(row["ratios"][k] > 0 for k in ratio_keys)
        assert set(row["targets"]) == {
            "steady_le_1.25x_floor",
            "amortised_le_1.5x_floor",
            "CoapAdamW8bit_amortised_le_1.5x_CoapAdamW",
            "CoapAdafactor8bit_amortised_le_1.5x_CoapAdafactor",
        }
        ms = row["ms"]
        expected = (155 * ms["coap_steady"] + 4 * ms["coap_eq2_refresh"] + ms["coap_svd_refresh"]) / 160
        assert abs(ms["coap_amortised"] - expected) <= 1e-9 * expected
        # The four COAP optimizers: step kinds, the amortised mix, ratios to the matmul floor.
        assert tuple(row["optimizers"]) == OPTIMIZERS
        for name, o in row["optimizers"].items():
            oms = o["ms"]
            assert all(oms[k] > 0 for k in ("steady", "eq2_refresh", "svd_refresh", "amortised", "amortised_from_min"))
            expected = (155 * oms["steady"] + 4 * oms["eq2_refresh"] + oms["svd_refresh"]) / 160
            assert abs(oms["amortised"] - expected) <= 1e-9 * expected
            assert o["ratios"]["amortised_over_floor_matmuls"] == oms["amortised"] / ms["floor_matmuls"]
            assert all(v > 0 for v in o["ratios"].values())
            assert all(v > 0 for v in o["ratios_from_min"].values())
        assert row["optimizers"]["CoapAdamW"]["ms"]["steady"] == ms["coap_steady"]
        assert set(row["eight_bit_over_32bit"]) == {"CoapAdamW8bit", "CoapAdafactor8bit"}
        for eight, e in row["eight_bit_over_32bit"].items():
            twin = e["over"]
            assert (
                e["amortised"]
                == row["optimizers"][eight]["ms"]["amortised"] / row["optimizers"][twin]["ms"]["amortised"]
            )
            assert e["steady"] > 0 and e["amortised_from_min"] > 0
            assert e["target"] is (e["amortised"] <= 1.5)

    # Section 3: refresh costs against the full SVD and the autograd reference.
    refresh = run["refresh"]
    assert tuple(refresh["shape"]) == tuple(QUICK_REFRESH_SHAPE)
    assert {"full_svd", "correlation_aware_step", "low_cost_svd_warm", "autograd_eq2_step"} <= set(refresh["ms"])
    assert {
        "correlation_aware_step_over_full_svd",
        "low_cost_svd_over_full_svd",
        "correlation_aware_step_over_autograd",
    } <= set(refresh["ratios"])
    assert refresh["closed_form_vs_autograd_step_rel_err"] < 1e-3
    for key in (
        "steady_le_1.25x_floor",
        "amortised_le_1.5x_floor",
        "correlation_aware_step_le_0.1x_full_svd",
        "low_cost_svd_le_0.1x_full_svd",
        "closed_form_faster_than_autograd",
        "CoapAdamW8bit_amortised_le_1.5x_CoapAdamW",
        "CoapAdafactor8bit_amortised_le_1.5x_CoapAdafactor",
    ):
        assert isinstance(run["summary"][key], bool)


def test_state_bytes_formulas_quantize_large_accumulators():
    """With min_8bit_size=4096, a 1-D accumulator of >= 4096 entries is 8-bit too: the row
    accumulator (4608,) of CoapAdafactor8bit here (the quick shapes never reach that size)."""
    shape, rank = (4608, 256), 64
    args = argparse.Namespace(rank=rank, update_interval=32, reproject_factor=5)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator) * 0.02
    grad = torch.randn(shape, generator=generator)
    for name in OPTIMIZERS:
        param, opt, row = formulas.measure_state_bytes(name, shape, args, weight, grad)
        assert row["measured_bytes"] == row["formula_bytes"] == _expected_bytes(name, shape, rank), name
    state = opt.state[param]  # CoapAdafactor8bit
    assert state["exp_avg_sq_row_codes"].dtype == torch.uint8 and state["exp_avg_sq_row_codes"].shape == (4608,)
    assert state["exp_avg_sq_col"].dtype == torch.float32  # (64,): below min_8bit_size
    assert (
        formulas.coap_adafactor8bit_bytes(shape, rank)
        == 4 * 256 * 64 + (4608 * 64 + 4 * 1152) + (4608 + 4 * 18) + 4 * 64
    )


def test_projection_side_smaller_moves_p_and_the_formula_follows(tmp_path):
    """With ``--projection-side smaller`` (the paper's layout) a wide (m < n) weight is worked on as
    its transpose: P (m, r), moments (n, r); the closed forms and the floor follow the optimizer."""
    path = tmp_path / "b.json"
    argv = ["step", "--quick", "--shapes", "256x512", "--rank", "64", "--skip-refresh", "--repeats", "1"]
    assert main([*argv, "--projection-side", "smaller", "--json", str(path)]) == 0

    run = json.loads(path.read_text())
    assert run["meta"]["projection_side"] == "smaller"
    (row,) = run["state_bytes"]
    assert row["transposed"] is True and run["step_time"][0]["transposed"] is True
    assert row["proj_shape"] == [256, 64] and row["moment_shape"] == [512, 64]
    assert row["coap_formula_bytes"] == row["coap_measured_bytes"] == 4 * (2 * 512 * 64 + 256 * 64)
    for name, o in row["optimizers"].items():
        assert o["worked_on_shape"] == [512, 256]
        assert o["measured_bytes"] == o["formula_bytes"] == _expected_bytes(name, (512, 256), 64), name
    assert run["summary"]["state_bytes_equal_formula"] is True


def test_state_dtype_bf16_halves_the_float_state_and_the_formula_follows(tmp_path):
    """With ``--state-dtype bf16`` P and every moment not stored 8-bit take 2 bytes a value (the 8-bit
    codes and their float32 absmax are unchanged); the closed forms follow, to the byte."""
    path = tmp_path / "b.json"
    argv = ["step", "--quick", "--shapes", "512x1024", "--rank", "64", "--skip-refresh", "--repeats", "1"]
    assert main([*argv, "--state-dtype", "bf16", "--json", str(path)]) == 0

    run = json.loads(path.read_text())
    assert run["meta"]["state_dtype"] == "bf16" and run["meta"]["formulas"]["CoapAdamW"] == "2*(2*m*r + n*r)"
    (row,) = run["state_bytes"]
    m, n, r = 1024, 512, 64  # P on the smaller side: the optimizer works on the transpose
    assert row["state_dtype"] == "bf16" and row["state_element_size"] == 2
    q = m * r + 4 * math.ceil(m * r / 256)  # an 8-bit (m, r) moment
    expected = {
        "CoapAdamW": 2 * (2 * m * r + n * r),
        "CoapAdamW8bit": 2 * n * r + 2 * q,
        "CoapAdafactor": 2 * (n * r + m * r + m + r),
        "CoapAdafactor8bit": 2 * n * r + q + 2 * m + 2 * r,  # (m,) and (r,) below min_8bit_size: bf16
    }
    for name, o in row["optimizers"].items():
        assert o["worked_on_shape"] == [m, n]
        assert o["measured_bytes"] == o["formula_bytes"] == expected[name], name
        assert all(dtype in ("bfloat16", "uint8", "float32") for _, dtype in o["state_shapes"].values())
        assert o["state_shapes"]["proj"][1] == "bfloat16"
    assert row["coap_measured_bytes"] * 2 == 4 * (2 * m * r + n * r)  # half CoapAdamW's float32 state
    assert run["summary"]["state_bytes_equal_formula"] is True
