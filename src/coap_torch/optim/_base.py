"""The one low-rank optimizer: routing, the step, refreshes, state layout and checkpointing.

A public optimizer is this class composed with a moment rule (:mod:`._rule`: Adam or Adafactor)
and a storage (:mod:`._storage`: float32 or 8-bit), plus its constructor's signature. The path
of a projected gradient through :meth:`LowRankOptimizer.step`:

1. :meth:`~LowRankOptimizer._plan_step` checks every parameter first (sparse gradients,
   placements, layouts, state built for other options), so a refusal changes nothing;
2. :meth:`~LowRankOptimizer._param_step`: the gradient in float32, in the layout's canonical
   orientation (:mod:`._layout`); the state is created at the first step or unpacked by the
   storage; ``P`` is refreshed when due (:mod:`._refresh`) and the moments rotated to the new
   basis; the gradient is projected, the rule updates the moments, and the update is restored
   into the weight in one GEMM (:meth:`Layout.add_restored_`) and copied back in its dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ..functional.moments import AdamDirection
from ..functional.reduction import LOCAL, Rows, Task
from . import _placement as placement
from . import _validation as check
from ._checkpoint import checked_state, new_step_counter
from ._layout import Layout, earlier_default, layout_of
from ._options import COAP_DEFAULTS, COAP_OPTIONS, UPDATE_OPTIONS, CoapOptions, defaults_of, take_options
from ._refresh import Problem, initial_factors, local_problems, refreshed_factors
from ._rule import MomentRule
from ._sharded import CommunicationLog, run_coalesced
from ._sharding import ShardPlan, plan_shard, replicated_state
from ._storage import FLOAT32, LazyMoments, MomentStorage, parse_state_dtype, rounding_seed, stored_dtype

__all__ = ["COAP_DEFAULTS", "COAP_OPTIONS", "LowRankOptimizer", "layout_of"]

#: Dense tensors up to this size are stepped together (``torch._foreach_*``): for biases and
#: norms the per-tensor Python cost is most of a step's time. Larger ones go one by one, so that
#: the bulk update's temporaries (two per tensor, alive at once) stay small.
BULK_MAX_NUMEL = 2**16

#: Large dense parameters whose state is stored converted (bfloat16, 8-bit) are stepped this
#: many entries at a time: the widened moments then never exist for the whole tensor (an
#: embedding's would be twice its float32 moments), and each chunk's passes stay in cache.
DENSE_CHUNK_NUMEL = 2**18


def _compute_dtype(param: Tensor) -> torch.dtype:
    # Moments, projections and the update math are float32 (float64 for float64 params):
    # QR / SVD have no half-precision kernels, and a bf16 second moment stalls (v * 0.999
    # rounds back to v with 8 mantissa bits).
    return torch.float64 if param.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _PlannedStep:
    """A parameter's step, checked: its group, its index in the optimizer, its (local) layout and,
    for a parameter sharded on dim 0, its :class:`~coap_torch.optim._sharding.ShardPlan`.
    ``scale`` and ``rms_fraction`` come from the whole parameter's layout (a shard's local
    layout may hold part of the side ``P`` reduces)."""

    param: Tensor
    group: dict[str, Any]
    index: int
    layout: Layout
    plan: ShardPlan | None
    scale: float = 1.0
    rms_fraction: float | None = None

    @property
    def shard(self) -> placement.RowShard | None:
        return None if self.plan is None else self.plan.shard

    @property
    def where(self) -> str:
        shape = self.layout.shape if self.shard is None else self.shard.global_shape
        return placement.describe_shape(shape, self.index)


class LowRankOptimizer(Optimizer):
    """The COAP optimizer, given a moment :attr:`rule` and a moment :attr:`storage`.

    Subclasses set the two and define ``__init__`` with their public signature, passing their
    hyper-parameters and the COAP options (``**options``, :class:`~coap_torch.optim._options.CoapOptions`
    and the storage's own) to ``super().__init__``.
    """

    rule: ClassVar[MomentRule]
    storage: ClassVar[MomentStorage] = FLOAT32

    def __init__(self, params: ParamsT, hyper_parameters: dict[str, Any], options: dict[str, Any]) -> None:
        defaults = {**hyper_parameters, **take_options(type(self).__name__, options, CoapOptions, self.storage.options)}
        self._check_group(defaults)
        #: The collectives this optimizer issued (FSDP2 refreshes only); see :class:`CommunicationLog`.
        self.communication = CommunicationLog()
        self._had_matrices = False
        self._engine_checked = False
        super().__init__(params, defaults)

    # -- options -------------------------------------------------------------------------------
    def option_names(self) -> tuple[str, ...]:
        """The COAP options this optimizer keeps at load: :data:`COAP_OPTIONS` but the
        :data:`~coap_torch.optim._options.UPDATE_OPTIONS`, and its storage's."""
        return (*(key for key in COAP_OPTIONS if key not in UPDATE_OPTIONS), *defaults_of(self.storage.options))

    def group_defaults(self) -> dict[str, Any]:
        """What a group option is when a group (or a checkpoint's group) does not say: this
        optimizer's constructor value, else the option's default."""
        return {**self._missing_defaults(), **self.defaults}

    def _missing_defaults(self) -> dict[str, Any]:
        return {**COAP_DEFAULTS, **defaults_of(self.storage.options), **self.rule.defaults}

    def _check_group(self, group: dict[str, Any]) -> None:
        self.rule.check(group)
        group["state_dtype"] = parse_state_dtype(group["state_dtype"])  # one spelling: the dtype
        CoapOptions.check(group)
        self.storage.check(group)

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
            self._check_group(group)
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
            for key, value in self._missing_defaults().items():
                group.setdefault(key, value)
        self.__dict__.setdefault("communication", CommunicationLog())
        self.__dict__.setdefault("_had_matrices", False)
        self.__dict__.setdefault("_engine_checked", False)

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
        Plain dense tensors that the rule can update in bulk are stepped together first;
        parameters are independent, so the order changes no result.
        """
        views: dict[int, dict[str, Any]] = {}
        planned = [self._plan_step(param, _step_view(group, views), index) for param, group, index in params]
        bulk: dict[tuple[Any, ...], tuple[dict[str, Any], list[_PlannedStep]]] = {}
        rest = []
        for item in planned:
            key = self._bulk_key(item.param, item.group)
            if key is None:
                rest.append(item)
            else:
                bulk.setdefault((id(item.group), *key), (item.group, []))[1].append(item)
        for group, members in bulk.values():
            self._bulk_step(members, group)
        run_coalesced((self._param_step(item) for item in rest), self.communication)

    def _step_param(self, param: Tensor, group: dict[str, Any], index: int) -> None:
        """Step one parameter now (per-layer updates), each of its collectives on its own."""
        self._step_params([(param, group, index)])

    def _plan_step(self, param: Tensor, group: dict[str, Any], index: int) -> _PlannedStep:
        """Everything about a parameter's step that can refuse it, checked before any update."""
        if param.grad.is_sparse:
            raise check.SparseGradientError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter {index} of shape {tuple(param.shape)})"
            )
        shard = placement.placement_of(param, index)
        layout = layout_of(param, group)
        plan = None if shard is None else plan_shard(layout, shard)
        state = self.state.get(param)
        if state and not _fits(state, layout, plan) and (earlier := earlier_default(group)) is not None:
            # State built where an earlier version's default put P keeps it (see EARLIER_DEFAULT_SIDE).
            earlier_layout = layout_of(param, earlier)
            earlier_plan = None if shard is None else plan_shard(earlier_layout, shard)
            if _fits(state, earlier_layout, earlier_plan):
                layout, plan = earlier_layout, earlier_plan
        if state:
            _check_layout(state, layout, _factor_shapes(layout, plan), index)
        return _PlannedStep(
            param,
            group,
            index,
            layout if plan is None else plan.layout,
            plan,
            layout.update_scale(group["scale"]),
            layout.rms_fraction(group["scale"]),
        )

    def _check_engine(self) -> None:
        # Once, at the first step: wrappers (DeepSpeed ZeRO) replace the parameters after the
        # optimizer is built, so the constructor cannot tell.
        if not self._engine_checked:
            params = [p for group in self.param_groups for p in group["params"]]
            placement.refuse_flattening_engine(self._had_matrices, params)
            self._engine_checked = True

    def _bulk_key(self, param: Tensor, group: dict[str, Any]) -> tuple[Any, ...] | None:
        """The bulk bucket of a plain dense tensor, or ``None`` for the per-parameter path.

        Bulk is for what needs none of the per-parameter machinery: a small (at most
        :data:`BULK_MAX_NUMEL` entries), local (not DTensor), dense, float32/float64 parameter
        with a dense gradient of its dtype, routed dense, whose state is empty or holds only the
        moments (in any storage: bfloat16 and 8-bit moments are widened for the step) and step
        counter. Everything else (projections, shards, ``maximize``, state of another layout)
        takes :meth:`_param_step`. Buckets share step count, device and dtype.
        """
        if not self.rule.bulk or group.get("maximize", False):
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
        moments = {placement.moment_name(key) for key in state} - {"step"}
        if "step" not in state or not self.rule.bulk_state_ok(moments, group):
            return None
        return (int(state["step"]), param.device, param.dtype)

    def _bulk_step(self, items: list[_PlannedStep], group: dict[str, Any]) -> None:
        """Step plain dense parameters of ``group`` that share a step count, all at once: their
        stored moments are unpacked, updated together and stored back."""
        stored, work = [], []
        for item in items:
            state = self.state[item.param]
            if not state:
                state["step"] = new_step_counter()
                state.update(self.rule.init(tuple(item.param.shape), group, item.param))
            stored.append(state)
            work.append(self.storage.unpack(state, group, self.rule.rotations, None, item.param.dtype))
        torch._foreach_add_([state["step"] for state in stored], 1)  # shared with the unpacked views
        step = int(stored[0]["step"])
        self.rule.bulk_step([item.param for item in items], work, group, step)
        for item, moments, state in zip(items, work, stored):
            seed = rounding_seed(group["seed"], item.index, step)
            self.storage.pack(moments, state, group, self.rule.rotations, None, seed)

    def _param_step(self, item: _PlannedStep) -> Task[None]:
        param, group, layout, plan, shard = item.param, item.group, item.layout, item.plan, item.shard
        rows: Rows = LOCAL if plan is None else plan.rows
        stored_state = self.state[param]
        stored = stored_state if shard is None else {k: placement.local(v) for k, v in stored_state.items()}
        dtype = _compute_dtype(param)
        param, grad = placement.local(param), placement.local(param.grad).to(dtype)
        if group.get("maximize", False):
            grad = -grad
        if self._chunkable(item, stored, param):
            self._chunked_dense_step(item, stored, param, grad)
            return
        canonical = layout.canonical(grad)
        if not stored or (layout.projected and int(stored["step"]) == 0):
            factors = {}
            if layout.projected:
                problems = self._problems(plan, layout, canonical, None, None)
                sketch_part = None if plan is None else plan.sketch_part
                built = yield from initial_factors(
                    layout, canonical, problems, group, item.index, item.where, rows, sketch_part
                )
                if built is None:
                    return  # deferred to the next finite gradient (warned); the parameter is left as it is
                factors = built.factors
                if not built.informed:
                    # An all-zero gradient: the parameter is left as it is, as torch leaves one
                    # with no gradient, and its projection is built from the next gradient.
                    if not stored:
                        self._store_waiting_state(item, stored_state, stored, factors, canonical)
                    return
            stored.clear()
            stored.update(
                {"step": new_step_counter(), **factors, **self.rule.init(layout.projected_shape, group, canonical)}
            )
        rotations = self.rule.rotations
        if shard is not None and not layout.projected:
            # The moment rule of a dense row shard may wait at collectives (Adafactor's): its
            # full-size moments are unpacked at first use, not held decoded while it waits.
            state: dict[str, Any] = LazyMoments(
                stored, lambda entries: self.storage.unpack(entries, group, rotations, shard, dtype)
            )
        else:
            state = self.storage.unpack(stored, group, rotations, shard, dtype)
        state["step"] += 1
        step = int(state["step"])  # a CPU tensor: no device sync

        factors = [state[key] for key in layout.factor_keys]
        if layout.projected and step > 1 and step % group["update_interval"] == 0:
            factors = yield from self._refresh(state, layout, plan, canonical, group, step, item.where, rows)
        # The weight in the compute dtype (a copy for bf16 / fp16 weights); for a row shard it is
        # made after the moment rule's collectives, so that no such copy waits through them.
        target = None if shard is not None else param if param.dtype == dtype else param.to(dtype)
        rule_grad = (yield from self._project(plan, layout, canonical, factors)) if layout.projected else grad
        weight = param if target is None else target
        rms_fraction = item.rms_fraction
        if self.rule.collective:
            direction, decay, alpha = yield from self.rule.update(
                state, rule_grad, group, step, weight, rows, rms_fraction=rms_fraction
            )
        else:
            direction, decay, alpha = self.rule.update(state, rule_grad, group, step, weight, rms_fraction=rms_fraction)
        if target is None:
            target = param if param.dtype == dtype else param.to(dtype)
        local_factors = factors if plan is None else plan.local_factors(factors)
        _apply(target, layout, local_factors, direction, decay, alpha, item.scale)
        self.storage.pack(state, stored, group, rotations, shard, rounding_seed(group["seed"], item.index, step))
        if target is not param:
            param.copy_(target)
        if shard is not None:
            placement.store_sharded(stored_state, stored, shard)

    def _store_waiting_state(
        self,
        item: _PlannedStep,
        stored_state: dict[str, Any],
        stored: dict[str, Any],
        factors: dict[str, Tensor],
        like: Tensor,
    ) -> None:
        """Store the state of a parameter whose gradients so far were all zero: a step count of 0
        (its first step is still to come), ``factors`` and zero moments, as the storage keeps them.
        It exists because ``torch.distributed.checkpoint`` creates state by a step on zero
        gradients and then loads into exactly the keys it finds."""
        group, layout, shard, rotations = item.group, item.layout, item.shard, self.rule.rotations
        fresh = {"step": new_step_counter(), **factors, **self.rule.init(layout.projected_shape, group, like)}
        work = self.storage.unpack(fresh, group, rotations, shard, like.dtype)
        self.storage.pack(work, stored, group, rotations, shard)
        if shard is not None:
            placement.store_sharded(stored_state, stored, shard)

    def _chunkable(self, item: _PlannedStep, stored: dict[str, Any], param: Tensor) -> bool:
        """Whether ``item`` is stepped by :meth:`_chunked_dense_step` (see :meth:`steps_in_chunks`)."""
        return item.shard is None and not item.layout.projected and self.steps_in_chunks(param, item.group)

    def steps_in_chunks(self, param: Tensor, group: dict[str, Any] | None = None) -> bool:
        """Whether a dense (unprojected) ``param`` is stepped :data:`DENSE_CHUNK_NUMEL` entries
        at a time, its first step included: a large, contiguous parameter with an element-wise
        moment rule (Adam's) whose state is stored converted (bfloat16 or 8-bit). The widened
        moments then never exist for the whole tensor."""
        group = self._group_of(param) if group is None else group
        return (
            self.rule.elementwise
            and param.numel() > DENSE_CHUNK_NUMEL
            and param.is_contiguous()
            and (self.storage.options is not None or group["state_dtype"] == torch.bfloat16)
        )

    def _chunked_dense_step(self, item: _PlannedStep, stored: dict[str, Any], param: Tensor, grad: Tensor) -> None:
        """Step a dense parameter ``DENSE_CHUNK_NUMEL`` entries at a time: each chunk's stored
        moments are unpacked, updated with its entries of the gradient and written back in place.

        Chunks start on 8-bit block boundaries, so the codes are those of the whole-tensor step,
        bit for bit; bfloat16 chunks draw their stochastic rounding from streams of their own.
        """
        group, rotations = item.group, self.rule.rotations
        dtype = _compute_dtype(param)
        if not stored:
            # Stored zeros, as packed (8-bit: zero scales, so every code decodes to 0).
            planned = self.planned_state(param, group)
            stored.update({k: torch.zeros(t.shape, dtype=t.dtype, device=param.device) for k, t in planned.items()})
            stored["step"] = new_step_counter()
        stored["step"] += 1
        step = int(stored["step"])
        block = group.get("block_size", 1)
        chunk = max(1, DENSE_CHUNK_NUMEL // block) * block
        weight, gradient = param.view(-1), grad.reshape(-1)
        seed = rounding_seed(group["seed"], item.index, step)
        for number, begin in enumerate(range(0, weight.numel(), chunk)):
            stop = min(begin + chunk, weight.numel())
            views = self.storage.chunk_views(stored, begin, stop, group)
            work = self.storage.unpack(dict(views), group, rotations, None, dtype)
            target = weight[begin:stop] if param.dtype == dtype else weight[begin:stop].to(dtype)
            direction, decay, alpha = self.rule.update(work, gradient[begin:stop], group, step, target)
            _apply(target, item.layout, [], direction, decay, alpha, item.scale)
            packed = dict(views)
            self.storage.pack(work, packed, group, rotations, None, (seed + number * 0x9E3779B97F4A7C15) % 2**63)
            for key, view in views.items():
                if packed.get(key) is not view:
                    view.copy_(packed[key])
            if target.data_ptr() != weight[begin:stop].data_ptr():
                weight[begin:stop].copy_(target)

    @staticmethod
    def _project(plan: ShardPlan | None, layout: Layout, grad: Tensor, factors: list[Tensor]) -> Task[Tensor]:
        if plan is None:
            return layout.project(grad, factors)
        return (yield from plan.project(grad, factors))

    def _problems(
        self,
        plan: ShardPlan | None,
        layout: Layout,
        grad: Tensor,
        moment: Tensor | None,
        factors: list[Tensor] | None,
    ) -> list[Problem]:
        """Each factor's refresh matrices and sums (see :func:`~coap_torch.optim._refresh.local_problems`)."""
        if plan is None:
            return local_problems(layout, grad, moment, factors)
        return plan.factor_problems(grad, moment, factors, self.communication)

    def _refresh(
        self,
        state: dict[str, Any],
        layout: Layout,
        plan: ShardPlan | None,
        grad: Tensor,
        group: dict[str, Any],
        step: int,
        where: str,
        rows: Rows,
    ) -> Task[list[Tensor]]:
        """Refresh P (or P_O, P_I) and move the moments to the new basis; keep both as they were
        when the refresh gives no finite factors (see :mod:`._refresh`)."""
        old = [state[key] for key in layout.factor_keys]
        first = self.rule.refresh_moment(state)
        if first is None:  # no first moment: correlate with the gradient in the previous basis
            first = yield from self._project(plan, layout, grad, old)
        problems = self._problems(plan, layout, grad, first, old)
        new = yield from refreshed_factors(layout, problems, old, group, step, where, rows)
        if new is None:
            return old
        rotations = [P_old.mT @ P_new for P_old, P_new in zip(old, new)]
        for key, kind in self.rule.rotations.items():
            if key in state:
                state[key] = layout.rotate(state[key], rotations, kind)
        for key, P in zip(layout.factor_keys, new):
            state[key] = P
        return new

    # -- planned state and checkpoints ---------------------------------------------------------
    def planned_state(self, param: Tensor, group: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """The state ``param`` will hold after its first step, as ``meta`` tensors (shape and dtype).

        Keys are those of ``optimizer.state[param]`` between steps (``step``, the projections,
        the moments as stored: 8-bit moments as ``*_codes`` / ``*_absmax``). Shapes are global
        for a DTensor parameter (as ``DTensor.shape`` is). Computed from the parameter's shape
        and the options of its group (or of ``group``) alone; nothing is allocated.
        :func:`~coap_torch.estimate_state_bytes` and ``load_state_dict`` use it.
        """
        group = self._group_of(param) if group is None else group
        layout = layout_of(param, group)
        dtype = stored_dtype(group, _compute_dtype(param))
        planned = {"step": torch.empty((), dtype=torch.int64, device="meta")}
        for key, shape in zip(layout.factor_keys, layout.factor_shapes()):
            planned[key] = torch.empty(shape, dtype=dtype, device="meta")
        like = torch.empty(0, dtype=dtype, device="meta")
        shard = None
        if placement.sharded_on_rows(param):
            shard = placement.RowShard(None, tuple(param.shape), 0, param.shape[0], replicated_state(layout))
        for key, moment in self.rule.init(layout.projected_shape, group, like).items():
            planned.update(self.storage.stored(key, moment, group, self.rule.rotations, shard))
        return planned

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"a parameter of shape {tuple(param.shape)} is not in this optimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checked against this optimizer before anything changes.

        * **Hyper-parameters** (``lr``, ``betas``, ``weight_decay`` ...) are taken from the
          checkpoint, as :meth:`torch.optim.Optimizer.load_state_dict` does (LR schedulers rely
          on it).
        * **COAP options** (:data:`COAP_OPTIONS`: ``rank``, ``update_interval``,
          ``correlation_max_norm`` ... and the 8-bit ``block_size`` / ``min_8bit_size``) stay the
          ones this optimizer was built with; a checkpoint that says otherwise gets a warning
          that lists the differences. The exception is ``scale``, which sizes the update as
          ``lr`` does and comes from the checkpoint like it (``1.0`` for a checkpoint that does
          not have it, as the versions that wrote such checkpoints did not scale): a run
          resumes with the update it was trained with, whatever the default of the version
          that resumes it.
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
            loaded["state"], loaded["options"] = checked_state(self, final)
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


def _apply(
    target: Tensor, layout: Layout, factors: list[Tensor], direction: Any, decay: Any, alpha: float, scale: float
) -> None:
    """``target <- decay(target) + alpha * restore(direction)`` in place (times ``scale``, the
    parameter's :meth:`Layout.update_scale`, for projected parameters)."""
    if callable(decay):
        decay(target)
        decay = 1.0
    if layout.projected:
        if isinstance(direction, AdamDirection):
            direction = direction.tensor()
        layout.add_restored_(target, direction, factors, beta=decay, alpha=alpha * scale)
        return
    if isinstance(decay, Tensor) or decay != 1.0:
        target.mul_(decay)
    if isinstance(direction, AdamDirection):  # torch.optim.AdamW's own operation and rounding
        target.addcdiv_(direction.numerator, direction.denominator, value=alpha / direction.bias_correction1)
    else:
        target.add_(direction, alpha=alpha)


def _factor_shapes(layout: Layout, plan: ShardPlan | None) -> list[tuple[int, ...]]:
    """The shapes of the factors a parameter's state holds (this rank's, for a sharded stack)."""
    return layout.factor_shapes() if plan is None else plan.factor_shapes()


def _found_factor_shapes(state: dict[str, Any]) -> list[tuple[int, ...]]:
    return [tuple(placement.local(state[key]).shape) for key in ("proj", "proj_out", "proj_in") if key in state]


def _fits(state: dict[str, Any], layout: Layout, plan: ShardPlan | None) -> bool:
    """Whether ``state`` holds the factors of ``layout``."""
    return _found_factor_shapes(state) == _factor_shapes(layout, plan)


def _check_layout(state: dict[str, Any], layout: Layout, expected: list[tuple[int, ...]], index: int) -> None:
    """Refuse state that was built for another projection (options changed since it was made);
    ``expected`` are the shapes of the stored factors (this rank's, for a sharded stack)."""
    found = _found_factor_shapes(state)
    if found != expected:
        raise ValueError(
            f"the state of parameter {index} of shape {layout.shape} holds projections of shapes {found}, "
            f"but its group's options now give {layout.kind} projections of shapes {expected}; "
            "restore the options the state was created with, or clear it with optimizer.state[param].clear()"
        )


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
        view = group if not tensors else {**group, **{key: _as_number(value) for key, value in tensors.items()}}
        views[id(group)] = view
    return view


def _as_number(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_as_number(v) for v in value)
    return value.item() if isinstance(value, Tensor) else value
