"""The one low-rank optimizer: routing, refresh schedule, state layout and checkpointing.

Concrete optimizers are thin: they say which moments they keep and how a moment rule turns a
(projected or dense) gradient into an update direction. Everything else lives here once.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ..functional.correlation import DEFAULT_CORRELATION_LR, DEFAULT_CORRELATION_MAX_NORM, correlation_aware_step
from ..functional.moments import AdamDirection
from ..functional.subspace import _rank_tolerance, gaussian_sketch, low_cost_svd, low_cost_svd_with_values
from ..functional.tucker import unfold
from . import _placement as placement
from . import _validation as check
from ._checkpoint import CheckpointError, convert_loaded_state, differing_options, new_step_counter
from ._layout import PROJECTION_SIDES, Layout, route
from ._sharded import CommunicationLog, ShardComm, Task, run_coalesced, sharded_correlation_step, sharded_low_cost_svd

__all__ = ["COAP_DEFAULTS", "COAP_OPTIONS", "LowRankOptimizer", "group_defaults"]

#: Kernels with fewer entries stay dense: below 4096 values the state saved is under 32 KB,
#: while each refresh still runs a QR and an SVD per mode. A per-group option.
DEFAULT_MIN_CONV_NUMEL = 4096

#: Dense tensors up to this size are stepped together (``torch._foreach_*``): for biases and
#: norms the per-tensor Python cost is most of a step's time. Larger ones go one by one, so that
#: the bulk update's temporaries (two per tensor, alive at once) stay small.
BULK_MAX_NUMEL = 2**16

#: The COAP settings, each a per-group option (``{"params": ..., "rank": 64}`` overrides one).
COAP_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "rank_ratio_matrix": None,
    "rank_ratio_cnn": None,
    "update_interval": 32,
    "reproject_factor": 5,
    "correlation_lr": DEFAULT_CORRELATION_LR,
    "correlation_normalize": False,
    "correlation_max_norm": DEFAULT_CORRELATION_MAX_NORM,
    "scale": 1.0,
    "min_conv_numel": DEFAULT_MIN_CONV_NUMEL,
    "seed": 0,
    "coap": True,
    "projection_side": None,
}

#: The COAP options: at load, an optimizer keeps its own values of these (see ``load_state_dict``).
COAP_OPTIONS: tuple[str, ...] = tuple(COAP_DEFAULTS)

_ROUTING_KEYS = ("coap", "rank", "rank_ratio_matrix", "rank_ratio_cnn", "min_conv_numel", "projection_side")


@lru_cache(maxsize=4096)
def _cached_route(shape: tuple[int, ...], options: tuple[Any, ...]) -> Layout:
    return route(shape, dict(zip(_ROUTING_KEYS, options)))


def layout_of(param: Tensor, group: dict[str, Any]) -> Layout:
    """The :class:`Layout` of ``param`` under ``group``'s options (global shapes for a DTensor).

    A parameter sharded on dim 0 (FSDP2) with ``projection_side=None`` gets ``P`` on its input
    side (dim 1), which is not sharded.
    """
    options = {key: group.get(key) for key in _ROUTING_KEYS}
    if options["projection_side"] is None and placement.sharded_on_rows(param):
        options["projection_side"] = "input"
    return _cached_route(tuple(param.shape), tuple(options.values()))


def group_defaults(arguments: dict[str, Any], *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A constructor's ``locals()`` as param-group defaults: every argument but ``params``.

    Each optimizer's signature lists its options explicitly (for users and their tools); this
    turns them into ``defaults`` without writing the list a second time.
    """
    skip = {"self", "params", "__class__", *exclude}
    return {key: value for key, value in arguments.items() if key not in skip}


def _sketch_seed(seed: int, index: int) -> int:
    # Distinct, reproducible streams per (seed, parameter index) without the overlap that
    # seed + index would give (seed 0 / index 1 vs seed 1 / index 0).
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def _compute_dtype(param: Tensor) -> torch.dtype:
    # Moments, projections and the update math are float32 (float64 for float64 params):
    # QR / SVD have no half-precision kernels, and a bf16 second moment stalls (v * 0.999
    # rounds back to v with 8 mantissa bits).
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the
    first frame outside this package's optimizers and torch (the user's ``step()`` or backward)."""
    skip = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "") for path in (__file__, torch.__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class _Moments(dict):
    """A parameter's state as its step works on it, each entry unpacked (8-bit moments decoded)
    at its first use and only then.

    Under FSDP2 a step waits at its collectives while the other parameters reach theirs (see
    :func:`~coap_torch.optim._sharded.run_coalesced`); a moment read only after them (Adafactor's
    first moment, full-size for a dense parameter) is then not held decoded meanwhile. Used for
    dense row shards only: elsewhere the moments are low-rank or nothing waits, and unpacking
    everything at once costs less. :meth:`items` lists the entries unpacked so far: those are
    what :meth:`LowRankOptimizer._pack` stores back; the others stay as they were stored.
    """

    def __init__(self, stored: dict[str, Any], unpack: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        super().__init__()
        self._unpack = unpack
        self._packed: dict[str, dict[str, Any]] = {}
        for key, value in stored.items():
            self._packed.setdefault(placement.moment_name(key), {})[key] = value

    def __missing__(self, key: str) -> Any:
        packed = self._packed.pop(key, None)
        if packed is None:
            raise KeyError(key)
        for name, value in self._unpack(packed).items():
            dict.__setitem__(self, name, value)
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._packed

    def __setitem__(self, key: str, value: Any) -> None:
        self._packed.pop(key, None)
        dict.__setitem__(self, key, value)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class LowRankOptimizer(Optimizer):
    """Base class of the COAP optimizers. Subclasses define the moment rule:

    * :attr:`moment_rotations`: for each state tensor that lives in the projected space, how it
      moves to a new basis when ``P`` changes (see :meth:`Layout.rotate`): ``"linear"`` for
      first moments, ``"squared"`` for second moments, ``"row"`` / ``"col"`` for the factored
      accumulators of Adafactor;
    * :meth:`_init_moments`: create the moments for a (projected or dense) shape;
    * :meth:`_moment_step`: update the moments from a gradient and return
      ``(direction, decay, alpha)``; the parameter becomes ``p * decay + alpha * restore(direction)``
      (``alpha`` is multiplied by the group's ``scale`` for projected parameters).

    A parameter's step is a generator (:meth:`_param_step`) that yields where it needs sums over
    the ranks of a row-sharded parameter (FSDP2); :meth:`step` runs the steps of all parameters
    together so that those all-reduces are coalesced (see :func:`~coap_torch.optim._sharded.run_coalesced`).
    """

    moment_rotations: ClassVar[dict[str, str]] = {}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        for key, value in {**COAP_DEFAULTS, **self._extra_defaults()}.items():
            defaults.setdefault(key, value)
        self._validate_group(defaults)
        #: The collectives this optimizer issued (FSDP2 refreshes only); see :class:`CommunicationLog`.
        self.communication = CommunicationLog()
        self._had_matrices = False
        self._engine_checked = False
        super().__init__(params, defaults)

    # -- validation ----------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the COAP options of ``group``; subclasses extend with their own."""
        check.positive_int("rank", group["rank"], optional=True)
        check.at_least_one("rank_ratio_matrix", group["rank_ratio_matrix"], optional=True)
        check.at_least_one("rank_ratio_cnn", group["rank_ratio_cnn"], optional=True)
        check.positive_int("update_interval", group["update_interval"])
        check.positive_int("reproject_factor", group["reproject_factor"])
        check.non_negative("correlation_lr", group["correlation_lr"])
        check.boolean("correlation_normalize", group["correlation_normalize"])
        if group["correlation_max_norm"] is not None:
            check.positive_or_inf("correlation_max_norm", group["correlation_max_norm"])
        check.positive("scale", group["scale"])
        check.non_negative_int("min_conv_numel", group["min_conv_numel"])
        check.non_negative_int("seed", group["seed"])
        check.boolean("coap", group["coap"])
        if group["projection_side"] not in PROJECTION_SIDES:
            raise ValueError(f"Invalid projection_side: {group['projection_side']!r} (must be one of {PROJECTION_SIDES})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as :meth:`torch.optim.Optimizer.add_param_group` does, validating its options.

        A group that sets ``rank`` but no ``rank_ratio_matrix`` uses that rank, even when the
        optimizer's default ``rank_ratio_matrix`` is set: what a group says beats the defaults.
        """
        if isinstance(param_group, dict) and "rank" in param_group:
            param_group.setdefault("rank_ratio_matrix", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            offset = sum(len(g["params"]) for g in self.param_groups[:-1])
            for index, param in enumerate(group["params"]):
                check.parameter(param, offset + index)
                self._had_matrices = self._had_matrices or param.dim() >= 2
        except (ValueError, TypeError) as error:
            self.param_groups.pop()
            if len(self.param_groups) == 0:
                raise
            raise type(error)(f"param group {len(self.param_groups)}: {error}") from None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Checkpoints written before an option existed load with its default.
        for group in self.param_groups:
            for key, value in {**COAP_DEFAULTS, **self._extra_defaults()}.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("communication", CommunicationLog())
        self.__dict__.setdefault("_had_matrices", False)
        self.__dict__.setdefault("_engine_checked", False)

    def _extra_defaults(self) -> dict[str, Any]:
        return {}

    # -- the moment rule (subclasses) ----------------------------------------------------------
    def _init_moments(self, shape: tuple[int, ...], group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _moment_step(
        self, state: dict[str, Any], grad: Tensor, group: dict[str, Any], step: int, param: Tensor, comm: ShardComm | None = None
    ) -> Task[tuple[Tensor, float | Tensor | Callable[[Tensor], Any], float]]:
        """A generator that returns ``(direction, decay, alpha)``.

        ``comm`` is given for a row shard (FSDP2): sums over the whole parameter come from
        ``sums = yield from comm.all_reduce(...)``. ``param`` is the weight, to read only: in the
        compute dtype (``grad.dtype``) without ``comm``, in its own dtype with it (the compute-dtype
        copy is made after the collectives, so none is held while the step waits; use
        ``param.to(grad.dtype)``). ``decay`` is a factor, or a function that changes the weight
        (in the compute dtype) in place before the update.
        """
        raise NotImplementedError

    def _unpack(
        self, state: dict[str, Any], group: dict[str, Any], shard: placement.RowShard | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        """The state as the moment rule works on it (moments of the compute ``dtype``); identity here.

        For a dense row shard (FSDP2) it is called on each state entry separately (a moment's
        stored tensors together: for ``exp_avg``, ``exp_avg_codes`` and ``exp_avg_absmax``), at
        its first use in a step; on the whole state otherwise.
        """
        return state

    def _pack(
        self, work: dict[str, Any], state: dict[str, Any], group: dict[str, Any], shard: placement.RowShard | None = None
    ) -> None:
        """Store what :meth:`_unpack` returned back into ``state`` after the step."""
        if work is not state:
            state.update(work.items())

    def _refresh_moment(self, state: dict[str, Any], layout: Layout, grad: Tensor, factors: list[Tensor]) -> Tensor:
        """The low-rank first moment ``M`` that the Eq. 2 step correlates with."""
        return state["exp_avg"]

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        All-or-nothing: every check that can refuse a parameter (a sparse gradient, an engine or
        placement that cannot be projected, state built for other options) runs for every
        parameter before any parameter, moment or step counter changes.

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_engine()
        self._step_params(self._with_gradients())
        return loss

    def _with_gradients(self) -> Iterator[tuple[Tensor, dict[str, Any], int]]:
        index = itertools.count()
        for group in self.param_groups:
            for param in group["params"]:
                param_index = next(index)
                if param.grad is not None:
                    yield param, group, param_index

    def _step_params(self, params: Iterable[tuple[Tensor, dict[str, Any], int]]) -> None:
        """Step each ``(param, group, index)`` in order, their collectives coalesced.

        Every parameter is checked first (:meth:`_plan_step`), so a refusal changes nothing.
        Under FSDP2 the steps wait at their all-reduces for one another, so that each round of
        sums is one all-reduce for all parameters (see :func:`~coap_torch.optim._sharded.run_coalesced`);
        a step with no collective runs start to finish before the next one starts, as in one process.
        Plain dense tensors that the subclass can update in bulk (:meth:`_bulk_dense_step`) are
        stepped together first; parameters are independent, so the order changes no result.
        """
        views: dict[int, dict[str, Any]] = {}
        planned = [self._plan_step(param, _step_view(group, views), index) for param, group, index in params]
        bulk: dict[tuple[Any, ...], tuple[dict[str, Any], list[Tensor]]] = {}
        rest = []
        for item in planned:
            key = self._bulk_key(item.param, item.group)
            if key is None:
                rest.append(item)
            else:
                bulk.setdefault((id(item.group), *key), (item.group, []))[1].append(item.param)
        for group, members in bulk.values():
            self._bulk_dense_step(members, group)
        run_coalesced((self._param_step(item) for item in rest), self.communication)

    def _plan_step(self, param: Tensor, group: dict[str, Any], index: int) -> _PlannedStep:
        """Everything about a parameter's step that can refuse it, checked before any update."""
        grad = param.grad
        if grad.is_sparse:
            raise check.SparseGradientError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter {index} of shape {tuple(param.shape)})"
            )
        shard = placement.placement_of(param, index)
        layout = layout_of(param, group)
        if shard is not None:
            layout = self._shard_layout(layout, shard, index)
        self._check_rule(layout, shard, index)
        state = self.state.get(param)
        if state:
            self._check_layout(state, layout, index)
        return _PlannedStep(param, group, index, layout, shard)

    def _check_rule(self, layout: Layout, shard: placement.RowShard | None, index: int) -> None:
        """Refuse, before any update, a parameter the moment rule cannot step (subclasses)."""

    #: Whether :meth:`_bulk_dense_step` is implemented (subclasses that set it implement it).
    _bulk_dense: ClassVar[bool] = False

    def _bulk_key(self, param: Tensor, group: dict[str, Any]) -> tuple[Any, ...] | None:
        """The bulk bucket of a plain dense tensor, or ``None`` for the per-parameter path.

        Bulk is for what needs none of the per-parameter machinery: a small (at most
        :data:`BULK_MAX_NUMEL` entries), local (not DTensor), dense, float32/float64 parameter
        with a dense gradient of its dtype, routed dense, whose state is empty or holds only the
        moments and step counter. Everything else (projections, shards, 8-bit or bf16 storage,
        ``maximize``, state of another layout) takes :meth:`_param_step`. Buckets share step
        count, device and dtype.
        """
        if not self._bulk_dense or group.get("maximize", False):
            return None
        grad = param.grad
        if (
            param.numel() > BULK_MAX_NUMEL
            or grad.is_sparse
            or grad.dtype != param.dtype
            or param.dtype not in (torch.float32, torch.float64)
            or placement.is_dtensor(param)
            or placement.engine_managed(param)  # refused on the per-parameter path
            or (param.dim() > 1 and layout_of(param, group).kind != "dense")  # vectors are always dense
        ):
            return None
        state = self.state.get(param)
        if not state:
            return (0, param.device, param.dtype)
        if any(key in state for key in ("proj", "proj_out", "proj_in")) or not self._bulk_state_ok(state, group):
            return None
        return (int(state["step"]), param.device, param.dtype)

    def _bulk_state_ok(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether an existing dense ``state`` is in the plain form :meth:`_bulk_dense_step` expects."""
        return False

    def _bulk_dense_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Step plain dense ``params`` of ``group`` that share a step count, all at once (see :meth:`_bulk_key`)."""
        raise NotImplementedError

    def _bulk_states(self, params: list[Tensor], group: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """The states of a bulk bucket (created as :meth:`_init_state` would) and their new step count."""
        states = []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = new_step_counter()
                state.update(self._init_moments(tuple(param.shape), group, param))
            states.append(state)
        torch._foreach_add_([state["step"] for state in states], 1)
        return states, int(states[0]["step"])

    def _check_engine(self) -> None:
        # Once, at the first step: wrappers (DeepSpeed ZeRO) replace the parameters after the
        # optimizer is built, so the constructor cannot tell.
        if not self._engine_checked:
            params = [p for group in self.param_groups for p in group["params"]]
            placement.refuse_flattening_engine(self._had_matrices, params)
            self._engine_checked = True

    def _param_step(self, item: _PlannedStep) -> Task[None]:
        param, group, index, layout, shard = item.param, item.group, item.index, item.layout, item.shard
        comm = None if shard is None else ShardComm(shard.group, rows=shard.global_shape[0])
        stored_state = self.state[param]
        state = stored_state if shard is None else {k: placement.local(v) for k, v in stored_state.items()}
        dtype = _compute_dtype(param)
        param, grad = placement.local(param), placement.local(param.grad).to(dtype)
        if group.get("maximize", False):
            grad = -grad
        canonical = layout.canonical(grad)
        if not state:
            initialised = yield from self._init_state(state, layout, canonical, group, index, comm)
            if not initialised:
                return  # deferred to the next finite gradient (warned); the parameter is left as it is
        stored = state
        if comm is not None and not layout.projected:
            # The moment rule of a dense row shard may wait at collectives (Adafactor's): its
            # full-size moments are unpacked at first use, not held decoded while it waits.
            state = _Moments(stored, lambda entries: self._unpack(entries, group, shard, dtype))
        else:
            state = self._unpack(stored, group, shard, dtype)
        state["step"] += 1
        step = int(state["step"])  # a CPU tensor: no device sync

        factors = [state[key] for key in layout.factor_keys]
        if layout.projected and step > 1 and step % group["update_interval"] == 0:
            factors = yield from self._refresh(state, layout, canonical, group, step, index, comm)
        # The weight in the compute dtype (a copy for bf16 / fp16 weights); for a row shard it is
        # made after the moment rule's collectives, so that no such copy waits through them.
        target = None if comm is not None else param if param.dtype == dtype else param.to(dtype)
        rule_grad = layout.project(canonical, factors) if layout.projected else grad
        direction, decay, alpha = yield from self._moment_step(
            state, rule_grad, group, step, param if target is None else target, comm
        )
        if target is None:
            target = param if param.dtype == dtype else param.to(dtype)
        if callable(decay):
            decay(target)
            decay = 1.0
        if layout.projected:
            if isinstance(direction, AdamDirection):
                direction = direction.tensor()
            layout.add_restored_(target, direction, factors, beta=decay, alpha=alpha * group["scale"])
        else:
            if isinstance(decay, Tensor) or decay != 1.0:
                target.mul_(decay)
            if isinstance(direction, AdamDirection):  # torch.optim.AdamW's own operation and rounding
                target.addcdiv_(direction.numerator, direction.denominator, value=alpha / direction.bias_correction1)
            else:
                target.add_(direction, alpha=alpha)
        self._pack(state, stored, group, shard)
        if target is not param:
            param.copy_(target)
        if shard is not None:
            self._store_sharded(stored_state, stored, shard)

    def _step_param(self, param: Tensor, group: dict[str, Any], index: int) -> None:
        """Step one parameter now (per-layer updates), each of its collectives on its own."""
        self._step_params([(param, group, index)])

    def _shard_layout(self, layout: Layout, shard: placement.RowShard, index: int) -> Layout:
        """The layout of this rank's rows; refuses what cannot be projected without per-step collectives."""
        where = f"{placement.describe_shape(shard.global_shape, index)} sharded on dim 0 (FSDP2)"
        local_shape = (shard.rows, *shard.global_shape[1:])
        if layout.kind == "dense":
            return Layout("dense", local_shape)
        if layout.kind == "tucker" or len(layout.shape) == 3:
            what = "a Tucker-2 conv kernel" if layout.kind == "tucker" else "a stack of matrices"
            raise ValueError(
                f"{where}: {what} cannot be projected on a row shard without collectives at every step; "
                "put it in a param group with coap=False, or use DistributedDataParallel"
            )
        if layout.transposed:
            raise ValueError(
                f"{where}: projection_side='smaller' puts P on the sharded side of this wide matrix, which would "
                "need an all-reduce at every step; use projection_side=None or 'input' (P on the unsharded side)"
            )
        return Layout("matrix", local_shape, layout.ranks)

    @staticmethod
    def _store_sharded(stored: dict[str, Any], state: dict[str, Any], shard: placement.RowShard) -> None:
        # Moments shard like the weight (DTensors, so that torch.distributed.checkpoint can
        # reshard them); P and the step counter are the same on every rank.
        stored.clear()
        for key, value in state.items():
            if placement.replicated(key) or not isinstance(value, Tensor) or value.dim() == 0:
                stored[key] = value
            else:
                stored[key] = placement.to_dtensor_like(value, shard, shard.global_shape[0])

    def _init_state(
        self, state: dict[str, Any], layout: Layout, grad: Tensor, group: dict[str, Any], index: int, comm: ShardComm | None = None
    ) -> Task[bool]:
        """Create the state of a parameter at its first step; ``False`` (and a warning) when the
        gradient cannot give a projection (non-finite), in which case nothing is created."""
        created: dict[str, Any] = {}
        generator = torch.Generator().manual_seed(_sketch_seed(group["seed"], index))
        where = placement.describe_shape(layout.shape if comm is None else (comm.rows, *layout.shape[1:]), index)
        try:
            if layout.kind == "matrix" and comm is not None:
                n, rank = grad.shape[-1], layout.ranks[0]
                sketch = gaussian_sketch((n, rank), generator=generator, dtype=grad.dtype, device=grad.device)
                global_shape = (comm.rows, n)
                result = yield from sharded_low_cost_svd(grad, rank, sketch, comm, global_shape)
                if result is None:  # a non-finite gradient on some rank: every rank sees it in the sums
                    return self._defer_init(where)
                created["proj"], singular = result
                self._warn_if_rank_deficient(torch.empty(global_shape, device="meta"), singular, layout, index)
            elif layout.projected and not _all_finite(grad):
                return self._defer_init(where)
            elif layout.kind == "matrix":
                proj, singular = low_cost_svd_with_values(grad, layout.ranks[0], generator=generator)
                created["proj"] = proj
                self._warn_if_rank_deficient(grad, singular, layout, index)
            elif layout.kind == "tucker":
                for key, mode, rank in zip(layout.factor_keys, (0, 1), layout.ranks):
                    created[key] = low_cost_svd(unfold(grad, mode).mT, rank, generator=generator)
        except torch.linalg.LinAlgError as error:
            return self._defer_init(where, error)
        if not _all_finite(*created.values()):
            return self._defer_init(where)
        state["step"] = new_step_counter()
        state.update(created)
        state.update(self._init_moments(layout.projected_shape, group, grad))
        return True

    @staticmethod
    def _defer_init(where: str, error: Exception | None = None) -> bool:
        cause = f"the low-cost SVD failed ({error})" if error is not None else "its gradient is not finite"
        warnings.warn(
            f"{where}: no projection could be built at its first step: {cause}. The parameter was left "
            "unchanged; its projection and moments are created at its next step with a finite gradient.",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )
        return False

    @staticmethod
    def _check_layout(state: dict[str, Any], layout: Layout, index: int) -> None:
        """Refuse state that was built for another projection (options changed since it was made)."""
        found = [tuple(placement.local(state[key]).shape) for key in ("proj", "proj_out", "proj_in") if key in state]
        if found != layout.factor_shapes():
            raise ValueError(
                f"the state of parameter {index} of shape {layout.shape} holds projections of shapes {found}, "
                f"but its group's options now give {layout.kind} projections of shapes {layout.factor_shapes()}; "
                "restore the options the state was created with, or clear it with optimizer.state[param].clear()"
            )

    @staticmethod
    def _warn_if_rank_deficient(grad: Tensor, singular: Tensor, layout: Layout, index: int) -> None:
        # Once per parameter, at initialisation only (the check needs one host sync).
        deficient = bool((singular[..., -1] <= _rank_tolerance(grad, singular)[..., 0]).any())
        if deficient:
            numerical = int((singular > _rank_tolerance(grad, singular)).sum(-1).min())
            warnings.warn(
                f"parameter {index} of shape {layout.shape}: its first gradient has numerical rank "
                f"{numerical} < rank {layout.ranks[0]}, so its top-{layout.ranks[0]} subspace is not "
                "unique. The undetermined directions are filled deterministically from the seeded "
                "sketch; use batches larger than the rank (or a smaller rank) for a data-driven subspace.",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )

    def _refresh(
        self,
        state: dict[str, Any],
        layout: Layout,
        grad: Tensor,
        group: dict[str, Any],
        step: int,
        index: int,
        comm: ShardComm | None = None,
    ) -> Task[list[Tensor]]:
        """Update P (or P_O, P_I) and move the moments to the new basis.

        A refresh that cannot give finite factors (a non-finite gradient or first moment, a
        failed SVD) keeps the previous ones, with a warning: P is never built from non-finite
        values. The check costs a host sync, at refresh steps only.
        """
        old = [state[key] for key in layout.factor_keys]
        reproject = step % (group["update_interval"] * group["reproject_factor"]) == 0
        first = self._refresh_moment(state, layout, grad, old)
        pairs = layout.refresh_pairs(grad, first, old)
        new: list[Tensor] | None = None
        # LAPACK's SVD raises on non-finite input, so one process checks it first; FSDP2's
        # sharded SVD checks its all-reduced Gram matrix, the same on every rank.
        if comm is not None or not reproject or _all_finite(*(matrix for matrix, _ in pairs)):
            try:
                new = []
                for (matrix, moment), P, rank in zip(pairs, old, layout.ranks):
                    factor = yield from self._refreshed_factor(matrix, moment, P, rank, group, reproject, comm)
                    if factor is None:
                        new = None
                        break
                    new.append(factor)
            except torch.linalg.LinAlgError:
                new = None
        if new is None or not _all_finite(*new):
            kind = "low-cost SVD" if reproject else "Eq. 2 step"
            shape = layout.shape if comm is None else (comm.rows, *layout.shape[1:])
            warnings.warn(
                f"{placement.describe_shape(shape, index)}: the {kind} refresh of its projection at step {step} "
                "met non-finite values (gradient or first moment); the previous projection is kept.",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
            return old
        rotations = [P_old.mT @ P_new for P_old, P_new in zip(old, new)]
        for key, kind in self.moment_rotations.items():
            if key in state:
                state[key] = layout.rotate(state[key], rotations, kind)
        for key, P in zip(layout.factor_keys, new):
            state[key] = P
        return new

    @staticmethod
    def _refreshed_factor(
        matrix: Tensor, moment: Tensor, P: Tensor, rank: int, group: dict[str, Any], reproject: bool, comm: ShardComm | None
    ) -> Task[Tensor | None]:
        """One refreshed factor: the warm-started low-cost SVD or the Eq. 2 step (``None``: no finite result)."""
        if comm is not None:
            global_shape = (comm.rows, matrix.shape[-1])
            if reproject:
                result = yield from sharded_low_cost_svd(matrix, rank, P, comm, global_shape)
                return None if result is None else result[0]
            return (
                yield from sharded_correlation_step(
                    P,
                    matrix,
                    moment,
                    comm,
                    global_shape,
                    group["correlation_lr"],
                    normalize=group["correlation_normalize"],
                    max_norm=group["correlation_max_norm"],
                )
            )
        if reproject:
            return low_cost_svd(matrix, rank, sketch=P)
        return correlation_aware_step(
            P,
            matrix,
            moment,
            lr=group["correlation_lr"],
            normalize=group["correlation_normalize"],
            max_norm=group["correlation_max_norm"],
        )

    # -- planned state and checkpoints ---------------------------------------------------------
    def planned_state(self, param: Tensor) -> dict[str, Tensor]:
        """The state ``param`` will hold after its first step, as ``meta`` tensors (shape and dtype).

        Keys are those of ``optimizer.state[param]`` between steps (``step``, the projections,
        the moments as stored: 8-bit moments as ``*_codes`` / ``*_absmax``). Shapes are global
        for a DTensor parameter (as ``DTensor.shape`` is). Computed from the parameter's shape
        and its group's options alone; nothing is allocated. :func:`~coap_torch.estimate_state_bytes`
        and ``load_state_dict`` use it.
        """
        group = self._group_of(param)
        return self._planned_state(param, group)

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"a parameter of shape {tuple(param.shape)} is not in this optimizer")

    def _planned_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        layout = layout_of(param, group)
        dtype = _compute_dtype(param)
        planned = {"step": torch.empty((), dtype=torch.int64, device="meta")}
        for key, shape in zip(layout.factor_keys, layout.factor_shapes()):
            planned[key] = torch.empty(shape, dtype=dtype, device="meta")
        like = torch.empty(0, dtype=dtype, device="meta")
        sharded = placement.sharded_on_rows(param) if placement.is_dtensor(param) else False
        for key, moment in self._init_moments(layout.projected_shape, group, like).items():
            planned.update(self._stored_moment(key, moment, group, sharded))
        return planned

    def _stored_moment(self, key: str, moment: Tensor, group: dict[str, Any], sharded: bool) -> dict[str, Tensor]:
        """How a moment of this shape is kept between steps (as it is here; 8-bit storages override)."""
        return {key: moment}

    #: Group options that say how the state is laid out and refreshed (storages add theirs): at
    #: load, the optimizer keeps its own values of these, while hyper-parameters come from the
    #: checkpoint as in torch.
    storage_options: ClassVar[tuple[str, ...]] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checked against this optimizer before anything changes.

        * **Hyper-parameters** (``lr``, ``betas``, ``weight_decay`` ...) are taken from the
          checkpoint, as :meth:`torch.optim.Optimizer.load_state_dict` does (LR schedulers rely
          on it).
        * **COAP options** (:data:`COAP_OPTIONS`: ``rank``, ``update_interval``,
          ``correlation_max_norm`` ... and the 8-bit ``block_size`` / ``min_8bit_size``) stay the
          ones this optimizer was built with; a checkpoint that says otherwise gets a warning
          that lists the differences.
        * **State** must be what this optimizer would have built for each parameter under those
          options (see :meth:`planned_state`): the same keys and shapes, finite projections.
          Floating-point state is converted to the planned dtype (float64 or bf16 state into a
          float32 model, as torch does), a ``step`` saved as a Python number or a float tensor
          becomes the exact integer counter, and tensors move to the parameter's device with
          their dtypes kept (torch's own load would cast float32 moments of a bf16 parameter to
          bf16, and 8-bit codes to floats). Anything else raises ``ValueError`` naming the
          parameter, the key and what was expected, and leaves the optimizer as it was.
        """
        loaded: dict[str, Any] = {}

        def check_and_hold(_: Optimizer, final: dict[str, Any]) -> dict[str, Any]:
            # After every user pre-hook; torch then only installs the groups, the state is ours.
            loaded["state"], loaded["options"] = self._checked_state(final)
            return {**final, "state": {}}

        def install(_: Optimizer) -> None:
            # Before every user post-hook, which then see the loaded optimizer.
            for group, options in zip(self.param_groups, loaded["options"]):
                group.update(options)
            for param, state in loaded["state"].items():
                self.state[param] = state

        pre = self.register_load_state_dict_pre_hook(check_and_hold)
        post = self.register_load_state_dict_post_hook(install, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _checked_state(self, state_dict: dict[str, Any]) -> tuple[dict[Tensor, dict[str, Any]], list[dict[str, Any]]]:
        """The converted state of every parameter, and each group's COAP options to keep."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            return {}, []  # torch refuses it next, with its own message
        keys = (*COAP_OPTIONS, *self.storage_options)
        options: list[dict[str, Any]] = []
        changed: list[str] = []
        loaded: dict[Tensor, dict[str, Any]] = {}
        index = itertools.count()
        for number, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            options.append({key: group[key] for key in keys})
            differences = differing_options(saved, group, keys)
            changed += [f"group {number} {key}: checkpoint {old!r}, kept {new!r}" for key, (old, new) in differences.items()]
            # The group as it will be after loading: saved hyper-parameters (this optimizer's
            # defaults for those an earlier version did not save), this optimizer's COAP options.
            final = {**COAP_DEFAULTS, **self._extra_defaults(), **self.defaults, **saved, **options[-1]}
            for saved_id, param in zip(saved["params"], group["params"]):
                where = f"parameter {next(index)} of shape {tuple(param.shape)}"
                entry = state_dict["state"].get(saved_id)
                if entry is None:
                    continue
                if not isinstance(entry, dict):
                    raise CheckpointError(f"{where}: the saved state is a {type(entry).__name__}, not a dict")
                try:
                    loaded[param] = convert_loaded_state(entry, self._planned_state(param, final), param, where)
                except CheckpointError as error:
                    raise CheckpointError(f"{error}{_options_hint(differences)}") from None
        if changed:
            warnings.warn(
                "load_state_dict kept this optimizer's COAP options where the checkpoint differs ("
                + "; ".join(changed)
                + "). Hyper-parameters such as lr come from the checkpoint, as in torch.",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )
        return loaded, options


def _options_hint(differences: dict[str, tuple[Any, Any]]) -> str:
    """What to do about a refused state when the checkpoint's COAP options differ from ours."""
    if not differences:
        return ""
    listed = ", ".join(f"{key}={old!r} (this optimizer: {new!r})" for key, (old, new) in differences.items())
    return f". The checkpoint was written with {listed}: build the optimizer with those options to load it"


#: Hyper-parameters that torch lets users give as one-element tensors (an lr a scheduler or a
#: compiled loop keeps in a tensor).
TENSOR_HYPER_PARAMETERS = ("lr", "weight_decay", "eps")


def _step_view(group: dict[str, Any], views: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``group`` as one step reads it: hyper-parameters given as one-element tensors are read
    once per group and step as the Python numbers they hold, so that a tensor lr of any shape
    trains bitwise as the same lr given as a float (the one host sync on CUDA, per group, is
    fewer than torch's for-loop AdamW, which reads a tensor lr once per parameter)."""
    view = views.get(id(group))
    if view is None:
        tensors = {key: group[key] for key in TENSOR_HYPER_PARAMETERS if isinstance(group.get(key), Tensor)}
        if isinstance(group.get("betas"), (tuple, list)) and any(isinstance(b, Tensor) for b in group["betas"]):
            tensors["betas"] = group["betas"]
        if not tensors:
            view = group
        else:
            view = {**group, **{key: _as_number(value) for key, value in tensors.items()}}
        views[id(group)] = view
    return view


def _as_number(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_as_number(v) for v in value)
    return value.item() if isinstance(value, Tensor) else value


def _all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host sync)."""
    if not tensors:
        return True
    flags = torch.stack([torch.isfinite(tensor).all() for tensor in tensors])
    return bool(flags.all())


@dataclass(frozen=True)
class _PlannedStep:
    """A parameter's step, checked: its group, its index in the optimizer, its (local) layout and shard."""

    param: Tensor
    group: dict[str, Any]
    index: int
    layout: Layout
    shard: placement.RowShard | None
