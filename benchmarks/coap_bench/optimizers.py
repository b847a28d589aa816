"""The optimizers ``coap-bench`` knows: ours and the peers a user would pick instead.

Each entry of :data:`OPTIMIZERS` is an :class:`OptimizerSpec`; :func:`build_optimizer` makes one
from a run's parameters, split into the ones a low-rank method projects and the ones it trains
densely, and the run's :class:`LowRankSettings`. The split and the settings are the same for
every low-rank method (COAP, GaLore, APOLLO), so that memory is equal and only the method
differs; dense optimizers get every parameter.

Peers come from their own packages (optional extras, imported quietly when a run uses them, never copied):
``torch`` (AdamW, also its ``foreach`` and ``fused`` implementations), ``transformers``
(Adafactor), ``bitsandbytes`` (AdamW8bit), ``galore-torch`` (GaLore AdamW, AdamW8bit and
Adafactor) and ``apollo-torch`` (APOLLO; its licence is non-commercial, so it is only ever an
optional peer of the benchmark, installed by the user).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coap_torch.functional import norm_matched_scale
from coap_torch.optim import COAP_DEFAULTS, CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

from ._deps import require

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "OPTIMIZERS",
    "PROJECTION_SIDES",
    "STATE_DTYPES",
    "LowRankSettings",
    "OptimizerSpec",
    "build_optimizer",
    "parse_optimizer_names",
]

#: The rank ratio the optimizers use when ``rank_ratio_matrix`` / ``rank_ratio_cnn`` are left unset (the
#: README's default, ``rank = min(m, n) // 2``; a test checks it against the optimizers' planned state).
DEFAULT_RANK_RATIO = 2.0
#: The values of COAP's ``projection_side`` option a run may set (``None`` leaves the library's default).
PROJECTION_SIDES = ("smaller", "input", "larger")
#: The values of COAP's ``state_dtype`` option a run may set: ``"float32"`` (the library's default) or
#: ``"bf16"`` (``P`` and every moment not stored 8-bit in bfloat16).
STATE_DTYPES = ("float32", "bf16")

Params = Sequence[nn.Parameter]
Factory = Callable[[Params, Params, float, "LowRankSettings"], torch.optim.Optimizer]


@dataclass(frozen=True)
class LowRankSettings:
    """What a benchmark run tells every optimizer factory.

    ``rank`` (an absolute rank for every projected matrix) wins over ``rank_ratio`` (``rank =
    min(m, n) // rank_ratio``, the library's ``rank_ratio_matrix``). ``update_interval`` and
    ``reproject_factor`` are COAP's T_u and lambda; ``proj_gap`` is GaLore's and APOLLO's
    ``update_proj_gap``; ``scale`` multiplies the update of projected weights for all of them
    (the library's default unless a recipe sets it). ``"auto"`` is COAP's norm-matched scale,
    ``sqrt(n / r)`` per matrix; GaLore and APOLLO get the same factor per matrix (:meth:`scale_of`).
    ``projection_side`` and ``conv_projection`` are COAP's options of the same names (``None``
    leaves them to the library). ``state_dtype`` is COAP's option of that name, given to every
    group of a COAP optimizer (its dense group too) and ignored by the peers.
    """

    rank_ratio: float | None = DEFAULT_RANK_RATIO
    rank: int | None = None
    update_interval: int = 32
    reproject_factor: int = 5
    scale: float | str = COAP_DEFAULTS["scale"]
    proj_gap: int = 200
    correlation_normalize: bool = False
    weight_decay: float = 0.01
    seed: int = 0
    projection_side: str | None = None
    conv_projection: str | None = None
    state_dtype: str = "float32"

    def rank_of(self, shape: Sequence[int]) -> int:
        """The rank a low-rank method uses for a matrix of ``shape`` (the rule of ``rank_ratio_matrix``)."""
        if self.rank is not None:
            return int(self.rank)
        ratio = self.rank_ratio if self.rank_ratio is not None else DEFAULT_RANK_RATIO
        return max(1, int(min(shape[-2], shape[-1]) // ratio))

    def scale_of(self, shape: Sequence[int]) -> float:
        """The update scale of a projected matrix of ``shape`` for GaLore and APOLLO: ``scale``, or
        for ``"auto"`` COAP's norm-matched ``sqrt(n / r)`` with ``n`` the smaller side, the one
        their ``std`` projection reduces (as COAP's default ``projection_side`` does)."""
        if isinstance(self.scale, str):
            return norm_matched_scale((min(shape[-2], shape[-1]),), (self.rank_of(shape),))
        return float(self.scale)

    def coap_options(self) -> dict[str, Any]:
        ratio = self.rank_ratio if self.rank_ratio is not None else DEFAULT_RANK_RATIO
        options: dict[str, Any] = {
            "rank_ratio_cnn": ratio,
            "update_interval": self.update_interval,
            "reproject_factor": self.reproject_factor,
            "scale": self.scale,
            "correlation_normalize": self.correlation_normalize,
            "seed": self.seed,
        }
        if self.rank is not None:
            options["rank"] = int(self.rank)
        else:
            options["rank_ratio_matrix"] = ratio
        if self.projection_side is not None:
            options["projection_side"] = self.projection_side
        if self.conv_projection is not None:
            options["conv_projection"] = self.conv_projection
        return options

    def state_options(self) -> dict[str, Any]:
        """COAP's options for every group, projected or dense: ``state_dtype`` when not the library's
        default (float32)."""
        return {} if self.state_dtype == "float32" else {"state_dtype": self.state_dtype}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the benchmarks.

    ``family`` is ``"dense"``, ``"coap"``, ``"galore"`` or ``"apollo"``; ``package`` names what
    to ``pip install`` when it is a peer; ``refreshes_at`` tells, for a 1-based step, whether the
    optimizer refreshes its projection there (used to time the refreshes from step times).
    ``state_classes`` are the dotted names of the non-tensor objects the optimizer keeps in its
    state (GaLore's projector): checkpoints allowlist them for ``torch.load(weights_only=True)``.
    ``modules`` are the modules of :attr:`package` that ``build`` imports (:meth:`import_modules`).
    """

    name: str
    family: str
    description: str
    build: Factory
    package: str | None = None
    state_classes: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    def import_modules(self) -> None:
        """Import :attr:`modules` quietly (what they print becomes notes), for code that then imports them
        itself; raises :class:`~coap_bench._deps.MissingExtraError` when one is missing."""
        for module in self.modules:
            require(module, package=self.package)

    def safe_globals(self) -> list[type]:
        """The classes of :attr:`state_classes`, imported (for ``torch.serialization.safe_globals``)."""
        classes = []
        for dotted in self.state_classes:
            module, _, name = dotted.rpartition(".")
            classes.append(getattr(require(module, package=self.package), name))
        return classes

    def refreshes_at(self, step: int, settings: LowRankSettings) -> bool:
        if self.family == "coap":  # init at step 1, then Eq. 2 or the SVD at multiples of T_u
            return step == 1 or step % settings.update_interval == 0
        if self.family in ("galore", "apollo"):  # their counter starts at 0: steps 1, gap + 1, ...
            return (step - 1) % settings.proj_gap == 0
        return False


# ------------------------------------------------------------------------------------------ factories

#: Adafactor runs use the external lr schedule of the AdamW runs and a first moment (the paper's
#: setting, where COAP saves memory on Adafactor): the comparison is then only the method.
ADAFACTOR_OPTIONS = {"relative_step": False, "scale_parameter": False, "warmup_init": False, "beta1": 0.9}


def _everything(projected: Params, dense: Params) -> list[nn.Parameter]:
    return [*projected, *dense]


def _torch_adamw(**flags: Any) -> Factory:
    def build(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_everything(projected, dense), lr=lr, weight_decay=s.weight_decay, **flags)

    return build


def _transformers_adafactor(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
    optimization = require("transformers.optimization", package="transformers")
    return optimization.Adafactor(
        _everything(projected, dense), lr=lr, weight_decay=s.weight_decay, **ADAFACTOR_OPTIONS
    )


def _bnb_adamw8bit(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
    bnb = require("bitsandbytes", hint="pip install bitsandbytes")
    return bnb.optim.AdamW8bit(_everything(projected, dense), lr=lr, weight_decay=s.weight_decay)


def _coap(cls: type[torch.optim.Optimizer], **extra: Any) -> Factory:
    def build(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
        groups = [{"params": list(projected), **s.coap_options()}]
        if dense:
            groups.append({"params": list(dense), "coap": False})
        return cls(groups, lr=lr, weight_decay=s.weight_decay, **s.state_options(), **extra)

    return build


def low_rank_groups(
    projected: Params, dense: Params, settings: LowRankSettings, **options: Any
) -> list[dict[str, Any]]:
    """Param groups in the GaLore / APOLLO convention: a group with a ``rank`` key is projected.

    The projected set is the one COAP projects from ``projected``: matrices whose smaller side
    exceeds their rank (one group per distinct rank and update scale, :meth:`LowRankSettings.scale_of`).
    Everything else, conv kernels included (neither method projects them), goes in a last group
    without ``rank``.
    """
    by_rank: dict[tuple[int, float], list[nn.Parameter]] = {}
    rest = list(dense)
    for param in projected:
        rank = settings.rank_of(param.shape) if param.ndim == 2 else None
        if rank is not None and min(param.shape) > rank:
            by_rank.setdefault((rank, settings.scale_of(param.shape)), []).append(param)
        else:
            rest.append(param)
    groups: list[dict[str, Any]] = [
        {"params": params, "rank": rank, "scale": scale, **options} for (rank, scale), params in by_rank.items()
    ]
    if rest:
        groups.append({"params": rest})
    return groups


def _galore(class_name: str, **extra: Any) -> Factory:
    def build(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
        galore = require("galore_torch", package="galore-torch", hint="pip install galore-torch")
        groups = low_rank_groups(projected, dense, s, update_proj_gap=s.proj_gap, proj_type="std")
        return getattr(galore, class_name)(groups, lr=lr, weight_decay=s.weight_decay, **extra)

    return build


def _apollo(projected: Params, dense: Params, lr: float, s: LowRankSettings) -> torch.optim.Optimizer:
    apollo = require("apollo_torch", package="apollo-torch", hint="pip install apollo-torch (non-commercial licence)")
    groups = low_rank_groups(
        projected,
        dense,
        s,
        proj="random",
        scale_type="channel",
        update_proj_gap=s.proj_gap,
        proj_type="std",
    )
    return apollo.APOLLOAdamW(groups, lr=lr, weight_decay=s.weight_decay)


_GALORE_STATE = ("galore_torch.galore_projector.GaLoreProjector",)
_GALORE = ("galore_torch",)

_SPECS = [
    OptimizerSpec("adamw", "dense", "torch.optim.AdamW, default implementation", _torch_adamw()),
    OptimizerSpec("adamw_foreach", "dense", "torch.optim.AdamW(foreach=True)", _torch_adamw(foreach=True)),
    OptimizerSpec("adamw_fused", "dense", "torch.optim.AdamW(fused=True)", _torch_adamw(fused=True)),
    OptimizerSpec(
        "adamw8bit", "dense", "bitsandbytes.optim.AdamW8bit", _bnb_adamw8bit, "bitsandbytes", modules=("bitsandbytes",)
    ),
    OptimizerSpec(
        "adafactor",
        "dense",
        "transformers.optimization.Adafactor (beta1=0.9, external lr)",
        _transformers_adafactor,
        "transformers",
        modules=("transformers.optimization",),
    ),
    OptimizerSpec("coap_adamw", "coap", "coap_torch.CoapAdamW", _coap(CoapAdamW)),
    OptimizerSpec("coap_adamw8bit", "coap", "coap_torch.CoapAdamW8bit", _coap(CoapAdamW8bit)),
    OptimizerSpec(
        "coap_adafactor",
        "coap",
        "coap_torch.CoapAdafactor (beta1=0.9, external lr)",
        _coap(CoapAdafactor, **ADAFACTOR_OPTIONS),
    ),
    OptimizerSpec(
        "coap_adafactor8bit",
        "coap",
        "coap_torch.CoapAdafactor8bit (beta1=0.9, external lr)",
        _coap(CoapAdafactor8bit, **ADAFACTOR_OPTIONS),
    ),
    OptimizerSpec(
        "galore_adamw",
        "galore",
        "galore_torch.GaLoreAdamW",
        _galore("GaLoreAdamW", no_deprecation_warning=True),
        "galore-torch",
        _GALORE_STATE,
        _GALORE,
    ),
    OptimizerSpec(
        "galore_adamw8bit",
        "galore",
        "galore_torch.GaLoreAdamW8bit",
        _galore("GaLoreAdamW8bit"),
        "galore-torch",
        _GALORE_STATE,
        _GALORE,
    ),
    OptimizerSpec(
        "galore_adafactor",
        "galore",
        "galore_torch.GaLoreAdafactor (beta1=0.9, external lr)",
        _galore("GaLoreAdafactor", **ADAFACTOR_OPTIONS),
        "galore-torch",
        _GALORE_STATE,
        _GALORE,
    ),
    OptimizerSpec(
        "apollo_adamw",
        "apollo",
        "apollo_torch.APOLLOAdamW (random projection, channel scaling)",
        _apollo,
        "apollo-torch",
        ("apollo_torch.random_projector.GradientProjector", "apollo_torch.svd_projector.GaLoreProjector"),
        ("apollo_torch",),
    ),
]

#: name -> :class:`OptimizerSpec`. Add an optimizer with one line in ``_SPECS``.
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _SPECS}

#: What `coap-bench digits` runs by default: ours, each next to its dense counterpart.
DEFAULT_OPTIMIZERS = ("adamw", "coap_adamw", "coap_adamw8bit", "adafactor", "coap_adafactor", "coap_adafactor8bit")


def build_optimizer(
    name: str, projected: Params, dense: Params, lr: float, settings: LowRankSettings
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``projected`` (what low-rank methods may project) and ``dense`` parameters."""
    try:
        spec = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    return spec.build(list(projected), list(dense), lr, settings)


def parse_optimizer_names(text: str) -> list[str]:
    """``"adamw, coap_adamw"`` -> ``["adamw", "coap_adamw"]``; unknown names raise :class:`ValueError`."""
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no optimizer named in {text!r}; known: {', '.join(OPTIMIZERS)}")
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer {', '.join(repr(n) for n in unknown)}; known: {', '.join(OPTIMIZERS)}")
    return names
