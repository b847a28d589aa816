"""``coap-bench memory``: the optimizer-state memory of the paper's models, computed before training.

Every model is built on the ``meta`` device from its published configuration, written down here
(nothing is downloaded), and every figure is :func:`~coap_bench.state_layouts.estimate_state_bytes` of the
real optimizer configuration (:func:`coap_torch.estimate_state_bytes` for ours: the same routing code as the
optimizers), byte-exact against their state.
Next to each figure stands the one the COAP paper prints, the ratio, and, where the two differ
by more than 1%, the reason, found by taking the difference apart.

Layout. The COAP rows here say ``projection_side="smaller"`` (:data:`PAPER_PROJECTION_SIDE`): the
paper's layout, its release's and the library's default, named so that they compare with the
paper's figures (and :func:`paper_release_values`) like for like whatever the default. The 8-bit
COAP rows quantize in blocks of 4096 values (:data:`PAPER_BLOCK_SIZE`), the block of the release's
quantizer (bitsandbytes' ``quantize_blockwise``); the library's default is 256.

Precision. Every row is at the precision of the paper's figures for its model (``Study.state_dtype``):
the UNets, ControlNet and SiT train float32 weights and keep float32 state (AdamW on the DDPM
CIFAR-10 UNet is 272.72 MiB = 8 bytes per value); the LLaMA runs are bfloat16 models whose state
the release keeps in the parameters' bfloat16 (AdamW on LLaMA-1B is 4.99 GiB = 4 bytes per value),
so our rows there use ``state_dtype=torch.bfloat16``, and the peers, whose state follows the
parameters' dtype, are bf16 by themselves. Our rows also show the float32 state of the library's
default (``ours_fp32_state``).

Units. The paper's "MB" and "GB" are binary (MiB, GiB): AdamW on the DDPM CIFAR-10 UNet
(35,746,307 fp32 values, two moments) is 285,970,456 bytes = 272.72 MiB (285.97 MB), the figure
of supplementary Table 2; LLaMA-1B's 4.99 GB is 1,339,082,752 values x 2 bf16 moments = 4.99 GiB.

The UNets and ControlNet need ``diffusers``, LLaMA needs ``transformers``, the peers their own
packages; a missing package turns its rows into a line that says so.

Example::

    coap-bench memory                                  # every model, a few seconds on a laptop
    coap-bench memory --models ddpm-cifar10 --json memory.json
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._deps import MissingExtraError, require
from ._quiet import import_note_lines, import_notes
from .optimizers import ADAFACTOR_OPTIONS, OPTIMIZERS, LowRankSettings, low_rank_groups
from .state_layouts import estimate_state_bytes

__all__ = [
    "DDPM_CELEBAHQ_CONFIG",
    "DDPM_CIFAR10_CONFIG",
    "MODELS",
    "PAPER_BLOCK_SIZE",
    "PAPER_PROJECTION_SIDE",
    "SDXL_UNET_CONFIG",
    "format_memory_report",
    "paper_release_values",
    "run_memory",
]

#: Where the COAP rows put ``P`` on a matrix: the paper's side (its release's too), so that ours
#: and the paper's figures count the same layout.
PAPER_PROJECTION_SIDE = "smaller"
#: Values per quantization block (one float32 absmax each) of the 8-bit COAP rows: the block of the
#: release's quantizer (``bitsandbytes.functional.quantize_blockwise``'s default), so that ours and the
#: release hold the same bytes. The library's default is 256.
PAPER_BLOCK_SIZE = 4096

# -- the models, from their published configurations ------------------------------------------
#: ``google/ddpm-cifar10-32``'s UNet2DModel config: the DDPM CIFAR-10 UNet (35.7M parameters).
DDPM_CIFAR10_CONFIG: dict[str, Any] = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6,
    "norm_num_groups": 32, "time_embedding_type": "positional",
}  # fmt: skip

#: ``google/ddpm-celebahq-256``'s config: the DDPM CelebA-HQ UNet (113.7M parameters).
DDPM_CELEBAHQ_CONFIG: dict[str, Any] = {
    **DDPM_CIFAR10_CONFIG,
    "sample_size": 256,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}

#: ``stabilityai/stable-diffusion-xl-base-1.0``'s UNet config; ControlNet-SDXL is built from it
#: as ``ControlNetModel.from_unet`` does (1.25B parameters, trained in full).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280),
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "use_linear_projection": True,
}  # fmt: skip


def _diffusers() -> Any:
    return require(
        "diffusers", hint="pip install diffusers", names=("UNet2DModel", "UNet2DConditionModel", "ControlNetModel")
    )


def _ddpm(config: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        unet = _diffusers().UNet2DModel
        with torch.device("meta"):
            return unet(**config)

    return build


def _controlnet_sdxl() -> nn.Module:
    diffusers = _diffusers()
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET_CONFIG)
        return diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False)


class SiTBlock(nn.Module):
    """One SiT / DiT block's parameters: timm attention (fused qkv) and MLP, adaLN-Zero modulation."""

    def __init__(self, hidden: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(hidden, 3 * hidden), "proj": nn.Linear(hidden, hidden)})
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(hidden, int(hidden * mlp_ratio)), "fc2": nn.Linear(int(hidden * mlp_ratio), hidden)}
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))


class SiT(nn.Module):
    """The parameters of SiT (Ma et al. 2024; DiT's architecture): written down, as no ``diffusers``
    class matches it (``DiTTransformer2DModel`` gives every block its own timestep and label
    embedder: 750M parameters where SiT-XL/2 has 675M). LayerNorms have no affine parameters and
    the sin-cos position embedding is frozen, as in the reference code. No ``forward``."""

    def __init__(self, depth: int = 28, hidden: int = 1152, patch: int = 2, in_channels: int = 4,
                 num_classes: int = 1000, grid: int = 16, learn_sigma: bool = True) -> None:  # fmt: skip
        super().__init__()
        out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.ModuleDict({"proj": nn.Conv2d(in_channels, hidden, patch, stride=patch)})
        self.t_embedder = nn.ModuleDict(
            {"mlp": nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))}
        )
        self.y_embedder = nn.ModuleDict(
            {"embedding_table": nn.Embedding(num_classes + 1, hidden)}
        )  # +1: CFG's null class
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden) for _ in range(depth))
        self.final_layer = nn.ModuleDict({
            "linear": nn.Linear(hidden, patch * patch * out_channels),
            "adaLN_modulation": nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)),
        })  # fmt: skip


def _sit_xl_2() -> nn.Module:
    with torch.device("meta"):
        return SiT()  # XL/2 on 256x256 ImageNet latents (32x32x4): depth 28, hidden 1152, 16 heads, patch 2


def _llama(preset: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from .llama_model import PAPER_VOCAB_SIZE, build_llama

        # BF16 as in the LLaMA runs of GaLore and COAP: the weights themselves are bf16.
        return build_llama(preset, PAPER_VOCAB_SIZE, seed=0, device="meta", dtype=torch.bfloat16)

    return build


# -- the paper's release, for explaining differences --------------------------------------------
def paper_release_values(shape: Sequence[int], ratio: float, *, adafactor: bool) -> int:
    """Values of optimizer state that the paper's release (``bytedance/coap``) keeps for one parameter.

    Its rules, read from its code (``utils/params.py``, ``projection/coap_high_order_tensor.py``)
    and counted as its ``show_memory_usage`` counts (tensor ``numel``, the ``RMS`` scalar included):

    * 1-D tensors, and kernels with at most 32*32*3*3 = 9216 entries: dense moments.
    * matrices: rank ``min(m, n) // ratio``, ``P`` on the smaller side, moments (max side, r).
    * 1x1 kernels (O, I, 1, 1): Tucker-1 on the output mode, ``r_O = O // ratio``: ``P_O``
      (O, r_O) and moments (r_O, I, 1, 1), whose Adafactor "row" (r_O, I, 1) and "col"
      (r_O, I, 1) accumulators factor over the trailing 1x1 axes, so each is as large as the moment.
    * other kernels: Tucker-2, ``r = dim // sqrt(ratio)`` on O and I.

    Adafactor (transformers' and the release's) keeps ``exp_avg`` (``beta1`` set) and the factored
    second moment over the last two axes.
    """
    shape = tuple(shape)
    numel = math.prod(shape)

    def moments(s: tuple[int, ...]) -> int:
        if not adafactor:
            return 2 * math.prod(s)
        second = math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:]) if len(s) >= 2 else math.prod(s)
        return math.prod(s) + second + 1  # + RMS

    if len(shape) == 1 or (len(shape) == 4 and numel <= 32 * 32 * 3 * 3):
        return moments(shape)
    if len(shape) == 2:
        m, n = shape
        r = max(int(min(m, n) // ratio), 1)
        return r * min(m, n) + moments((max(m, n), r))
    out, inp, *kernel = shape
    if kernel[-1] == 1:
        r_out = int(max(1, out // ratio))
        return out * r_out + moments((r_out, inp, *kernel))
    r_out, r_in = (int(max(1, side // ratio**0.5)) for side in (out, inp))
    return out * r_out + inp * r_in + moments((r_out, r_in, *kernel))


def paper_release_llama_bytes(
    shape: Sequence[int], rank: int | None, *, eight_bit: bool, block: int = PAPER_BLOCK_SIZE
) -> tuple[int, int]:
    """Bytes of state the paper's release keeps for one parameter of its bf16 LLaMA runs, and the bytes its
    ``show_memory_usage`` counts of them: ``(holds, counts)``.

    Its rules, read from its code (``optimizer/adamw.py``, ``optimizer/adamw_8bit.py``,
    ``utils/memory.py``, ``examples/llama/torchrun_main.py``): the attention and MLP matrices
    (``rank`` set) are projected at ``r = min(rank, min(m, n))`` with ``P`` (min(m, n), r) and moments
    (max(m, n), r); every other tensor (embeddings, head, norms; ``rank=None``) keeps dense moments. ``P``
    and the moments of ``CoapAdamW`` are in the parameters' bf16. ``CoapAdamW8bit`` stores every moment,
    whatever its size, with ``bitsandbytes.functional.quantize_blockwise``: one byte per value and, in the
    ``QuantState`` next to it, one float32 absmax per block of 4096 values. Its counter sums tensors,
    tuples, lists and dicts (and the projector's ``ortho_matrix``), and counts the ``QuantState`` as 0:
    it skips the absmax.
    """
    shape = tuple(shape)
    if rank is not None and len(shape) == 2:
        r = min(int(rank), min(shape))
        proj, moment = 2 * min(shape) * r, max(shape) * r
    else:
        proj, moment = 0, math.prod(shape)
    if not eight_bit:
        total = proj + 2 * 2 * moment
        return total, total
    counted = proj + 2 * moment
    return counted + 2 * 4 * -(-moment // block), counted


def _category(shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return "1-D (biases, norms)"
    if len(shape) == 2:
        return "linear matrices"
    if math.prod(shape) <= 9216:
        return "small convs (<= 9216 entries)"
    return f"{'x'.join(map(str, shape[2:]))} convs"


# -- the studies: one model, its optimizer configurations, the paper's figures -------------------
ADAFACTOR = {**ADAFACTOR_OPTIONS, "lr": 1e-3}  # beta1 set, as in the paper's runs
NAMES = ("adamw", "adafactor", "adamw8bit", "galore_adamw", "galore_adamw8bit", "galore_adafactor",
         "coap_adamw", "coap_adamw8bit", "coap_adafactor", "coap_adafactor8bit")  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One optimizer configuration on a model: ``rank`` (absolute) or ``ratio`` for the low-rank ones."""

    optimizer: str
    rank: int | None = None
    ratio: float | None = None
    paper: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def setting(self) -> str:
        if self.optimizer in ("adamw", "adafactor", "adamw8bit"):
            return "-"
        return f"rank {self.rank}" if self.rank else f"ratio {self.ratio:g}"

    @property
    def ours(self) -> bool:
        """One of our optimizers (``state_dtype`` applies), not a peer's."""
        return self.optimizer.startswith("coap_")


@dataclass(frozen=True)
class Study:
    key: str
    title: str
    unit: str  # "MiB" or "GiB": the paper's unit for this model
    build: Callable[[], nn.Module]
    cases: tuple[Case, ...]
    recipe: str = "drop-in"  # "paper": LLaMA's attention + MLP projected, the rest dense
    notes: tuple[str, ...] = ()
    #: The precision of the paper's state figures for this model: our rows use it as ``state_dtype``.
    state_dtype: str = "float32"


def _cases(paper: dict[str, float], notes: dict[str, tuple[str, ...]], **setting: Any) -> tuple[Case, ...]:
    return tuple(
        Case(name, **({} if name in ("adamw", "adafactor", "adamw8bit") else setting), paper=paper.get(name),
             notes=notes.get(name, ()))
        for name in NAMES
    )  # fmt: skip


_DDPM_NOTES = {"galore_adamw": ("galore-ddpm",), "galore_adafactor": ("galore-ddpm",),
               "coap_adamw": ("ddpm-1x1", "ddpm-release"), "coap_adafactor": ("ddpm-1x1", "ddpm-release")}  # fmt: skip

MODELS: dict[str, Study] = {
    study.key: study
    for study in (
        Study("ddpm-cifar10", "DDPM CIFAR-10 UNet (fp32)", "MiB", _ddpm(DDPM_CIFAR10_CONFIG), _cases(
            {"adamw": 272.72, "galore_adamw": 302.43, "coap_adamw": 214.66, "adafactor": 222.71,
             "galore_adafactor": 196.11, "coap_adafactor": 180.87}, _DDPM_NOTES, ratio=1.5)),
        Study("ddpm-celebahq", "DDPM CelebA-HQ UNet (fp32)", "MiB", _ddpm(DDPM_CELEBAHQ_CONFIG), _cases(
            {"adamw": 867.26, "galore_adamw": 562.56, "coap_adamw": 525.18, "adafactor": 714.64,
             "galore_adafactor": 549.27, "coap_adafactor": 447.59}, _DDPM_NOTES, ratio=2)),
        Study("llama-1b", "LLaMA-1B (bf16)", "GiB", _llama("1b"), _cases(
            {"adamw": 4.99, "coap_adamw": 1.94}, {"coap_adamw": ("llama-dtype",)}, rank=512), recipe="paper",
            state_dtype="bf16"),
        Study("llama-7b", "LLaMA-7B (bf16)", "GiB", _llama("7b"), _cases(
            {"adamw8bit": 12.55, "coap_adamw8bit": 5.25},
            {"adamw8bit": ("absmax",), "coap_adamw8bit": ("llama-8bit",), "coap_adamw": ("llama-dtype",)},
            rank=1024), recipe="paper", state_dtype="bf16"),
        Study("controlnet-sdxl", "ControlNet-SDXL (fp32 master weights)", "GiB", _controlnet_sdxl, (
            *_cases({"adafactor": 5.1, "galore_adafactor": 4.7, "galore_adamw8bit": 2.4, "coap_adafactor": 3.6},
                    {"galore_adafactor": ("galore-controlnet",), "galore_adamw8bit": ("galore-controlnet",)}, ratio=2),
            Case("coap_adafactor8bit", ratio=8, paper=0.5, notes=("controlnet-8bit",)),
        )),
        Study("sit-xl-2", "SiT-XL/2 (fp32 master weights)", "GiB", _sit_xl_2, _cases({}, {}, rank=512),
              notes=("sit",)),
    )
}  # fmt: skip


def _inputs(
    study: Study, model: nn.Module, case: Case, *, state_dtype: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """What ``estimate_state_bytes`` gets for ``case``: the parameters (or groups) and the options
    (COAP's with ``P`` on the paper's side, :data:`PAPER_PROJECTION_SIDE`, the release's 8-bit block,
    :data:`PAPER_BLOCK_SIZE`, and the state at the paper's precision, ``study.state_dtype``, unless
    ``state_dtype`` says otherwise; a COAP optimizer's ``state_dtype`` covers its dense group too)."""
    options = dict(ADAFACTOR) if "adafactor" in case.optimizer else {}
    if case.ours:
        options["projection_side"] = PAPER_PROJECTION_SIDE
        options["state_dtype"] = state_dtype or study.state_dtype
        if case.optimizer.endswith("8bit"):
            options["block_size"] = PAPER_BLOCK_SIZE
    if case.optimizer in ("adamw", "adafactor", "adamw8bit"):
        return model, options
    if study.recipe == "paper":
        from .llama_model import projected_parameter_groups

        split = projected_parameter_groups(model, "paper")
        projected, dense = [p for _, p in split.projected], [p for _, p in split.dense]
    else:
        projected, dense = list(model.parameters()), []
    if case.optimizer.startswith("galore_"):  # the benchmarks' GaLore groups: matrices above their rank
        settings = LowRankSettings(rank=case.rank, rank_ratio=case.ratio)
        return low_rank_groups(projected, dense, settings, update_proj_gap=200, scale=1.0, proj_type="std"), options
    if dense:  # named, so that per-parameter figures keep the model's names
        named = dict(model.named_parameters())
        split = [[(n, p) for n, p in named.items() if any(p is q for q in side)] for side in (projected, dense)]
        return [{"params": split[0], "rank": case.rank}, {"params": split[1], "coap": False}], options
    if case.rank is not None:
        return model, {**options, "rank": case.rank}
    return model, {**options, "rank_ratio_matrix": case.ratio, "rank_ratio_cnn": case.ratio}


def _unit_bytes(unit: str) -> int:
    return {"MiB": 2**20, "GiB": 2**30}[unit]


def _printed_digits(value: float) -> int:
    """Decimals of a figure as the paper prints it (``5.1`` -> 1, ``272.72`` -> 2)."""
    return len(repr(value).partition(".")[2].rstrip("0"))


def _row(study: Study, case: Case, estimate: Any = None, error: str | None = None, fp32: Any = None) -> dict[str, Any]:
    """One row: ``ours`` at the paper's precision (``state_dtype``), and for our optimizers ``ours_fp32_state``
    (the library's default float32 state); ``vs_paper`` compares ``ours`` with the paper's figure at the digits
    the paper prints (``"<"``, ``"="`` or ``">"``)."""
    row: dict[str, Any] = {"model": study.key, "optimizer": case.optimizer, "setting": case.setting,
                           "unit": study.unit, "paper": case.paper, "notes": list(case.notes), "error": error,
                           "state_dtype": study.state_dtype if case.ours else None}  # fmt: skip
    if estimate is not None:
        scale = _unit_bytes(study.unit)
        ours = estimate.total / scale
        row.update(bytes=estimate.total, ours=ours, ratio=ours / case.paper if case.paper else None)
        if fp32 is not None:
            row.update(bytes_fp32_state=fp32.total, ours_fp32_state=fp32.total / scale)
        if case.paper is not None:
            printed = round(ours, _printed_digits(case.paper))
            row["vs_paper"] = "<" if printed < case.paper else "=" if printed == case.paper else ">"
        if row["ratio"] is not None and abs(row["ratio"] - 1) > 0.01 and not case.notes:
            row["notes"].append("unexplained")
    return row


def _explain(study: Study, model: nn.Module, estimates: dict[tuple[str, float | int | None], Any]) -> dict[str, str]:
    """The reasons behind this study's differences from the paper, with the numbers that show them."""
    unit, scale = study.unit, _unit_bytes(study.unit)
    notes: dict[str, str] = {}
    if study.key.startswith("ddpm"):
        ratio = next(c.ratio for c in study.cases if c.optimizer == "coap_adamw")
        release = {name: sum(4 * paper_release_values(p.shape, ratio, adafactor=name == "coap_adafactor")
                             for p in model.parameters()) / scale for name in ("coap_adamw", "coap_adafactor")}  # fmt: skip
        notes["ddpm-1x1"] = (
            "Ours treats a 1x1 conv kernel (O, I, 1, 1) as the (O, I) matrix it is (P on the paper's smaller side, "
            "Adafactor's factored (m) + (r) accumulators). The paper's release projects it with Tucker-1 on the "
            "output mode, and Adafactor then factors over the trailing 1x1 axes, so its row and column "
            "accumulators are each as large as the moment. All of the difference is there, but for the release's "
            "4-byte RMS scalar per tensor (layer tables below). The release's threshold for dense kernels (<= 9216 entries; ours < 4096) changes "
            "nothing on these UNets: conv_in and conv_out have 3456 entries, every other kernel >= 32768."
        )
        notes["ddpm-release"] = (
            f"With the release's rules (paper_release_values) this UNet gives {release['coap_adamw']:.2f} "
            f"(COAP-AdamW) and {release['coap_adafactor']:.2f} {unit} (COAP-Adafactor), within 0.5% of the "
            "paper; that last residual we could not attribute."
        )
        notes["galore-ddpm"] = (
            "galore-torch 1.0 projects matrices only (its projector fails on conv kernels), so on a UNet, where "
            "conv kernels hold most of the weights, GaLore is close to AdamW. The paper's GaLore figures (above "
            "AdamW's for CIFAR-10) come from a GaLore variant for conv kernels that neither galore-torch nor the "
            "COAP release contains: not derivable. Ours also counts the full SVD factor that galore-torch's "
            "projector keeps a view of (k x n, k = min(m, n), not r x n)."
        )
    if study.key.startswith("llama"):
        rank = next(c.rank for c in study.cases if c.rank)
        release = _llama_release(study, model, rank)
        coap, coap32 = estimates.get(("coap_adamw", rank)), estimates.get(("coap_adamw", rank, "float32"))
        if coap is not None and coap32 is not None:
            holds = release["coap_adamw"][0]
            same = "the same bytes as" if coap.total == holds else f"{coap.total - holds:+,} bytes against"
            notes["llama-dtype"] = (
                "Precision: the paper's LLaMA runs are bf16 models, and the release keeps P and the moments in the "
                "parameters' bf16 (so AdamW's 4.99 GB: 2 bf16 moments per value). Ours is at that precision here, "
                f"state_dtype=torch.bfloat16: {coap.total / scale:.4f} {unit}, {same} the release "
                f"({holds / scale:.4f} {unit} by its rules, paper_release_llama_bytes). At the library's default "
                f"float32 state the same layout is {coap32.total / scale:.2f} {unit} (column 'ours, fp32 state')."
            )
        adam8 = estimates.get(("adamw8bit", None))
        if adam8 is not None:
            absmax = sum(v for k, v in adam8.by_key.items() if k.startswith(("absmax", "qmap")))
            notes["absmax"] = (
                "bitsandbytes keeps one float32 absmax per 256 values of each moment (+1.6%); the paper counts "
                f"2 bytes per parameter. Without absmax: {(adam8.total - absmax) / scale:.2f} {unit}."
            )
        coap8 = estimates.get(("coap_adamw8bit", rank))
        case8 = next((c for c in study.cases if c.optimizer == "coap_adamw8bit"), None)
        if coap8 is not None and case8 is not None:
            proj = coap8.by_key.get("proj", 0)
            codes = sum(v for k, v in coap8.by_key.items() if k.endswith("_codes"))
            absmax = sum(v for k, v in coap8.by_key.items() if k.endswith("_absmax"))
            holds, counts = release["coap_adamw8bit"]
            same = "the bytes the release holds" if coap8.total == holds else f"{coap8.total - holds:+,} bytes against"
            params, options = _inputs(study, model, case8)
            default_block = estimate_state_bytes(params, "coap_adamw8bit", **{**options, "block_size": 256})
            paper = f" (the paper's {case8.paper:g} {unit})" if case8.paper is not None else ""
            notes["llama-8bit"] = (
                f"At the release's configuration (P in bf16, 8-bit moments in blocks of {PAPER_BLOCK_SIZE} values, "
                f"every tensor's moments 8-bit) ours is {coap8.total / scale:.4f} {unit}, {same}: P "
                f"{proj / scale:.4f}, 8-bit codes {codes / scale:.4f}, absmax {absmax / scale:.4f} {unit}. The paper's "
                "figure is what the release's counter (show_memory_usage) prints, and it skips the absmax: "
                "bitsandbytes keeps it in a QuantState object next to the codes, which the counter counts as 0. "
                f"Without the absmax ours is {(coap8.total - absmax) / scale:.4f} {unit}, the release's count "
                f"{counts / scale:.4f} {unit}{paper}: the absmax ({absmax / coap8.total:.2%}), which the release "
                "holds too, is all the difference. With the library's default block_size=256 the absmax is 16 "
                "times larger: "
                f"{default_block.total / scale:.2f} {unit}; with float32 P (the library's default precision) "
                f"{estimates[('coap_adamw8bit', rank, 'float32')].total / scale:.2f} {unit}."
            )
    if study.key == "controlnet-sdxl":
        at2 = estimates.get(("coap_adafactor8bit", 2))
        notes["controlnet-8bit"] = (
            "The paper prints one decimal and names no rank ratio for this figure; of Table 1's ratios (2, 4, 8) "
            f"only 8 gives 0.5 GB (ratio 2 gives {at2.total / scale:.2f} {unit})."
            if at2 is not None
            else ""
        )
        notes["galore-controlnet"] = (
            "GaLore here is galore-torch on the matrices only (conv kernels dense) at r = min(m, n) // 2, with its "
            "projector counted as the full SVD factor it pins; the paper's GaLore setting for ControlNet is not "
            "given, so the figure is not derivable."
        )
    if study.key == "sit-xl-2":
        notes["sit"] = "The supplementary prints no memory figure for SiT-XL/2."
    notes["unexplained"] = "Not explained yet."
    return notes


def _llama_release(study: Study, model: nn.Module, rank: int) -> dict[str, tuple[int, int]]:
    """``(holds, counts)`` of the release's CoapAdamW and CoapAdamW8bit on this LLaMA, summed over its parameters."""
    from .llama_model import projected_parameter_groups

    projected = {id(p) for _, p in projected_parameter_groups(model, study.recipe).projected}
    totals: dict[str, tuple[int, int]] = {}
    for optimizer in ("coap_adamw", "coap_adamw8bit"):
        eight_bit = optimizer.endswith("8bit")
        pairs = [
            paper_release_llama_bytes(p.shape, rank if id(p) in projected else None, eight_bit=eight_bit)
            for p in model.parameters()
        ]
        totals[optimizer] = (sum(h for h, _ in pairs), sum(c for _, c in pairs))
    return totals


def _llama_layers(name: str, projected: bool) -> str:
    if projected:
        return "attention + MLP matrices (projected)"
    return "embeddings + lm_head" if name.endswith(("embed_tokens.weight", "lm_head.weight")) else "RMSNorm weights"


def _llama_breakdown(study: Study, model: nn.Module, estimates: dict[Any, Any]) -> list[dict[str, Any]]:
    """Layer-by-layer (by kind of layer) state of CoapAdamW and CoapAdamW8bit at the paper's precision on a
    LLaMA: ours against the bytes the release holds and the bytes its counter prints."""
    from .llama_model import projected_parameter_groups

    rank = next(c.rank for c in study.cases if c.rank)
    projected = {name for name, _ in projected_parameter_groups(model, study.recipe).projected}
    rows: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        layers = _llama_layers(name, name in projected)
        row = rows.setdefault(layers, {"layers": layers, "tensors": 0, "values": 0})
        row["tensors"] += 1
        row["values"] += param.numel()
        for optimizer in ("coap_adamw", "coap_adamw8bit"):
            estimate = estimates.get((optimizer, rank))
            if estimate is not None:
                row[optimizer] = row.get(optimizer, 0) + estimate.per_parameter[name]
            holds, counts = paper_release_llama_bytes(
                param.shape, rank if name in projected else None, eight_bit=optimizer.endswith("8bit"))  # fmt: skip
            row[f"{optimizer}_release"] = row.get(f"{optimizer}_release", 0) + holds
            row[f"{optimizer}_release_counted"] = row.get(f"{optimizer}_release_counted", 0) + counts
    return list(rows.values())


def _breakdown(study: Study, model: nn.Module, estimates: dict[Any, Any]) -> list[dict[str, Any]]:
    """Layer-by-layer (by kind of layer) COAP state: ours against the paper's release rules."""
    ratio = next(c.ratio for c in study.cases if c.optimizer == "coap_adamw")
    names = dict(model.named_parameters())
    rows: dict[str, dict[str, Any]] = {}
    for name, param in names.items():
        shape = tuple(param.shape)
        row = rows.setdefault(_category(shape), {"layers": _category(shape), "tensors": 0, "values": 0})
        row["tensors"] += 1
        row["values"] += param.numel()
        for optimizer in ("coap_adamw", "coap_adafactor"):
            estimate = estimates.get((optimizer, ratio))
            if estimate is not None:
                row[f"{optimizer}"] = row.get(optimizer, 0) + estimate.per_parameter[name]
            row[f"{optimizer}_release"] = row.get(f"{optimizer}_release", 0) + 4 * paper_release_values(
                shape, ratio, adafactor=optimizer == "coap_adafactor")  # fmt: skip
    return list(rows.values())


def run_memory(models: Sequence[str] = tuple(MODELS)) -> dict[str, Any]:
    """Estimate every case of every study in ``models``; rows, notes and layer tables as plain data."""
    rows, notes, breakdowns, built = [], {}, {}, {}
    for key in models:
        study = MODELS[key]
        try:
            model = study.build()
        except MissingExtraError as error:
            package = getattr(error.__cause__, "name", None) or str(error)
            rows.append({"model": key, "optimizer": "-", "setting": "-", "unit": study.unit, "paper": None,
                         "notes": [], "error": f"{package} not installed"})  # fmt: skip
            continue
        estimates, first = {}, len(rows)
        for case in study.cases:
            params, options = _inputs(study, model, case)
            try:
                _import_peer(case.optimizer)
                estimate = estimate_state_bytes(params, case.optimizer, **options)
            except ImportError as error:
                rows.append(_row(study, case, error=f"{error.name or error} not installed"))
                continue
            fp32 = None
            if case.ours:  # the library's default precision too
                fp32 = estimate
                if study.state_dtype != "float32":
                    params32, options32 = _inputs(study, model, case, state_dtype="float32")
                    fp32 = estimate_state_bytes(params32, case.optimizer, **options32)
                estimates[(case.optimizer, case.rank or case.ratio, "float32")] = fp32
            estimates[(case.optimizer, case.rank or case.ratio)] = estimate
            rows.append(_row(study, case, estimate, fp32=fp32))
        texts = _explain(study, model, estimates)
        if len(rows) > first:
            rows[first]["notes"] = [*study.notes, *rows[first]["notes"]]
        for row in rows[first:]:  # notes carry this model's numbers: keyed by model
            row["notes"] = [f"{key}:{name}" for name in row["notes"] if texts.get(name)]
            notes.update({name: texts[name.split(":", 1)[1]] for name in row["notes"]})
        if key.startswith("ddpm"):
            breakdowns[key] = _breakdown(study, model, estimates)
        elif key.startswith("llama"):
            breakdowns[key] = _llama_breakdown(study, model, estimates)
        built[key] = {"title": study.title, "parameters": sum(p.numel() for p in model.parameters()),
                      "state_dtype": study.state_dtype}  # fmt: skip
    return {
        "rows": rows,
        "notes": notes,
        "breakdowns": breakdowns,
        "models": built,
        "config": {
            "models": list(models),
            "coap_projection_side": PAPER_PROJECTION_SIDE,
            "coap_8bit_block_size": PAPER_BLOCK_SIZE,
        },
        "import_notes": import_notes(),
    }


def _import_peer(optimizer: str) -> None:
    """Import the peer package of ``optimizer`` quietly before ``estimate_state_bytes`` imports it, so that
    what it prints becomes a note; a missing one is left for ``estimate_state_bytes`` to report."""
    with contextlib.suppress(MissingExtraError):
        OPTIMIZERS[optimizer].import_modules()


# -- the report -----------------------------------------------------------------------------------
_LAYOUT = (
    f"COAP rows: projection_side={PAPER_PROJECTION_SIDE!r}, P on each matrix's smaller side as in the paper "
    f"(the library's default too); 8-bit rows quantize blocks of {PAPER_BLOCK_SIZE} values, the block of the "
    "release's quantizer (the library's default is 256)."
)
_PRECISION = (
    "Precision: 'ours' is at the precision of the paper's figures for the model: float32 state for the UNets, "
    "ControlNet and SiT (float32 weights); bf16 state for LLaMA (bf16 weights, whose state the release keeps in "
    "bf16), where our rows use state_dtype=torch.bfloat16 and the peers keep their state in the parameters' bf16 "
    "by themselves. 'ours, fp32 state' is our optimizers at the library's default float32 state. 'vs paper' "
    "compares 'ours' with the paper's figure at the digits the paper prints."
)
_UNITS = (
    'MB = 10^6 bytes. MiB / GiB = 2^20 / 2^30 bytes: the paper\'s "MB" / "GB", as its figures show '
    "(AdamW on the DDPM CIFAR-10 UNet: 35,746,307 values x 2 fp32 moments = 285,970,456 bytes = 272.72 MiB, "
    'the paper\'s "272.72 MB"; LLaMA-1B: 1,339,082,752 values x 2 bf16 moments = 4.99 GiB, its "4.99 GB").'
)


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_memory_report(run: dict[str, Any]) -> str:
    """The Markdown table of ``run`` (from :func:`run_memory`), its notes and the layer tables."""
    order = list(dict.fromkeys(run["notes"].values()))  # one footnote per distinct text
    lines = [
        "| model | optimizer | setting | ours (MB) | ours | paper | ours / paper | vs paper | ours, fp32 state | note |",
        "|---|---|---|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for row in run["rows"]:
        if row.get("error"):
            lines.append(f"| {row['model']} | {row['optimizer']} | {row['setting']} | - | - | "
                         f"{_cell(row['paper'])} | - | - | - | {row['error']} |")  # fmt: skip
            continue
        refs = " ".join(f"[{order.index(run['notes'][n]) + 1}]" for n in row["notes"])
        ours = f"{row['ours']:.2f} {row['unit']}"
        paper = f"{row['paper']:g} {row['unit']}" if row["paper"] is not None else "-"
        fp32 = f"{row['ours_fp32_state']:.2f} {row['unit']}" if row.get("ours_fp32_state") is not None else "-"
        lines.append(f"| {row['model']} | {row['optimizer']} | {row['setting']} | {row['bytes'] / 1e6:,.2f} | {ours} | "
                     f"{paper} | {_cell(row['ratio'], '.3f')} | {row.get('vs_paper', '-')} | {fp32} | "
                     f"{refs} |")  # fmt: skip
    lines += [
        "",
        *(f"{key}: {m['title']}, {m['parameters']:,} parameters, built on meta; the paper's precision: "
          f"{_PRECISION_OF[m.get('state_dtype', 'float32')]}." for key, m in run["models"].items()),
    ]  # fmt: skip
    lines += ["", _UNITS, _PRECISION, _LAYOUT]
    lines += [f"[{i}] {text}" for i, text in enumerate(order, 1)]
    notes = import_note_lines(run)  # what peers printed while imported, said once
    lines += ["", *notes] if notes else []
    for key, table in run["breakdowns"].items():
        llama = key.startswith("llama")
        title, header, keys = _LLAMA_TABLE if llama else _DDPM_TABLE
        lines += ["", f"COAP state of {key} by kind of layer, {title} (MiB):", "", header,
                  "|---|---:|---:|" + "---:|" * len(keys)]  # fmt: skip
        for row in table:
            mib = [_cell(row.get(k) if row.get(k) is None else row[k] / 2**20) for k in keys]
            lines.append(f"| {row['layers']} | {row['tensors']} | {row['values']:,} | {' | '.join(mib)} |")
    return "\n".join(lines)


_PRECISION_OF = {"float32": "float32 state", "bf16": "bf16 state (ours at state_dtype=torch.bfloat16)"}
_DDPM_TABLE = (
    "ours vs the paper's release rules",
    "| layers | tensors | values | COAP-AdamW ours | release | COAP-Adafactor ours | release |",
    ("coap_adamw", "coap_adamw_release", "coap_adafactor", "coap_adafactor_release"),
)
_LLAMA_TABLE = (
    "bf16 state, ours vs what the paper's release holds and what its counter prints",
    "| layers | tensors | values | COAP-AdamW ours | release | COAP-AdamW8bit ours | release holds | release counts |",
    ("coap_adamw", "coap_adamw_release", "coap_adamw8bit", "coap_adamw8bit_release", "coap_adamw8bit_release_counted"),
)
