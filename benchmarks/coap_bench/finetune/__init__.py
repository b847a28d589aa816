"""The fine-tuning benchmark: a pretrained causal LM fine-tuned on a second offline corpus, once per method.

* **The model** (:mod:`~coap_bench.finetune.pretrained`): by default the ``tiny`` LLaMA that
  ``coap-bench llama`` pretrains on Python's documentation (400 steps of AdamW), saved with
  ``save_pretrained`` beside its tokenizer; made on first use (with a progress bar) and cached under
  ``~/.cache/coap-bench/finetune`` (``$COAP_BENCH_FINETUNE_CACHE``, ``--cache-dir``), keyed by what
  determines its weights. ``--model PATH`` fine-tunes any local Hugging Face causal-LM folder.
* **The corpus** (:mod:`~coap_bench.finetune.corpus`): the documentation of installed packages (numpy's
  docstrings by default), which the base model never saw, split into training and held-out documents by
  a hash of their ids and tokenized with the base model's tokenizer; ``--corpus PATH`` a folder of text.
* **The methods** (:data:`METHODS`): full fine-tuning with torch's AdamW, bitsandbytes' AdamW8bit,
  GaLore's AdamW and CoapAdamW (every parameter trained; the low-rank ones project every matrix at the
  same rank), and LoRA through ``peft`` (:mod:`~coap_bench.finetune.lora`: adapters on the attention and
  MLP projections, AdamW on them, the base frozen), at the rank whose adapter plus optimizer state
  matches CoapAdamW's state.
* **The recipe** (:class:`FinetuneConfig`): the paper's LLaVA-v1.5-7B fine-tuning row scaled down:
  CoapAdamW at rank ratio 4, T_u 32, lambda 1, update scale 1; GaLore at the same rank, refreshing as
  often. The peak lr is the preset's for each family (:data:`FINETUNE_PRESETS`): the ``llava`` preset
  has the paper's 2e-5 (LLaVA's full fine-tuning lr) and LLaVA's LoRA lr 2e-4; the ``small`` preset's
  1e-3 (dense), 2e-3 (low-rank) and 3e-3 (LoRA) were measured on its base model
  (:class:`FinetunePreset` says how).

Every method starts from the same weights, sees the same batches (:class:`~coap_bench.text.TokenBatches`
seeded by ``seed``) and the same schedule (linear warm-up, cosine to 10%), runs in a process of its own
on the CPU, checkpoints and resumes exactly (``--checkpoint-dir``), and is scored on the same held-out
windows; the base model's held-out loss before fine-tuning is the reference.

Example, the Python side of ``coap-bench finetune --preset micro --optimizers adamw,coap_adamw,lora``::

    from coap_bench.finetune import FinetuneConfig, format_finetune_table, run_finetune

    run = run_finetune(FinetuneConfig(preset="micro", optimizers=("adamw", "coap_adamw", "lora")))
    print(format_finetune_table(run))
"""

from .corpus import FinetuneData, package_docs_corpus, tokenize_corpus
from .lora import LORA_SPEC, apply_lora, lora_targets, matched_lora_rank
from .presets import DEFAULT_FINETUNE_OPTIMIZERS, FINETUNE_PRESETS, METHODS, FinetuneConfig, FinetunePreset
from .pretrained import BaseModel, cached_base_model, default_cache_dir, load_causal_lm, load_tokenizer
from .report import format_finetune_table, write_finetune_plots
from .training import run_finetune, train_one

__all__ = [
    "DEFAULT_FINETUNE_OPTIMIZERS",
    "FINETUNE_PRESETS",
    "LORA_SPEC",
    "METHODS",
    "BaseModel",
    "FinetuneConfig",
    "FinetuneData",
    "FinetunePreset",
    "apply_lora",
    "cached_base_model",
    "default_cache_dir",
    "format_finetune_table",
    "load_causal_lm",
    "load_tokenizer",
    "lora_targets",
    "matched_lora_rank",
    "package_docs_corpus",
    "run_finetune",
    "tokenize_corpus",
    "train_one",
    "write_finetune_plots",
]
