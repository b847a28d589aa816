"""``coap-bench finetune`` end to end on the micro preset: the cached base model, the second corpus, LoRA at
COAP's bytes, the table, failures and exact resume."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from coap_bench.cli import build_parser, main
from coap_bench.finetune import (
    DEFAULT_FINETUNE_OPTIMIZERS,
    FinetuneConfig,
    default_cache_dir,
    lora_targets,
    matched_lora_rank,
    package_docs_corpus,
)
from coap_bench.finetune.corpus import tokenize_corpus
from coap_bench.finetune.lora import apply_lora, lora_bytes_per_rank
from coap_bench.finetune.pretrained import CACHE_ENV, INFO_FILE, load_causal_lm, load_tokenizer
from coap_bench.text import is_heldout

_QUICK = ["--preset", "micro", "--threads", "1", "--no-progress", "--in-process"]


def _run(tmp_path: Path, cache: Path, *extra: str, name: str = "r.json") -> dict:
    path = tmp_path / name
    assert main(["finetune", *_QUICK, "--cache-dir", str(cache), "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, dict]:
    """A cache filled by a first run of AdamW, CoapAdamW and LoRA (the base model pretrained there)."""
    folder = tmp_path_factory.mktemp("finetune")
    cache = folder / "cache"
    run = _run(folder, cache, "--optimizers", "adamw,coap_adamw,lora", "--plots", str(folder / "plots"))
    return cache, run


def test_methods_start_from_the_base_model_and_lora_matches_coap_bytes(first, capsys):
    cache, run = first
    base = run["base_model"]
    assert base["default"] and not base["from_cache"] and base["key"]["preset"] == "micro"
    folder = Path(base["path"])
    assert folder.parent == cache and base["digest"][:16] in folder.name
    for name in ("config.json", "model.safetensors", "tokenizer.json", INFO_FILE):
        assert (folder / name).is_file(), name
    assert not [p for p in cache.iterdir() if p.name.startswith(".") or p.suffix == ".pt"]  # no temporaries left
    results = {r["name"]: r for r in run["results"]}
    assert list(results) == ["adamw", "coap_adamw", "lora"]
    for result in results.values():
        assert not result["failed"], result.get("error")
        for key in ("heldout_loss", "final_loss", "iteration_ms", "state_bytes", "tokens_per_s"):
            assert math.isfinite(result[key]), (result["name"], key)
        assert result["completed"] and len(result["loss_curve"]) == run["config"]["steps"]
    adamw, coap, lora = results["adamw"], results["coap_adamw"], results["lora"]
    # Same weights and batches: LoRA's B starts at zero, so all three start from the same loss.
    assert adamw["loss_curve"][0] == coap["loss_curve"][0] == lora["loss_curve"][0]
    # Full fine-tuning trains every parameter; LoRA its adapters only, with AdamW's two moments each.
    assert adamw["trainable_parameters"] == coap["trainable_parameters"] == base["parameters"]
    assert lora["trainable_parameters"] < adamw["trainable_parameters"] / 2
    assert lora["adapter_bytes"] == 4 * lora["trainable_parameters"]
    assert lora["state_bytes"] == 2 * lora["adapter_bytes"] and adamw["adapter_bytes"] == 0
    # LoRA's rank puts its adapter + state within half a rank's bytes of CoapAdamW's state.
    plan = run["lora"]
    assert plan["matched"] and lora["lora_rank"] == plan["rank"] and plan["alpha"] == 2 * plan["rank"]
    assert lora["state_plus_adapter_bytes"] == plan["rank"] * plan["bytes_per_rank"]
    assert coap["state_bytes"] == plan["coap_state_bytes"]  # the shape estimate is the measured state
    assert abs(lora["state_plus_adapter_bytes"] - coap["state_bytes"]) <= plan["bytes_per_rank"] / 2
    assert coap["state_ratio_to_adamw"] < 0.5 and lora["memory_ratio_to_adamw"] < 0.5
    # The preset's lr of each family.
    assert run["config"]["lrs"] == {"adamw": 1e-3, "coap_adamw": 2e-3, "lora": 3e-3}
    # The reference: the base model's held-out loss, which fine-tuning lowers.
    assert math.isfinite(base["heldout_loss"]) and adamw["heldout_loss"] < base["heldout_loss"]
    targets = run["targets"]
    assert targets["coap_matches_lora_at_equal_bytes"]["met"] == (coap["heldout_loss"] <= lora["heldout_loss"])
    # The corpus: numpy's docstrings, hashed, with numpy's version.
    data = run["data"]
    assert data["corpus_name"] == "package-docs:numpy" and len(data["corpus_sha256"]) == 64
    assert data["packages"]["numpy"] and data["train_tokens"] > data["heldout_tokens"] > 0
    assert run["argv"][:2] == ["coap-bench", "finetune"]


def test_the_table_shows_memory_the_reference_and_the_targets(first, tmp_path, capsys):
    cache, _ = first
    _run(tmp_path, cache, "--optimizers", "adamw,lora")
    out = capsys.readouterr().out
    words = " ".join(out.split())  # the lines above and below the table are wrapped
    assert "| lora" in out and "state+adapter" in out and "vs base" in out
    assert "reference: the base model before fine-tuning: held-out loss" in words
    assert "LoRA rank" in words and "matched to CoapAdamW's state" in words


def test_a_second_run_uses_the_cache_and_other_settings_get_their_own_entry(first, tmp_path, capsys):
    cache, run = first
    again = _run(tmp_path, cache, "--optimizers", "adamw")
    assert again["base_model"]["from_cache"] and again["base_model"]["path"] == run["base_model"]["path"]
    assert again["base_model"]["heldout_loss"] == run["base_model"]["heldout_loss"]
    assert "pretraining the base model" not in capsys.readouterr().err
    # Another pretraining length is another model: never the cached one.
    longer = _run(tmp_path, cache, "--optimizers", "adamw", "--pretrain-steps", "7", name="longer.json")
    assert not longer["base_model"]["from_cache"] and longer["base_model"]["key"]["steps"] == 7
    assert longer["base_model"]["path"] != run["base_model"]["path"]
    assert longer["base_model"]["heldout_loss"] != run["base_model"]["heldout_loss"]
    assert "pretraining the base model" in capsys.readouterr().err


def test_a_cache_entry_of_another_key_is_rebuilt_and_stale_exports_removed(first, tmp_path):
    _, run = first
    copy = tmp_path / "cache"
    entry = Path(run["base_model"]["path"])
    (copy / entry.name).mkdir(parents=True)
    for file in entry.iterdir():
        (copy / entry.name / file.name).write_bytes(file.read_bytes())
    info = json.loads((copy / entry.name / INFO_FILE).read_text())
    info["key"]["steps"] = -1  # as if made by other settings
    (copy / entry.name / INFO_FILE).write_text(json.dumps(info))
    stale = copy / f".{entry.name}.abcd1234.tmp"
    stale.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    rebuilt = _run(tmp_path, copy, "--optimizers", "adamw")
    assert not rebuilt["base_model"]["from_cache"] and rebuilt["base_model"]["path"] == str(copy / entry.name)
    assert json.loads((copy / entry.name / INFO_FILE).read_text())["key"] == run["base_model"]["key"]
    assert not stale.exists()
    # The same key gives the same weights: the same reference loss.
    assert rebuilt["base_model"]["heldout_loss"] == run["base_model"]["heldout_loss"]


def test_any_local_model_folder_by_flag(first, tmp_path):
    _, run = first
    given = _run(tmp_path, tmp_path / "unused", "--optimizers", "adamw", "--model", run["base_model"]["path"])
    assert not given["base_model"]["default"] and given["base_model"]["key"] is None
    assert given["base_model"]["heldout_loss"] == run["base_model"]["heldout_loss"]
    assert given["results"][0]["heldout_loss"] == run["results"][0]["heldout_loss"]
    assert not (tmp_path / "unused").exists()  # nothing pretrained or cached


def test_a_missing_peft_is_a_failed_lora_row(first, tmp_path, monkeypatch, capsys):
    cache, _ = first
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails, as when it is not installed
    run = _run(tmp_path, cache, "--optimizers", "adamw,lora")
    results = {r["name"]: r for r in run["results"]}
    assert results["lora"]["failed"] and "peft" in results["lora"]["error"] and not results["adamw"]["failed"]
    assert "failed: lora:" in capsys.readouterr().out


def test_resumed_runs_end_with_the_same_numbers(first, tmp_path):
    cache, _ = first
    common = ["--steps", "8", "--checkpoint-every", "4", "--warmup-steps", "2", "--optimizers", "coap_adamw,lora"]
    common += ["--update-interval", "2"]  # refreshes before and after the checkpoint
    whole = _run(tmp_path, cache, *common, name="whole.json")
    part = _run(tmp_path, cache, *common, "--checkpoint-dir", str(tmp_path / "c"), "--stop-after", "6", name="p.json")
    assert all(not r["completed"] and r["steps_done"] == 6 for r in part["results"])
    resumed = _run(tmp_path, cache, *common, "--checkpoint-dir", str(tmp_path / "c"), name="resumed.json")
    for a, b in zip(whole["results"], resumed["results"], strict=True):
        assert not b["failed"] and b["resumed_from_step"] == 4, b.get("error")
        assert a["loss_curve"] == b["loss_curve"], a["name"]
        assert a["heldout_loss"] == b["heldout_loss"], a["name"]


def test_lr_sweep_and_seeds(first, tmp_path):
    cache, _ = first
    run = _run(tmp_path, cache, "--optimizers", "lora", "--lr-sweep", "--seeds", "2", "--steps", "3")
    (lora,) = run["results"]
    assert [s["lr"] for s in lora["lr_sweep"]] == pytest.approx([1.5e-3, 3e-3, 6e-3])
    assert lora["heldout_loss"] == min(s["heldout_loss"] for s in lora["lr_sweep"])
    assert lora["seeds"] == [0, 1] and len(lora["heldout_loss_per_seed"]) == 2
    # The seed draws LoRA's A and the batches: the two seeds train differently.
    assert lora["heldout_loss_per_seed"][0] != lora["heldout_loss_per_seed"][1]


def test_the_package_corpus_is_deterministic_and_split_by_document(first):
    _, run = first
    a, b = package_docs_corpus(["numpy"], max_documents=40), package_docs_corpus(["numpy"], max_documents=40)
    assert a.sha256 == b.sha256 == run["data"]["corpus_sha256"]
    ids = [doc.id for doc in a.documents]
    assert ids == sorted(ids) and all(i.startswith("module:numpy.") for i in ids)
    tokenizer = load_tokenizer(run["base_model"]["path"])
    data = tokenize_corpus(a, tokenizer)
    heldout = [doc for doc in a.documents if is_heldout(doc.id)]
    assert data.heldout_documents == len(heldout) > 0 and data.train_documents == len(a) - len(heldout)
    assert data.train_sha256 == run["data"]["train_sha256"]
    eos = tokenizer.eos_token_id
    assert int((data.heldout == eos).sum()) == len(heldout) - 1  # documents joined by end-of-text


def test_lora_bytes_per_rank_is_what_peft_builds(first):
    _, run = first
    model = load_causal_lm(run["base_model"]["path"])
    targets = lora_targets(model)
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    per_rank = lora_bytes_per_rank(targets)
    adapted = apply_lora(model, 3, 6.0, targets, seed=0)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert 3 * per_rank == 12 * trainable  # 4 bytes of weight and 8 of AdamW state per adapter value
    assert matched_lora_rank(5 * per_rank + per_rank // 3, targets) == 5
    assert matched_lora_rank(1, targets) == 1


def test_options_and_errors(monkeypatch, tmp_path, capsys):
    args = build_parser().parse_args(["finetune"])
    assert (args.preset, args.optimizers) == ("small", list(DEFAULT_FINETUNE_OPTIMIZERS))
    assert {"adamw", "adamw8bit", "galore_adamw", "coap_adamw", "lora"} == set(DEFAULT_FINETUNE_OPTIMIZERS)
    config = FinetuneConfig().resolved()
    settings = config.settings()
    assert (settings.rank_ratio, settings.update_interval, settings.reproject_factor) == (4.0, 32, 1)
    assert settings.proj_gap == 32  # GaLore refreshes as often as COAP
    # One lr per family: dense, low-rank, LoRA; --lr sets every method's.
    assert config.lr_for("adamw8bit") == config.lr_for("adamw") < config.lr_for("coap_adamw")
    assert config.lr_for("galore_adamw") == config.lr_for("coap_adamw") < config.lr_for("lora")
    assert {FinetuneConfig(lr=0.5).lr_for(name) for name in DEFAULT_FINETUNE_OPTIMIZERS} == {0.5}
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--optimizers", "adamw,nope"])
    assert exit_info.value.code == 2 and "unknown optimizer 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--preset", "llava"])
    assert exit_info.value.code == 2 and "add --model PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--preset", "micro", "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "not a folder" in capsys.readouterr().err


def test_each_run_gets_its_own_process_by_default(first, tmp_path):
    cache, _ = first
    path = tmp_path / "r.json"
    args = ["finetune", "--preset", "micro", "--threads", "1", "--no-progress", "--cache-dir", str(cache)]
    assert main([*args, "--steps", "2", "--optimizers", "galore_adamw,lora", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    for result in results:
        assert not result["failed"], result.get("error")
        assert result["process_id"] != os.getpid()
        assert result["rss_before_model_bytes"] <= result["peak_memory_bytes"]
