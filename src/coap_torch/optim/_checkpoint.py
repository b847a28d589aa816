"""What ``load_state_dict`` accepts: a saved parameter state checked against the planned one.

The planned state of a parameter (:meth:`LowRankOptimizer.planned_state`: keys, shapes and
dtypes from its shape and its group's options) is the contract. A saved state loads when it has
exactly the planned keys and shapes; it is then converted the way ``torch.optim.AdamW`` converts
(floating-point tensors to the planned dtype, a ``step`` stored as a Python number or a float
tensor to the exact integer counter) and copied to the parameter's device. Anything else is
refused before the optimizer changes, naming the parameter, the key and what was expected: a
checkpoint that loads never fails at a later step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _placement as placement
from . import _validation as check
from ._layout import earlier_default
from ._options import UPDATE_OPTIONS
from ._refresh import caller_stacklevel

#: Saved entries that are dropped at load: transformers' Adafactor keeps ``RMS``, the weight's
#: RMS of the last step, recomputed at every step (dense Adafactor state is otherwise the same).
DERIVED_KEYS = frozenset({"RMS"})

#: State keys that hold projections: they must be finite (a NaN ``P`` would poison every refresh).
FACTOR_KEYS = ("proj", "proj_out", "proj_in")


class CheckpointError(ValueError):
    """A saved optimizer state that does not fit the parameter it would be loaded into."""


def new_step_counter(value: int = 0) -> Tensor:
    """The per-parameter step counter: an exact integer on the CPU.

    A float32 counter stops counting at 2**24 (after which ``t % T_u == 0`` would hold at every
    step, refreshing ``P`` every step); a CPU tensor is read without a device sync.
    """
    return torch.tensor(value, dtype=torch.int64)


def step_value(step: Any, where: str) -> int:
    """The integer value of a saved ``step``: a tensor of one element or a Python number."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise CheckpointError(
                f"{where}: 'step' must be a number, got a {step.dtype} tensor of shape {tuple(step.shape)}"
            )
        value = placement.local(step).item()
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = step
    else:
        raise CheckpointError(f"{where}: 'step' must be a number, got {type(step).__name__}")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise CheckpointError(f"{where}: 'step' must be a non-negative integer, got {value!r}")
    return int(value)


def _kind_hint(keys: set[str]) -> str:
    """What a foreign set of keys looks like, for the error message."""
    if any(key.endswith(("_codes", "_absmax")) for key in keys):
        return " (8-bit moments: state of CoapAdamW8bit / CoapAdafactor8bit?)"
    if keys & {"exp_avg_sq_row", "exp_avg_sq_col"}:
        return " (factored second moments: Adafactor state?)"
    if keys & {"state1", "state2", "qmap1", "qmap2"}:
        return " (bitsandbytes state?)"
    if "exp_avg_sq" in keys and "exp_avg" in keys:
        return " (Adam state?)"
    return ""


def convert_loaded_state(
    saved: dict[str, Any], planned: dict[str, Tensor], param: Tensor, where: str
) -> dict[str, Any]:
    """The state to install for ``param``, from its ``saved`` state and its ``planned`` one.

    ``planned`` maps each key to a ``meta`` tensor of the planned shape and dtype (global shapes
    for a sharded parameter, as a DTensor's shape is). Returns new tensors (never the saved ones,
    so that training on cannot change the checkpoint); raises :class:`CheckpointError`.
    """
    entries = {key: value for key, value in saved.items() if key not in DERIVED_KEYS}
    if not entries:
        return {}
    if "step" not in entries:
        raise CheckpointError(f"{where}: the saved state has no 'step' (keys {sorted(entries)})")
    step = step_value(entries["step"], where)
    if entries.keys() == {"step"} and step == 0:
        return {}  # created but never stepped (a failed first step of an earlier version)
    expected, found = set(planned) - {"step"}, set(entries) - {"step"}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        details = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}{_kind_hint(set(extra))}" if extra else "",
            )
            if part
        )
        raise CheckpointError(
            f"{where}: the saved state does not fit this optimizer: {details}; expected keys {sorted(expected)}"
        )
    state: dict[str, Any] = {"step": new_step_counter(step)}
    for key in sorted(expected):
        state[key] = _convert_tensor(entries[key], planned[key], param, f"{where}: state {key!r}")
    for key in FACTOR_KEYS:
        if key in state and not bool(torch.isfinite(placement.local(state[key])).all()):
            raise CheckpointError(
                f"{where}: state {key!r} (a projection) holds non-finite values; the checkpoint is damaged"
            )
    return state


def _convert_tensor(value: Any, planned: Tensor, param: Tensor, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{where} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(planned.shape):
        raise CheckpointError(f"{where} has shape {tuple(value.shape)}, expected {tuple(planned.shape)}")
    if planned.dtype.is_floating_point:
        if not value.dtype.is_floating_point:
            raise CheckpointError(
                f"{where} has dtype {value.dtype}, expected a floating-point tensor ({planned.dtype})"
            )
    elif value.dtype != planned.dtype:
        raise CheckpointError(f"{where} has dtype {value.dtype}, expected {planned.dtype}")
    return value.to(device=param.device, dtype=planned.dtype, copy=True)


def differing_options(
    saved_group: dict[str, Any], group: dict[str, Any], keys: tuple[str, ...]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, kept)}`` for the options in ``keys`` whose saved value differs from the group's."""
    return {
        key: (saved_group[key], group[key]) for key in keys if key in saved_group and saved_group[key] != group[key]
    }


def checked_state(
    optimizer: Any, state_dict: dict[str, Any]
) -> tuple[dict[Tensor, dict[str, Any]], list[dict[str, Any]]]:
    """For :meth:`LowRankOptimizer.load_state_dict`: the converted state of every parameter of
    ``optimizer``, and the COAP options each of its groups keeps; raises :class:`CheckpointError`.

    A checkpoint whose groups do not match the optimizer's in number or size is left to torch,
    which refuses it with its own message.
    """
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups)
    ):
        return {}, []
    keys = optimizer.option_names()
    options: list[dict[str, Any]] = []
    changed: list[str] = []
    loaded: dict[Tensor, dict[str, Any]] = {}
    position = 0
    for number, (saved, group) in enumerate(zip(saved_groups, groups)):
        options.append({key: group[key] for key in keys} | _update_options(saved, number))
        differences = differing_options(saved, group, keys)
        changed += [
            f"group {number} {key}: checkpoint {old!r}, kept {new!r}" for key, (old, new) in differences.items()
        ]
        # The group as it will be after loading: the saved hyper-parameters (the optimizer's
        # defaults for those an earlier version did not save), the optimizer's COAP options.
        final = {**optimizer.group_defaults(), **saved, **options[-1]}
        for saved_id, param in zip(saved["params"], group["params"]):
            where = f"parameter {position} of shape {tuple(param.shape)}"
            position += 1
            entry = state_dict["state"].get(saved_id)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise CheckpointError(f"{where}: the saved state is a {type(entry).__name__}, not a dict")
            try:
                loaded[param] = _converted(optimizer, entry, param, final, where)
            except CheckpointError as error:
                hint = _options_hint(differences) or _side_hint(optimizer, entry, param, final, where)
                raise CheckpointError(f"{error}{hint}") from None
    if changed:
        warnings.warn(
            "load_state_dict kept this optimizer's COAP options where the checkpoint differs ("
            + "; ".join(changed)
            + "). Hyper-parameters such as lr come from the checkpoint, as in torch.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return loaded, options


def _update_options(saved_group: dict[str, Any], number: int) -> dict[str, Any]:
    """The :data:`UPDATE_OPTIONS` a saved group resumes with: its own, checked (a value that
    would fail at the next step is refused now), or what the versions that lacked them did."""
    options = {key: saved_group.get(key, earlier) for key, earlier in UPDATE_OPTIONS.items()}
    try:
        check.positive_or_auto("scale", options["scale"])
    except ValueError as error:
        raise CheckpointError(f"group {number}: {error}") from None
    return options


def _converted(
    optimizer: Any, entry: dict[str, Any], param: Tensor, final: dict[str, Any], where: str
) -> dict[str, Any]:
    """``entry`` converted for ``param`` under the group ``final``; a matrix whose state was built
    where earlier versions' default put ``P`` keeps it (see ``EARLIER_DEFAULT_SIDE``)."""
    try:
        return convert_loaded_state(entry, optimizer.planned_state(param, final), param, where)
    except CheckpointError:
        earlier = earlier_default(final)
        if earlier is None:
            raise
        try:
            return convert_loaded_state(entry, optimizer.planned_state(param, earlier), param, where)
        except CheckpointError:
            pass
        raise


def _options_hint(differences: dict[str, tuple[Any, Any]]) -> str:
    """What to do about a refused state when the checkpoint's COAP options differ from ours."""
    if not differences:
        return ""
    listed = ", ".join(f"{key}={old!r} (this optimizer: {new!r})" for key, (old, new) in differences.items())
    return f". The checkpoint was written with {listed}: build the optimizer with those options to load it"


def _side_hint(optimizer: Any, entry: dict[str, Any], param: Tensor, final: dict[str, Any], where: str) -> str:
    """Earlier versions put ``P`` on the input side of FSDP2-sharded parameters when
    ``projection_side`` was ``None``; now ``None`` means the smaller side in every engine. Such a
    checkpoint is refused (its projections have other shapes), with what loads it."""
    if final.get("projection_side") is not None or not placement.sharded_on_rows(param):
        return ""
    try:
        convert_loaded_state(entry, optimizer.planned_state(param, {**final, "projection_side": "input"}), param, where)
    except CheckpointError:
        return ""
    return (
        ". It was written with P on the input side, the FSDP2 default of earlier versions (projection_side=None "
        "now means the smaller side in every engine): build the optimizer with projection_side='input' to load it"
    )
