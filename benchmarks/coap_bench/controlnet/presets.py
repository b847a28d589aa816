"""The presets and recipes of ``coap-bench controlnet``, and the options of one run (:class:`ControlNetConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ImageRunConfig, check_choice, override_settings
from ..memory import SDXL_UNET_CONFIG
from ..optimizers import LowRankSettings

__all__ = [
    "CONTROLNET_PRESETS",
    "CONTROLNET_RECIPES",
    "DEFAULT_CONTROLNET_OPTIMIZERS",
    "ControlNetConfig",
    "ControlNetPreset",
    "recipe_settings",
]


@dataclass(frozen=True)
class ControlNetPreset:
    """A ``UNet2DConditionModel`` configuration, the ControlNet made from it, and the run defaults.

    ``unet`` holds the ``UNet2DConditionModel`` keyword arguments beyond resolution and channels;
    ``conditioning_channels`` (ControlNet's ``conditioning_embedding_out_channels``) has one entry per
    resolution of the control encoder: one entry keeps the control map at the UNet's resolution (a
    pixel-space UNet), four downsample it 8 times (a latent UNet such as SDXL's). ``pretrain_*`` size the
    brief training of the frozen UNet on the same images; ``edge_threshold`` is the Sobel threshold of the
    control maps. ``memory_only`` presets are built on ``meta`` for their memory and train only from
    weights the user gives.
    """

    resolution: int
    channels: int
    unet: dict[str, Any]
    conditioning_channels: tuple[int, ...]
    lr: float
    batch_size: int
    steps: int
    pretrain_steps: int
    pretrain_lr: float
    samples: int
    sample_steps: int
    heldout_repeats: int = 1
    eval_batch_size: int = 256
    edge_threshold: float = 1.5
    memory_only: bool = False
    notes: str = ""

    def unet_config(self) -> dict[str, Any]:
        """The keyword arguments of ``diffusers.UNet2DConditionModel``."""
        return {
            "sample_size": self.resolution,
            "in_channels": self.channels,
            "out_channels": self.channels,
            **self.unet,
        }

    @property
    def prompt_dim(self) -> int:
        """The width of the prompt embedding the UNet cross-attends to (``cross_attention_dim``)."""
        return int(self.unet["cross_attention_dim"])


def _pixel_unet(channels: tuple[int, int], cross_attention_dim: int) -> dict[str, Any]:
    """A two-level pixel-space UNet: plain ResNet blocks at full resolution, cross-attention at half."""
    return {
        "block_out_channels": channels,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


#: Presets of ``coap-bench controlnet``.
CONTROLNET_PRESETS: dict[str, ControlNetPreset] = {
    "micro": ControlNetPreset(
        8,
        1,
        _pixel_unet((16, 32), 16),
        (8,),
        lr=1e-3,
        batch_size=16,
        steps=20,
        pretrain_steps=30,
        pretrain_lr=2e-3,
        samples=16,
        sample_steps=4,
        eval_batch_size=128,
        edge_threshold=1.0,
        notes="smoke tests only: 8x8, a few seconds on a CPU",
    ),
    "small": ControlNetPreset(
        16,
        1,
        _pixel_unet((24, 48), 24),
        (16,),
        lr=4e-3,
        batch_size=16,
        steps=100,
        pretrain_steps=800,
        pretrain_lr=2e-3,
        samples=64,
        sample_steps=10,
        heldout_repeats=1,
        notes="the default: 16x16 grayscale digits and their edge maps, about half a minute per run on one core",
    ),
    "sdxl": ControlNetPreset(
        128,
        4,
        {k: v for k, v in SDXL_UNET_CONFIG.items() if k not in ("sample_size", "in_channels", "out_channels")},
        (16, 32, 96, 256),
        lr=1e-5,
        batch_size=2,
        steps=10_000,
        pretrain_steps=0,
        pretrain_lr=0.0,
        samples=64,
        sample_steps=50,
        memory_only=True,
        notes="the paper's ControlNet-SDXL (1.25B trainable parameters): its memory from a meta build",
    ),
}
#: What ``coap-bench controlnet`` compares by default: the optimizers of the paper's ControlNet row and their peers.
DEFAULT_CONTROLNET_OPTIMIZERS = (
    "adamw",
    "adafactor",
    "adamw8bit",
    "galore_adafactor",
    "coap_adafactor",
    "coap_adafactor8bit",
    "coap_adamw",
)
#: The paper's ControlNet-SDXL settings (supplementary Table 1): rank ratio 2, T_u 8, lambda 10.
PAPER_RANK_RATIO = 2.0
PAPER_UPDATE_INTERVAL = 8
PAPER_REPROJECT_FACTOR = 10
#: GaLore's ``update_proj_gap`` in the paper recipe: T_u x lambda, so that GaLore recomputes its SVD exactly
#: when COAP does (COAP adds its Eq. 2 steps in between). GaLore's default 200 would refresh the projection
#: once in a run of the small preset's length, which compares a stale projection with a fresh one.
PAPER_PROJ_GAP = PAPER_UPDATE_INTERVAL * PAPER_REPROJECT_FACTOR
#: The library defaults, for ``drop-in``, with GaLore's own default gap.
DROP_IN_RANK_RATIO = 2.0
DROP_IN_PROJ_GAP = 200
#: The weight decay of every optimizer: diffusers' ControlNet training script's AdamW default.
WEIGHT_DECAY = 1e-2
#: The low-rank settings of each recipe of ``--recipe``, before the flags that override them.
_RECIPE_SETTINGS = {
    "paper": LowRankSettings(
        rank_ratio=PAPER_RANK_RATIO,
        update_interval=PAPER_UPDATE_INTERVAL,
        reproject_factor=PAPER_REPROJECT_FACTOR,
        scale=1.0,
        proj_gap=PAPER_PROJ_GAP,
        weight_decay=WEIGHT_DECAY,
    ),
    "drop-in": LowRankSettings(rank_ratio=DROP_IN_RANK_RATIO, proj_gap=DROP_IN_PROJ_GAP, weight_decay=WEIGHT_DECAY),
}
#: The recipes of ``--recipe``.
CONTROLNET_RECIPES = tuple(_RECIPE_SETTINGS)


@dataclass
class ControlNetConfig(ImageRunConfig):
    """Options of one ``coap-bench controlnet`` run (the command-line flags, same names).

    Options left ``None`` take their defaults from the preset and recipe (:meth:`resolved`); ``lr`` set
    applies to every optimizer. The frozen UNet is trained from ``unet_seed``, the same for every ``seed``
    (it stands for one pretrained model); ``pretrained`` is a diffusers ``UNet2DConditionModel`` folder used as the
    frozen UNet instead of the one pretrained here (cached under ``cache_dir``, default
    ``$COAP_TORCH_CACHE/controlnet``). ``isolate`` (default: on the CPU) runs each optimizer in a fresh
    process; ``stop_after`` ends each run after that many steps of this call (an interrupted run).
    """

    presets = CONTROLNET_PRESETS
    preset_kind = "ControlNet"
    recipes = CONTROLNET_RECIPES
    #: The edge F1 needs one sample, not two.
    min_samples = (1, "positive")

    preset: str = "small"
    optimizers: tuple[str, ...] = DEFAULT_CONTROLNET_OPTIMIZERS
    correlation_normalize: bool = False
    weight_decay: float = WEIGHT_DECAY
    pretrain_steps: int | None = None
    unet_seed: int = 0
    pretrained: str | None = None
    cache_dir: str | None = None

    def job_defaults(self) -> dict[str, Any]:
        pretrain_steps = self.pretrain_steps if self.pretrain_steps is not None else self.preset_spec.pretrain_steps
        return {**super().job_defaults(), "pretrain_steps": pretrain_steps}

    def recipe_defaults(self) -> LowRankSettings:
        return recipe_settings(self.recipe)


def recipe_settings(recipe: str, **options: Any) -> LowRankSettings:
    """The low-rank settings of ``recipe`` (``"paper"`` or ``"drop-in"``); any option given (a field of
    :class:`~coap_bench.optimizers.LowRankSettings`) overrides it.

    >>> s = recipe_settings("paper")
    >>> (s.rank_ratio, s.update_interval, s.reproject_factor, s.proj_gap, s.scale)
    (2.0, 8, 10, 80, 1.0)
    """
    check_choice(recipe, CONTROLNET_RECIPES, "recipe")
    return override_settings(_RECIPE_SETTINGS[recipe], **options)
