"""The presets and recipes of ``coap-bench sit``, each optimizer's low-rank settings, and the options of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ImageRunConfig, check_choice, override_settings
from ..frechet import CLASSIFIER_STEPS
from ..optimizers import LowRankSettings

__all__ = [
    "DEFAULT_SIT_OPTIMIZERS",
    "PAPER_RANK",
    "PAPER_SCHEDULES",
    "SIT_PRESETS",
    "SIT_RECIPES",
    "SitConfig",
    "SitPreset",
    "recipe_settings",
]


@dataclass(frozen=True)
class SitPreset:
    """A SiT configuration with the run defaults that go with it.

    The model: ``resolution`` x ``resolution`` inputs of ``channels`` channels cut into ``patch`` x
    ``patch`` tokens, ``depth`` blocks of width ``hidden`` with ``heads`` heads, ``num_classes`` labels,
    ``class_dropout`` the share of training labels replaced by the null class (for classifier-free
    guidance), ``learn_sigma`` the unused variance channels of the reference output layer.
    ``image_channels`` is what the images are read with when it differs from ``channels``: the 4-channel
    latent presets train on images with a fourth channel added (:func:`~coap_bench.sit.data.to_channels`),
    a stand-in for VAE latents. ``rank`` (absolute, the paper's) replaces the recipe's rank ratio.
    ``cpu_training``: whether a CPU run trains; otherwise it prints the planned optimizer state only.
    """

    resolution: int
    channels: int
    patch: int
    hidden: int
    depth: int
    heads: int
    lr: float
    batch_size: int
    steps: int
    samples: int
    sample_steps: int
    num_classes: int = 10
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    learn_sigma: bool = False
    image_channels: int | None = None
    rank: int | None = None
    sampler: str = "heun"
    heldout_repeats: int = 1
    eval_batch_size: int = 256
    cpu_training: bool = True
    notes: str = ""

    def model_config(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~coap_bench.sit.model.SiT`."""
        return {
            "input_size": self.resolution,
            "patch": self.patch,
            "in_channels": self.channels,
            "hidden": self.hidden,
            "depth": self.depth,
            "heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": self.num_classes,
            "null_class": self.class_dropout > 0,
            "learn_sigma": self.learn_sigma,
        }


#: Presets of ``coap-bench sit``.
SIT_PRESETS: dict[str, SitPreset] = {
    "micro": SitPreset(
        resolution=8,
        channels=1,
        patch=2,
        hidden=32,
        depth=2,
        heads=2,
        lr=1e-3,
        batch_size=16,
        steps=20,
        samples=32,
        sample_steps=3,
        eval_batch_size=128,
        notes="smoke tests only: a few seconds on a CPU",
    ),
    "small": SitPreset(
        resolution=8,
        channels=1,
        patch=2,
        hidden=128,
        depth=4,
        heads=4,
        lr=4e-3,
        batch_size=32,
        # Five of CoapAdamW's SVD refreshes (every T_u x lambda = 300 steps): at 300 steps its
        # first SVD would come at the last step, and no low-rank method can keep up in between.
        steps=1500,
        samples=256,
        sample_steps=8,
        heldout_repeats=4,
        notes="the default: SiT-S-like /2 on the 8x8 digits (16 tokens), 1.27M parameters, about 80 s a run on one core",
    ),
    "xl-2": SitPreset(
        resolution=32,
        channels=4,
        patch=2,
        hidden=1152,
        depth=28,
        heads=16,
        num_classes=1000,
        learn_sigma=True,
        image_channels=3,
        rank=512,
        lr=1e-4,
        batch_size=256,
        steps=400_000,
        samples=10_000,
        sample_steps=50,
        eval_batch_size=250,
        cpu_training=False,
        notes="the paper's SiT-XL/2 (675M parameters) on 32x32x4 inputs (256px latents): memory on a CPU, trains on a GPU",
    ),
}
#: The recipes of ``--recipe``.
SIT_RECIPES = ("paper", "drop-in")
#: What ``coap-bench sit`` compares by default: the optimizers of the paper's SiT-XL/2 table and the peers.
DEFAULT_SIT_OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", "galore_adamw", "coap_adamw", "coap_adafactor")
#: The paper's SiT-XL/2 rank (supplementary Table 1), for hidden size 1152: the scaled presets use the
#: same share of each matrix's smaller side, rank ratio 1152 / 512 = 2.25.
PAPER_RANK = 512
PAPER_RANK_RATIO = 1152 / PAPER_RANK
#: The paper's SiT-XL/2 schedules (supplementary Table 1), ``(T_u, lambda)`` by optimizer family:
#: CoapAdamW T_u 30 and lambda 10, CoapAdafactor T_u 200 and lambda 5 (the 8-bit variants as their base).
PAPER_SCHEDULES = {"adamw": (30, 10), "adafactor": (200, 5)}
#: GaLore's ``update_proj_gap`` in both recipes (GaLore's default; the paper gives none for SiT).
PROJ_GAP = 200
#: The library defaults, for ``drop-in``.
DROP_IN_RANK_RATIO = 2.0
DROP_IN_SCHEDULE = (32, 5)


def _family_schedule(name: str) -> tuple[int, int]:
    """The paper's (T_u, lambda) of optimizer ``name``: Adafactor's for the Adafactor-based COAP optimizers,
    AdamW's for the others (only COAP's optimizers read them)."""
    return PAPER_SCHEDULES["adafactor" if "adafactor" in name else "adamw"]


def recipe_settings(recipe: str, name: str = "coap_adamw", **options: Any) -> LowRankSettings:
    """The low-rank settings of optimizer ``name`` under ``recipe``; any option given (a field of
    :class:`~coap_bench.optimizers.LowRankSettings`) overrides them.

    >>> s = recipe_settings("paper", "coap_adafactor")
    >>> (s.update_interval, s.reproject_factor, s.rank_ratio)
    (200, 5, 2.25)
    >>> recipe_settings("paper", "coap_adamw", rank=512).rank
    512
    """
    check_choice(recipe, SIT_RECIPES, "recipe")
    if recipe == "paper":
        interval, factor = _family_schedule(name)
        base = LowRankSettings(
            rank_ratio=PAPER_RANK_RATIO,
            update_interval=interval,
            reproject_factor=factor,
            scale=1.0,
            proj_gap=PROJ_GAP,
            weight_decay=0.0,
        )
    else:
        interval, factor = DROP_IN_SCHEDULE
        base = LowRankSettings(
            rank_ratio=DROP_IN_RANK_RATIO,
            update_interval=interval,
            reproject_factor=factor,
            proj_gap=PROJ_GAP,
            weight_decay=0.0,
        )
    return override_settings(base, **options)


@dataclass
class SitConfig(ImageRunConfig):
    """Options of one ``coap-bench sit`` run (the command-line flags, same names).

    Options left ``None`` take their defaults from the preset and recipe (:meth:`resolved`); ``lr`` set
    applies to every optimizer; ``rank`` (absolute) wins over ``rank_ratio`` and the preset's rank.
    ``isolate`` (default: on the CPU) runs each optimizer in a fresh process; ``threads`` sets
    ``torch.set_num_threads`` for the runs. ``stop_after`` ends each run after that many steps of this call
    (checkpointing as usual), to simulate an interruption. ``plots`` is where each run's sample grid goes.
    ``cfg_scale`` above 1 samples with classifier-free guidance (needs ``class_dropout`` > 0 in the preset).
    """

    presets = SIT_PRESETS
    preset_kind = "SiT"
    recipes = SIT_RECIPES

    preset: str = "small"
    optimizers: tuple[str, ...] = DEFAULT_SIT_OPTIMIZERS
    rank: int | None = None
    correlation_normalize: bool = False
    projection_side: str | None = None
    image_dir: str | None = None
    max_images: int | None = None
    sampler: str | None = None
    cfg_scale: float = 1.0
    classifier_steps: int = CLASSIFIER_STEPS

    def memory_only(self) -> bool:
        """Whether this run prints the planned optimizer state instead of training (a GPU preset on a CPU)."""
        return not self.preset_spec.cpu_training and torch.device(self.device).type == "cpu"

    def job_defaults(self) -> dict[str, Any]:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        sampler = self.sampler or self.preset_spec.sampler
        if sampler not in ("euler", "heun"):
            raise ValueError(f"unknown sampler {sampler!r}; choose euler or heun")
        if self.cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1 (1: no guidance), got {self.cfg_scale}")
        if self.cfg_scale > 1 and self.preset_spec.class_dropout == 0:
            raise ValueError(f"the {self.preset} preset trains no null class: classifier-free guidance needs one")
        return {**super().job_defaults(), "sampler": sampler}

    def settings(self, name: str = "coap_adamw") -> LowRankSettings:
        """The :class:`~coap_bench.optimizers.LowRankSettings` of optimizer ``name`` (recipe, preset rank,
        overrides): COAP's T_u and lambda depend on the optimizer under the ``paper`` recipe."""
        base = dataclasses.replace(recipe_settings(self.recipe, name), rank=self.preset_spec.rank)
        return override_settings(base, **self.low_rank_options())
