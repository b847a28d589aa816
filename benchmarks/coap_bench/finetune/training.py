"""Fine-tuning the base model once per method and lr and seed (:func:`run_finetune`), each run scored on the
held-out windows of the fine-tuning corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch.utils import estimate_state_bytes, state_nbytes_by_kind

from .._quiet import gather_import_notes
from ..environment import hardware, package_version, torch_threads, versions
from ..llama import evaluate_heldout, token_measurements, train_causal_lm
from ..text import heldout_windows
from ..training import in_torch_threads, job_settings, result_row, run_optimizers, start_measuring
from .corpus import FinetuneData, load_finetune_corpus, tokenize_corpus
from .lora import adapter_nbytes, apply_lora, lora_bytes_per_rank, lora_targets, matched_lora_rank
from .presets import FINETUNE_PRESETS, METHODS, MODEL_DTYPES, FinetuneConfig
from .pretrained import BaseModel, cached_base_model, load_causal_lm, load_tokenizer, meta_causal_lm

__all__ = ["LoraPlan", "evaluate_base", "judge_targets", "run_finetune", "train_one"]

_CHECKPOINT_FORMAT = 1
#: Measurements listed for every lr of a sweep.
_SWEEP_KEYS = ("lr", "heldout_loss", "final_loss", "first_nonfinite_step", "error")
#: Held-out windows per forward pass of an evaluation.
_EVAL_BATCH = 32


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """LoRA's rank and alpha, and how the rank was chosen: ``coap_state_bytes`` is CoapAdamW's state at
    the run's settings (estimated from the shapes), ``bytes_per_rank`` LoRA's adapter plus AdamW state
    per unit of rank; ``matched`` when the rank was picked to make the two equal."""

    rank: int
    alpha: float
    matched: bool
    coap_state_bytes: int
    bytes_per_rank: int
    targets: int

    def describe(self) -> dict[str, Any]:
        planned = self.rank * self.bytes_per_rank
        return {**dataclasses.asdict(self), "planned_adapter_and_state_bytes": planned}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _fingerprint_keys(name: str, config: FinetuneConfig, base: BaseModel, lora: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be continued besides :func:`~coap_bench.llama.train_causal_lm`'s keys."""
    return {
        "dtype": config.dtype,
        "base_model": base.digest or str(Path(base.path).resolve()),
        "lora": dataclasses.asdict(lora) if name == "lora" and lora is not None else None,
    }


@in_torch_threads
def train_one(
    name: str,
    lr: float,
    config: FinetuneConfig,
    data: FinetuneData,
    windows: Tensor,
    base: BaseModel,
    lora: LoraPlan | None,
    checkpoint: Path | None,
) -> dict[str, Any]:
    """Fine-tune the base model (or continue ``checkpoint``) with method ``name`` at peak ``lr``."""
    spec = METHODS[name]
    device = torch.device(config.device)
    baseline_rss = start_measuring(device)
    # On the CPU first, so that LoRA's A is drawn there whatever the device.
    model = load_causal_lm(base.path, dtype=MODEL_DTYPES[config.dtype])
    if name == "lora":
        spec.import_modules()
        model = apply_lora(model, lora.rank, lora.alpha, lora_targets(model), seed=config.seed)
    model.to(device).train()
    trainable = _trainable(model)
    optimizer = spec.build(trainable, [], lr, config.settings())  # every matrix offered; each method decides
    keys = _fingerprint_keys(name, config, base, lora)
    loop, workarounds = train_causal_lm(
        name, lr, config, spec, model, optimizer, data, checkpoint, _CHECKPOINT_FORMAT, **keys
    )
    measured = token_measurements(loop, spec, config, evaluate_heldout(model, windows, _EVAL_BATCH))
    adapter = adapter_nbytes(model) if name == "lora" else 0
    return result_row(
        name,
        spec,
        lr,
        **measured,
        state_bytes_by_kind=state_nbytes_by_kind(optimizer),
        adapter_bytes=adapter,
        state_plus_adapter_bytes=measured["state_bytes"] + adapter,
        trainable_parameters=sum(p.numel() for p in trainable),
        lora_rank=lora.rank if name == "lora" else None,
        rss_before_model_bytes=baseline_rss if device.type == "cpu" else None,
        workarounds=workarounds,
    )


def evaluate_base(base: BaseModel, windows: Tensor, device: str, dtype: str = "float32") -> float:
    """The base model's held-out loss on the fine-tuning corpus: the reference every method starts from."""
    model = load_causal_lm(base.path, device, MODEL_DTYPES[dtype])
    loss = evaluate_heldout(model, windows, _EVAL_BATCH)
    del model
    return loss


def _base_model(config: FinetuneConfig) -> BaseModel:
    if config.model is not None:
        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--model {config.model}: not a folder (give a local Hugging Face model folder)")
        return BaseModel(str(path.resolve()), False)
    preset = FINETUNE_PRESETS[config.preset]
    return cached_base_model(
        preset=preset.base_preset,
        steps=config.pretrain_steps,
        vocab_size=preset.vocab_size,
        max_documents=preset.pretrain_documents,
        seed=0,  # one base model for every --seed: the seeds vary the fine-tuning
        device=config.device,
        cache_dir=config.cache_dir,
        progress=config.progress,
    )


def _lora_plan(config: FinetuneConfig, base: BaseModel) -> LoraPlan:
    """LoRA's rank: ``config.lora_rank``, or the one whose adapter plus AdamW state matches CoapAdamW's state."""
    settings = config.settings()
    model = meta_causal_lm(base.path)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    coap = int(
        estimate_state_bytes(
            [{"params": named, **settings.coap_options()}], "coap_adamw", lr=1e-3, **settings.state_options()
        )
    )
    targets = lora_targets(model)
    per_rank = lora_bytes_per_rank(targets)
    rank = config.lora_rank or matched_lora_rank(coap, targets)
    alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
    return LoraPlan(rank, alpha, config.lora_rank is None, coap, per_rank, len(targets))


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune once per method of ``config``; return ``{"config", "data", "base_model", "lora", "versions",
    "hardware", "argv", "results", "import_notes"}``.

    With ``lr_sweep``, each method runs at its lr times :data:`~coap_bench.training.LR_SWEEP_FACTORS` and
    the run with the lowest held-out loss is kept; with ``seeds`` > 1 each lr is run with every seed and
    averaged. A run that raises (or whose process dies) is a result with ``failed: True``.
    """
    config = config.resolved()
    with torch_threads(config.threads):
        return _run_finetune(config)


def _run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    base = _base_model(config)
    tokenizer = load_tokenizer(base.path)
    corpus, packages = load_finetune_corpus(config.corpus, config.corpus_packages, config.max_documents)
    data = tokenize_corpus(corpus, tokenizer, packages)
    if config.batch_size * (config.seq_len + 1) > data.train.numel():
        raise ValueError(
            f"{data.train.numel()} training tokens are too few for batch {config.batch_size} x {config.seq_len + 1}: "
            "lower --batch-size or --seq-len, or give more text (--corpus)"
        )
    windows = heldout_windows(data.heldout, config.seq_len, config.max_heldout_windows)
    base_loss = evaluate_base(base, windows, config.device, config.dtype)
    lora = _lora_plan(config, base) if "lora" in config.optimizers else None
    results = run_optimizers(config, train_one, (config, data, windows, base, lora), _SWEEP_KEYS, specs=METHODS)
    add_memory_ratios(results)
    settings = job_settings(
        config,
        dataclasses.asdict(config.settings()),
        heldout_windows=int(windows.size(0)),
        tokens_per_step=config.batch_size * config.seq_len,
    )
    settings["corpus_packages"] = list(config.corpus_packages)
    return {
        "config": settings,
        "data": data.describe(),
        "base_model": {**base.describe(), "heldout_loss": base_loss, "parameters": _parameter_count(base)},
        "lora": lora.describe() if lora is not None else None,
        "versions": {**versions(), "peft": package_version("peft")},
        "hardware": hardware(config.device),
        "argv": list(config.argv),
        "results": results,
        "import_notes": gather_import_notes(results),
        "targets": judge_targets(results, base_loss),
    }


def _parameter_count(base: BaseModel) -> int:
    return sum(p.numel() for p in meta_causal_lm(base.path).parameters())


def add_memory_ratios(results: list[dict[str, Any]]) -> None:
    """Add ``memory_ratio_to_adamw`` (state plus adapter over AdamW's state) to each finished result, in place."""
    base = next((r for r in results if r["name"] == "adamw" and not r.get("failed")), None)
    for result in results:
        if base is not None and not result.get("failed") and base.get("state_bytes"):
            result["memory_ratio_to_adamw"] = result["state_plus_adapter_bytes"] / base["state_bytes"]


def judge_targets(results: list[dict[str, Any]], base_loss: float) -> dict[str, Any]:
    """The issue's targets for this job, each with the figures it is judged on (``None`` where a method did
    not run): COAP's state <= 50% of AdamW's and its held-out loss within 2% of AdamW's; COAP no worse than
    GaLore; COAP's iteration time <= 1.10x AdamW's; COAP's held-out loss at most LoRA's, at comparable
    optimizer-plus-adapter bytes."""
    by_name = {r["name"]: r for r in results if not r.get("failed")}
    coap = by_name.get("coap_adamw")
    found: dict[str, Any] = {"base_heldout_loss": base_loss}
    if coap is None:
        return found
    adamw, galore, lora = by_name.get("adamw"), by_name.get("galore_adamw"), by_name.get("lora")
    if adamw is not None:
        found["coap_state_le_50pct_adamw"] = {
            "ratio": coap["state_ratio_to_adamw"],
            "met": coap["state_ratio_to_adamw"] <= 0.5,
        }
        found["coap_heldout_within_2pct_adamw"] = {
            "relative": coap["heldout_loss_rel_to_adamw"],
            "met": coap["heldout_loss_rel_to_adamw"] <= 0.02,
        }
        found["coap_iteration_le_1.10x_adamw"] = {
            "ratio": coap["iteration_ratio_to_adamw"],
            "met": coap["iteration_ratio_to_adamw"] <= 1.10,
        }
    if galore is not None:
        found["coap_no_worse_than_galore"] = {
            "coap": coap["heldout_loss"],
            "galore": galore["heldout_loss"],
            "met": coap["heldout_loss"] <= galore["heldout_loss"],
        }
    if lora is not None:
        found["coap_matches_lora_at_equal_bytes"] = {
            "coap_heldout_loss": coap["heldout_loss"],
            "lora_heldout_loss": lora["heldout_loss"],
            "relative": coap["heldout_loss"] / lora["heldout_loss"] - 1,
            "coap_state_bytes": coap["state_bytes"],
            "lora_adapter_plus_state_bytes": lora["state_plus_adapter_bytes"],
            "bytes_ratio": coap["state_bytes"] / lora["state_plus_adapter_bytes"],
            "met": coap["heldout_loss"] <= lora["heldout_loss"],
        }
    return found
