"""The COAP options: one typed description of the per-group settings every COAP optimizer takes.

:class:`CoapOptions` lists each option once, with its type and default; the constructors take
them as keywords (``**options``) and show them in their signature (:func:`with_options`), the
param-group defaults and the checks come from the same fields. Options that only one storage
has (the 8-bit ``block_size``, ``min_8bit_size``) are described by that storage the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ..functional.correlation import DEFAULT_CORRELATION_LR, DEFAULT_CORRELATION_MAX_NORM
from . import _validation as check
from ._layout import CONV_PROJECTIONS, PROJECTION_SIDES
from ._storage import parse_state_dtype

__all__ = [
    "COAP_DEFAULTS",
    "COAP_OPTIONS",
    "DEFAULT_MIN_CONV_NUMEL",
    "UPDATE_OPTIONS",
    "CoapOptions",
    "defaults_of",
    "take_options",
    "with_options",
]

#: Kernels with fewer entries stay dense: below 4096 values the state saved is under 32 KB,
#: while each refresh still runs a QR and an SVD per mode.
DEFAULT_MIN_CONV_NUMEL = 4096


@dataclasses.dataclass(frozen=True)
class CoapOptions:
    """The COAP settings of a param group (see the README's table of arguments)."""

    rank: int | None = None
    rank_ratio_matrix: float | None = None
    rank_ratio_cnn: float | None = None
    update_interval: int = 32
    reproject_factor: int = 5
    correlation_lr: float = DEFAULT_CORRELATION_LR
    correlation_normalize: bool = False
    correlation_max_norm: float | None = DEFAULT_CORRELATION_MAX_NORM
    scale: float | str = "auto"
    min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL
    seed: int = 0
    coap: bool = True
    projection_side: str | None = None
    conv_projection: str = "tucker2"
    state_dtype: torch.dtype | str = torch.float32

    @staticmethod
    def check(group: Mapping[str, Any]) -> None:
        """Refuse a group whose COAP options are out of range, naming the option and the value."""
        check.positive_int("rank", group["rank"], optional=True)
        check.at_least_one("rank_ratio_matrix", group["rank_ratio_matrix"], optional=True)
        check.at_least_one("rank_ratio_cnn", group["rank_ratio_cnn"], optional=True)
        check.positive_int("update_interval", group["update_interval"])
        check.positive_int("reproject_factor", group["reproject_factor"])
        check.non_negative("correlation_lr", group["correlation_lr"])
        check.boolean("correlation_normalize", group["correlation_normalize"])
        if group["correlation_max_norm"] is not None:
            check.positive_or_inf("correlation_max_norm", group["correlation_max_norm"])
        check.positive_or_auto("scale", group["scale"])
        check.non_negative_int("min_conv_numel", group["min_conv_numel"])
        check.non_negative_int("seed", group["seed"])
        check.boolean("coap", group["coap"])
        if group["projection_side"] not in PROJECTION_SIDES:
            raise ValueError(
                f"Invalid projection_side: {group['projection_side']!r} (must be one of {PROJECTION_SIDES})"
            )
        parse_state_dtype(group["state_dtype"])
        if group["conv_projection"] not in CONV_PROJECTIONS:
            raise ValueError(
                f"Invalid conv_projection: {group['conv_projection']!r} (must be one of {CONV_PROJECTIONS})"
            )


def defaults_of(description: type | None) -> dict[str, Any]:
    """Each option of a description (a dataclass, or ``None`` for none) and its default."""
    if description is None:
        return {}
    return {field.name: field.default for field in dataclasses.fields(description)}


#: Each COAP option and its default (the param-group defaults of every COAP optimizer).
COAP_DEFAULTS: dict[str, Any] = defaults_of(CoapOptions)

#: The COAP options: at load, an optimizer keeps its own values of these (see ``load_state_dict``),
#: except :data:`UPDATE_OPTIONS`.
COAP_OPTIONS: tuple[str, ...] = tuple(COAP_DEFAULTS)

#: COAP options that size the update and leave the state as it is: at load they come from the
#: checkpoint, as ``lr`` does, so that a run resumes with the update it was trained with. Each
#: maps to its value in checkpoints of versions that did not save it (they did not scale).
UPDATE_OPTIONS: dict[str, Any] = {"scale": 1.0}


def take_options(owner: str, given: Mapping[str, Any], *descriptions: type | None) -> dict[str, Any]:
    """The options of ``descriptions`` (dataclasses), their defaults overridden by ``given``.

    A name that none of them has raises ``TypeError`` as Python does for an unknown keyword.
    """
    defaults: dict[str, Any] = {}
    for description in descriptions:
        defaults.update(defaults_of(description))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    return {**defaults, **given}


F = TypeVar("F", bound=Callable[..., Any])


def with_options(*descriptions: type, like: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Show the options of ``descriptions`` in the signature of an ``__init__(..., **options)``.

    They become keyword-only parameters with their types and defaults, in place of
    ``**options``, so that ``help()``, ``inspect.signature`` and editors list them. With
    ``like``, the signature starts from that function's (a variant that only adds options).
    """

    def decorate(init: F) -> F:
        signature = inspect.signature(like if like is not None else init)
        parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in parameters}
        for description in descriptions:
            for field in dataclasses.fields(description):
                if field.name not in taken:
                    parameters.append(
                        inspect.Parameter(
                            field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.type
                        )
                    )
                    taken.add(field.name)
        init.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return init

    return decorate
