"""The model ``coap-bench finetune`` starts from: a local Hugging Face causal-LM folder, or the job's
default, the small LLaMA that ``coap-bench llama`` pretrains, made once and cached.

:func:`cached_base_model` finds the default model in the cache (:func:`default_cache_dir`) or makes it:
one AdamW run of ``coap-bench llama`` (:func:`coap_bench.llama.train_one`, with its data, model,
schedule and progress bar), exported with ``save_pretrained`` beside its tokenizer. The cache entry is
named by a hash of everything that decides the weights (:func:`base_model_key`: the model preset,
steps, batch, sequence, lr, seed, vocabulary, the corpus, token and tokenizer hashes), so a changed
setting never reuses stale weights. It is written to a temporary folder and renamed into place, so a
killed run never leaves a half-written model; its pretraining checkpoint stays in the cache until the
model is written, so a killed pretraining continues where it stopped.

:func:`load_causal_lm` and :func:`load_tokenizer` read any such folder, the default one or ``--model``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._deps import require

__all__ = [
    "CACHE_ENV",
    "BaseModel",
    "base_model_key",
    "cached_base_model",
    "default_cache_dir",
    "load_causal_lm",
    "load_tokenizer",
    "meta_causal_lm",
]

#: The environment variable that moves the cache (``--cache-dir`` wins over it).
CACHE_ENV = "COAP_BENCH_FINETUNE_CACHE"
#: The file of a cache entry that holds its key and how it was made; written last.
INFO_FILE = "coap_bench_base_model.json"
#: Bumped when the way the base model is made changes, so that older cache entries are not used.
_FORMAT = 1
#: A temporary folder older than this was left by a killed export (an export takes seconds).
_STALE_S = 600.0


def default_cache_dir() -> Path:
    """``$COAP_BENCH_FINETUNE_CACHE`` if set, else ``~/.cache/coap-bench/finetune``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coap-bench" / "finetune"


@dataclass(frozen=True)
class BaseModel:
    """The model a fine-tuning job starts from: its folder, and for the default model its cache ``key``
    (what determined its weights), ``from_cache``, and its pretraining run's ``pretraining`` figures."""

    path: str
    default: bool
    key: dict[str, Any] | None = None
    digest: str | None = None
    from_cache: bool = False
    pretraining: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def base_model_key(llama_config: Any, data: Any) -> dict[str, Any]:
    """What determines the default model's weights: the pretraining run's settings (``llama_config``, a
    resolved :class:`~coap_bench.llama.LlamaConfig`) and its data's corpus, token and tokenizer hashes."""
    from ..llama import LLAMA_PRESETS

    shape = {k: v for k, v in dataclasses.asdict(LLAMA_PRESETS[llama_config.preset]).items() if k != "notes"}
    return {
        "format": _FORMAT,
        "job": "coap-bench llama",
        "optimizer": "adamw",
        "preset": llama_config.preset,
        "shape": shape,
        "steps": llama_config.steps,
        "batch_size": llama_config.batch_size,
        "seq_len": llama_config.seq_len,
        "warmup_steps": llama_config.warmup_steps,
        "lr": llama_config.lr_for("adamw"),
        "recipe": llama_config.recipe,
        "weight_decay": llama_config.weight_decay,
        "seed": llama_config.seed,
        "device_type": torch.device(llama_config.device).type,
        "vocab_size": data.vocab_size,
        "corpus": data.corpus.name,
        "corpus_sha256": data.corpus_sha256,
        "train_sha256": data.train_sha256,
        "tokenizer_sha256": _file_sha256(data.tokenizer_path),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_info(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_exports(cache: Path, name: str) -> None:
    """Remove the temporary folders a killed export of ``name`` left (only ones older than a live export)."""
    with contextlib.suppress(OSError):
        for candidate in cache.iterdir():
            ours = candidate.name.startswith(f".{name}.") and candidate.name.endswith(".tmp") and candidate.is_dir()
            if ours and time.time() - candidate.stat().st_mtime >= _STALE_S:
                shutil.rmtree(candidate, ignore_errors=True)


def cached_base_model(
    *,
    preset: str,
    steps: int,
    vocab_size: int,
    max_documents: int | None,
    seed: int,
    device: str,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> BaseModel:
    """The default base model: ``coap-bench llama``'s ``preset`` after ``steps`` steps of AdamW on its
    built-in corpus (the first ``max_documents`` documents, or all), from the cache, or pretrained now and
    cached (a line on stderr says so, then the run's progress bar)."""
    from ..llama import LlamaConfig, train_one
    from ..text import heldout_windows, load_token_data

    config = LlamaConfig(
        preset=preset,
        steps=steps,
        optimizers=("adamw",),
        vocab_size=vocab_size,
        max_documents=max_documents,
        seed=seed,
        device=device,
        isolate=False,
        checkpoint_every=min(100, steps),
        progress=progress,
    ).resolved()
    data = load_token_data(vocab_size=vocab_size, max_documents=max_documents)
    key = base_model_key(config, data)
    digest = _digest(key)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"llama-{preset}-{steps}steps-seed{seed}-{digest[:16]}"
    folder = cache / name
    info = _read_info(folder)
    if info is not None and info.get("key") == key:
        return BaseModel(str(folder), True, key, digest, True, info.get("pretraining"))

    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_exports(cache, name)
    print(
        f"coap-bench finetune: pretraining the base model once (coap-bench llama --preset {preset} --steps {steps} "
        f"--optimizers adamw, {data.corpus.name}); it is cached in {folder}",
        file=sys.stderr,
        flush=True,
    )
    checkpoint = cache / f"{name}.pretraining.pt"  # kept until the model is written: a killed run continues
    windows = heldout_windows(data, config.seq_len, 256)
    result = train_one("adamw", config.lr_for("adamw"), config, data, windows, checkpoint)
    pretraining = {key_: result[key_] for key_ in ("heldout_loss", "final_loss", "steps_done", "wall_seconds")}
    pretraining["heldout_windows"] = int(windows.size(0))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    _export(config, data, saved["model"], folder, {"key": key, "digest": digest, "pretraining": pretraining})
    checkpoint.unlink(missing_ok=True)
    return BaseModel(str(folder), True, key, digest, False, pretraining)


def _export(config: Any, data: Any, weights: dict[str, Any], folder: Path, info: dict[str, Any]) -> None:
    """Write the model (``save_pretrained``), its tokenizer and ``info`` to ``folder``: into a temporary
    folder beside it first, renamed into place once complete."""
    from ..llama import LLAMA_PRESETS
    from ..llama_model import build_llama
    from ..text import EOS_TOKEN

    transformers = require("transformers", names=("PreTrainedTokenizerFast",))
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed)
    model.load_state_dict(weights)
    model.config.eos_token_id = data.eos_id
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=data.tokenizer_path, eos_token=EOS_TOKEN)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the cache entry is an ordinary folder
    logging = require("transformers", names=("utils",)).utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its "Writing model shards" bar says nothing a user needs
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / INFO_FILE).write_text(json.dumps(info, indent=1))  # last: its presence means complete
        if folder.exists():  # an entry with another key under this name (a hash prefix clash, or damaged)
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    finally:
        if bar:
            logging.enable_progress_bar()
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in the model folder ``path`` (``AutoTokenizer``, local files only)."""
    transformers = require("transformers", names=("AutoTokenizer",))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.model_max_length = 1 << 40  # documents are tokenized whole and cut into windows later
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The causal LM saved in folder ``path`` (``AutoModelForCausalLM``, local files only), in ``dtype`` on
    ``device``, with the KV cache off (training only)."""
    transformers = require("transformers", names=("AutoModelForCausalLM", "utils"))
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its "Loading weights" bar would sit between the runs' own bars
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, use_cache=False
        )
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.to(device)


def meta_causal_lm(path: str | os.PathLike[str]) -> nn.Module:
    """The causal LM of folder ``path`` built from its config on the meta device: shapes only, no weights read."""
    transformers = require("transformers", names=("AutoConfig", "AutoModelForCausalLM"))
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)
