"""``coap-bench quantization``: the codecs compared end to end on a small moment, its tables and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from coap_bench.cli import main


def test_quick_run_writes_every_backend_and_our_codec_within_its_bound(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "q.json"

    assert main(["quantization", "--quick", "--json", str(path)]) == 0

    assert torch.get_num_threads() == threads  # the thread setting is restored
    out = capsys.readouterr().out
    for title in ("1. Time of quantize + dequantize", "2. Round-trip error", "3. Dependency"):
        assert title in out
    assert "trust_remote_code" not in out  # what a peer prints when imported is a note, never its advice
    run = json.loads(path.read_text())
    assert run["meta"]["quick"] is True and run["meta"]["shape"] == [512, 128]
    backends = run["backends"]
    assert {"ours", "ours, sqrt-stored", "bitsandbytes", "torchao (eager)"} <= set(backends)
    ours = backends["ours"]
    assert ours["available"] and set(ours["timing"]) == set(ours["errors"]) == {"signed", "unsigned"}
    assert ours["timing"]["signed"]["roundtrip_over_ours"] == 1.0
    # Our codec's bound: the largest error in a block is 0.9/128 (signed) and 0.9/256 (unsigned) of its absmax.
    assert ours["errors"]["signed"]["max_block_err_over_block_absmax"] <= 0.9 / 128
    assert ours["errors"]["unsigned"]["max_block_err_over_block_absmax"] <= 0.9 / 256
    assert ours["errors"]["signed"]["not_nearest_code_fraction"] == 0.0
    for name, backend in backends.items():
        assert backend["available"] or backend["error"], name


def test_bad_options_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantization", "--quick", "--threads", "0", "--json", str(tmp_path / "q.json")])
    assert exit_info.value.code == 2
    assert "coap-bench: error: --repeats and --threads must be >= 1" in capsys.readouterr().err
