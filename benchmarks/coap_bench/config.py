"""The options the training jobs of ``coap-bench`` share (:class:`RunConfig`, :class:`ImageRunConfig`): the
optimizers, the low-rank recipe and the flags that override it, the schedule, seeds, device and checkpoints,
with the checks and defaults that go with them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .optimizers import OPTIMIZERS, PROJECTION_SIDES, STATE_DTYPES, LowRankSettings

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["RECIPE_OVERRIDES", "ImageRunConfig", "RunConfig", "check_choice", "override_settings"]

#: Low-rank settings that a flag left ``None`` leaves to the recipe; the others are always the run's.
RECIPE_OVERRIDES = ("rank", "rank_ratio", "update_interval", "reproject_factor", "scale", "proj_gap")
_LOW_RANK_FIELDS = frozenset(f.name for f in dataclasses.fields(LowRankSettings))


def check_choice(value: Any, choices: Iterable[Any], what: str) -> None:
    """Raise :class:`ValueError` unless ``value`` is one of ``choices`` (``what`` names it in the message)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def override_settings(base: LowRankSettings, **options: Any) -> LowRankSettings:
    """``base`` (a recipe's settings) with ``options`` (fields of :class:`LowRankSettings`) in place.

    Options of :data:`RECIPE_OVERRIDES` count only when not ``None``. A ``rank_ratio`` given without a
    ``rank`` drops the recipe's absolute rank, which would win over it.
    """
    given = {name: value for name, value in options.items() if value is not None or name not in RECIPE_OVERRIDES}
    if given.get("rank_ratio") is not None and given.get("rank") is None:
        given["rank"] = None
    return dataclasses.replace(base, **given)


@dataclass
class RunConfig:
    """The options every training job has (the command-line flags, same names).

    A job's config extends this with its own options, sets the class attributes below, and gives
    :meth:`recipe_defaults` (its recipe's low-rank settings) and :meth:`job_defaults` (its own checks
    and defaults). Options left ``None`` take their defaults from the preset and recipe
    (:meth:`resolved`); ``lr`` set applies to every optimizer. ``isolate`` (default: on the CPU) runs
    each optimizer in a fresh process. ``stop_after`` ends each run after that many steps of this call
    (checkpointing as usual): it simulates an interrupted run.
    """

    #: The job's presets (``--preset``) and what the error message of an unknown one calls them.
    presets: ClassVar[Mapping[str, Any]] = {}
    preset_kind: ClassVar[str] = ""
    #: The job's recipes (``--recipe``).
    recipes: ClassVar[tuple[str, ...]] = ()
    #: What ``optimizers`` may name.
    known_optimizers: ClassVar[Mapping[str, Any]] = OPTIMIZERS

    preset: str = ""
    steps: int | None = None
    batch_size: int | None = None
    optimizers: tuple[str, ...] = ()
    recipe: str = "paper"
    rank_ratio: float | None = None
    update_interval: int | None = None
    reproject_factor: int | None = None
    scale: float | str | None = None
    proj_gap: int | None = None
    state_dtype: str = "float32"
    weight_decay: float = 0.0
    lr: float | None = None
    lr_sweep: bool = False
    warmup_steps: int | None = None
    seed: int = 0
    seeds: int = 1
    device: str = "cpu"
    isolate: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    stop_after: int | None = None
    progress: bool = True
    argv: list[str] = field(default_factory=list)

    @property
    def preset_spec(self) -> Any:
        return self.presets[self.preset]

    def resolved(self) -> Self:
        """A copy with every ``None`` default filled in; raises :class:`ValueError` on bad options."""
        self.check_options()
        steps = self.steps if self.steps is not None else self.preset_spec.steps
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        warmup = self.warmup_steps if self.warmup_steps is not None else min(max(1, steps // 10), steps - 1)
        if warmup >= steps and warmup > 0:
            raise ValueError(f"warmup_steps ({warmup}) must be smaller than steps ({steps})")
        return dataclasses.replace(
            self,
            steps=steps,
            optimizers=tuple(self.optimizers),
            warmup_steps=warmup,
            isolate=torch.device(self.device).type == "cpu" if self.isolate is None else self.isolate,
            **self.job_defaults(),
        )

    def check_options(self) -> None:
        """Raise :class:`ValueError` on a shared option out of range (``threads`` and ``projection_side``
        where the job has them)."""
        check_choice(self.preset, self.presets, f"{self.preset_kind} preset")
        check_choice(self.recipe, self.recipes, "recipe")
        if not self.optimizers:
            raise ValueError("no optimizer to run")
        unknown = [name for name in self.optimizers if name not in self.known_optimizers]
        if unknown:
            known = ", ".join(self.known_optimizers)
            raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown))}; known: {known}")
        if self.rank_ratio is not None and self.rank_ratio < 1:
            raise ValueError(f"rank_ratio must be >= 1, got {self.rank_ratio}")
        side = getattr(self, "projection_side", None)
        if side is not None:
            check_choice(side, PROJECTION_SIDES, "projection_side")
        check_choice(self.state_dtype, STATE_DTYPES, "state_dtype")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        threads = getattr(self, "threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")

    def job_defaults(self) -> dict[str, Any]:
        """The job's own options resolved (its checks raise :class:`ValueError`), for :meth:`resolved`."""
        return {}

    def recipe_defaults(self) -> LowRankSettings:
        """The low-rank settings of this run's recipe, before the options that override it."""
        raise NotImplementedError

    def low_rank_options(self) -> dict[str, Any]:
        """This run's options that are also fields of :class:`LowRankSettings`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _LOW_RANK_FIELDS}

    def settings(self) -> LowRankSettings:
        """The :class:`~coap_bench.optimizers.LowRankSettings` of this run (recipe + overrides)."""
        return override_settings(self.recipe_defaults(), **self.low_rank_options())

    def lr_for(self, name: str) -> float:
        """The peak lr of optimizer ``name``: ``lr`` if given, else the preset's (the same for every optimizer)."""
        return self.lr if self.lr is not None else self.preset_spec.lr


@dataclass
class ImageRunConfig(RunConfig):
    """The options of the jobs that train an image generator and score its samples (ddpm, controlnet, sit).

    ``threads`` sets ``torch.set_num_threads`` for the runs (default: torch's choice); ``plots`` is where
    the sample grid of each run is written (with matplotlib installed).
    """

    #: The fewest samples a run scores, and how the error message says it.
    min_samples: ClassVar[tuple[int, str]] = (2, "at least 2 (a covariance needs two)")

    threads: int | None = None
    plots: str | None = None
    samples: int | None = None
    sample_steps: int | None = None
    heldout_repeats: int | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None

    def job_defaults(self) -> dict[str, Any]:
        preset = self.preset_spec
        samples = self.samples if self.samples is not None else preset.samples
        least, rule = self.min_samples
        if samples < least:
            raise ValueError(f"samples must be {rule}, got {samples}")
        return {
            "batch_size": self.batch_size or preset.batch_size,
            "samples": samples,
            "sample_steps": self.sample_steps or preset.sample_steps,
            "heldout_repeats": self.heldout_repeats or preset.heldout_repeats,
            "eval_batch_size": self.eval_batch_size or preset.eval_batch_size,
        }
