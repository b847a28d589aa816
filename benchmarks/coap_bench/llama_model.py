"""LLaMA models for the pre-training benchmark: presets, a deterministic builder, parameter splits.

* :data:`PRESETS` holds a small CPU default (``"tiny"``) and the LLaMA sizes of the GaLore paper.
* :func:`build_llama` builds a :class:`transformers.LlamaForCausalLM` from a ``LlamaConfig``
  (nothing is downloaded) with LLaMA's initialization drawn from a generator seeded by ``seed``,
  never from the global RNG; ``device="meta"`` builds the model without allocating memory, which is
  enough for parameter counts and memory estimates of the 7B model.
* :func:`projected_parameter_groups` splits a model's parameters by recipe into the ones a
  low-rank optimizer projects and the ones it trains densely, as plain ``(name, parameter)``
  lists that each optimizer family (COAP, GaLore, APOLLO) turns into its own param groups.

Needs ``transformers`` (part of the ``bench`` extra), imported only when a model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._deps import require

__all__ = [
    "INITIALIZER_RANGE",
    "PAPER_VOCAB_SIZE",
    "PRESETS",
    "PROJECTED_MODULES",
    "RECIPES",
    "LlamaPreset",
    "ParamSplit",
    "build_llama",
    "initial_loss",
    "llama_config",
    "projected_parameter_groups",
]

#: Standard deviation of LLaMA's normal initialization of Linear and Embedding weights.
INITIALIZER_RANGE = 0.02
#: RMSNorm epsilon of the GaLore configs.
RMS_NORM_EPS = 1e-6
#: Vocabulary size of the GaLore configs (T5 tokenizer on C4).
PAPER_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class LlamaPreset:
    """The shape of a LLaMA model; the vocabulary size is given when the model is built.

    ``max_position_embeddings`` is also the training sequence length of the benchmark.
    Attention has as many key/value heads as query heads (no grouped-query attention), as in the
    GaLore configs.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaPreset.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head dimension must be even for rotary position embeddings")

    @property
    def seq_len(self) -> int:
        """The training sequence length (``max_position_embeddings``)."""
        return self.max_position_embeddings

    def num_parameters(self, vocab_size: int) -> int:
        """Closed-form parameter count with untied embeddings: what :func:`build_llama` builds."""
        h, f, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 3 * h * f + 2 * h  # q/k/v/o, gate/up/down, two RMSNorms
        return layers * per_layer + 2 * vocab_size * h + h  # embed_tokens, lm_head, final norm


#: The LLaMA sizes. "60m" ... "7b" are the configs of the GaLore paper (Zhao et al., "GaLore:
#: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024: its LLaMA
#: architecture table and the ``configs/llama_*.json`` files of its code release), which COAP and
#: APOLLO reuse; those papers pre-train on C4 with sequence length 256 and a 32000-token
#: vocabulary (:data:`PAPER_VOCAB_SIZE`).
PRESETS: dict[str, LlamaPreset] = {
    "tiny": LlamaPreset(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=128,
        notes="CPU default, not from a paper: about 3.2M parameters outside the embeddings; "
        "learns a byte- or char-level corpus within minutes on 2 CPU cores",
    ),
    "60m": LlamaPreset(512, 1376, 8, 8, 256, notes="GaLore paper LLaMA 60M (58M with a 32000 vocab)"),
    "130m": LlamaPreset(768, 2048, 12, 12, 256, notes="GaLore paper LLaMA 130M (134M with a 32000 vocab)"),
    "350m": LlamaPreset(1024, 2736, 16, 24, 256, notes="GaLore paper LLaMA 350M (368M with a 32000 vocab)"),
    "1b": LlamaPreset(2048, 5461, 32, 24, 256, notes="GaLore paper LLaMA 1B (1.34B with a 32000 vocab)"),
    "7b": LlamaPreset(4096, 11008, 32, 32, 256, notes="GaLore paper LLaMA 7B (6.74B with a 32000 vocab)"),
}

#: Names of the attention and MLP weight matrices that the "paper" recipe projects.
PROJECTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Recipes of :func:`projected_parameter_groups`.
RECIPES = ("drop-in", "paper")


def _preset(preset: LlamaPreset | str) -> LlamaPreset:
    if isinstance(preset, LlamaPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown LLaMA preset {preset!r}; choose from {', '.join(PRESETS)}") from None


def llama_config(preset: LlamaPreset | str, vocab_size: int) -> Any:
    """The :class:`transformers.LlamaConfig` of ``preset`` (untied embeddings, no KV cache)."""
    preset = _preset(preset)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    transformers = require("transformers", names=("LlamaConfig",))
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_attention_heads,
        max_position_embeddings=preset.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=RMS_NORM_EPS,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=None,
    )


def _fresh_rotary(module: nn.Module, config: Any) -> nn.Module:
    """A rotary embedding like ``module``, built on the CPU from ``config``."""
    with torch.device("cpu"):
        try:
            return type(module)(config=config)
        except TypeError:  # older transformers: LlamaRotaryEmbedding(dim, max_position_embeddings, base)
            head_dim = config.hidden_size // config.num_attention_heads
            theta = getattr(config, "rope_theta", 10000.0)
            return type(module)(head_dim, max_position_embeddings=config.max_position_embeddings, base=theta)


def _restore_buffers(model: nn.Module, config: Any, device: torch.device) -> None:
    """Recompute the buffers (rotary frequencies) that ``to_empty`` left uninitialized."""
    restored: set[str] = set()
    for module_name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise RuntimeError(
                f"build_llama does not know how to initialize the buffers of {module_name} ({type(module).__name__})"
            )
        fresh = dict(_fresh_rotary(module, config).named_buffers(recurse=False))
        for name in own:
            module._buffers[name] = fresh[name].to(device)  # kept in float32, as transformers computes them
            restored.add(f"{module_name}.{name}" if module_name else name)
    missing = {name for name, _ in model.named_buffers()} - restored
    if missing:
        raise RuntimeError(f"buffers left uninitialized: {sorted(missing)}")


@torch.no_grad()
def _initialize(model: nn.Module, generator: torch.Generator, std: float) -> None:
    """LLaMA's initialization: normal(0, std) Linear and Embedding weights, zero biases, unit RMSNorm.

    Values are drawn in float32 on the CPU, parameter by parameter in module order, then copied to
    the parameter's device and dtype: the same seed gives the same weights on every device.
    """
    initialized: set[int] = set()

    def normal_(param: Tensor) -> None:
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        param.copy_(values)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            normal_(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)
        else:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own:
                raise RuntimeError(
                    f"build_llama does not know how to initialize {name}.{own[0]} ({type(module).__name__})"
                )
            continue
        initialized.update(id(p) for p in module.parameters(recurse=False))
    missing = [name for name, p in model.named_parameters() if id(p) not in initialized]
    if missing:
        raise RuntimeError(f"parameters left uninitialized: {missing}")


def build_llama(
    preset: LlamaPreset | str,
    vocab_size: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A :class:`transformers.LlamaForCausalLM` of ``preset``, initialized from ``seed``.

    The model is built on the meta device, materialized on ``device`` with ``to_empty`` and
    initialized as LLaMA is (normal(0, 0.02) Linear and Embedding weights, RMSNorm weights one),
    drawing from a :class:`torch.Generator` seeded with ``seed``: the global RNG is not touched,
    and the same seed gives the same weights. Embeddings and ``lm_head`` are not tied.

    With ``device="meta"`` the model is returned uninitialized and allocates no memory: use it for
    parameter counts and memory estimates (e.g. of the 7B preset).

    Args:
        preset: a :class:`LlamaPreset` or a key of :data:`PRESETS`.
        vocab_size: vocabulary size (:data:`PAPER_VOCAB_SIZE` in the papers).
        seed: seed of the initialization.
        device: where the parameters live.
        dtype: floating dtype of the parameters (the rotary frequency buffers stay float32).
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    config = llama_config(preset, vocab_size)
    transformers = require("transformers", names=("LlamaForCausalLM",))
    device = torch.device(device)
    # Built on meta: nothing is allocated and no initializer runs on real memory. fork_rng keeps
    # the global CPU RNG exactly as it was, whatever the constructor does.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to(dtype=dtype)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    _restore_buffers(model, config, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    _initialize(model, generator, std=config.initializer_range)
    return model


@dataclass
class ParamSplit:
    """Parameters split for a low-rank optimizer: ``projected`` ones and ``dense`` ones.

    Both are lists of ``(name, parameter)`` in ``model.named_parameters()`` order; together they
    hold every trainable parameter exactly once.
    """

    projected: list[tuple[str, nn.Parameter]]
    dense: list[tuple[str, nn.Parameter]]

    @property
    def projected_names(self) -> list[str]:
        return [name for name, _ in self.projected]

    @property
    def dense_names(self) -> list[str]:
        return [name for name, _ in self.dense]

    def param_groups(
        self, projected_options: dict[str, Any] | None = None, dense_options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Param groups for an optimizer: ``projected`` then ``dense``, each with its options; empty ones left out.

        For example ``split.param_groups(dense_options={"coap": False})`` for the COAP optimizers.
        """
        groups = []
        for params, options in ((self.projected, projected_options), (self.dense, dense_options)):
            if params:
                groups.append({"params": [p for _, p in params], **(options or {})})
        return groups


def _is_projected_matrix(name: str, param: nn.Parameter) -> bool:
    parts = name.split(".")
    return param.ndim == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTED_MODULES


def projected_parameter_groups(model: nn.Module, recipe: str) -> ParamSplit:
    """Split the trainable parameters of ``model`` by ``recipe``.

    * ``"drop-in"``: every parameter in ``projected`` (``dense`` empty); the optimizer is used as
      a drop-in replacement and decides itself what to project (every 2-D weight).
    * ``"paper"``: the attention and MLP weight matrices (``q/k/v/o_proj``, ``gate/up/down_proj``)
      in ``projected``; everything else (``embed_tokens``, ``lm_head``, the RMSNorms) in ``dense``,
      as in the GaLore, COAP and APOLLO pre-training recipes.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if recipe == "drop-in":
        return ParamSplit(projected=named, dense=[])
    projected = [(name, p) for name, p in named if _is_projected_matrix(name, p)]
    dense = [(name, p) for name, p in named if not _is_projected_matrix(name, p)]
    return ParamSplit(projected=projected, dense=dense)


def initial_loss(vocab_size: int) -> float:
    """Cross-entropy of a uniform prediction, ``ln(vocab_size)``: the loss expected at initialization."""
    return math.log(vocab_size)
