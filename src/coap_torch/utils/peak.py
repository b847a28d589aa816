"""The peak memory of a training step, before training: what a model and an optimizer will need at once.

:func:`~coap_torch.utils.estimate_state_bytes` answers for the optimizer state. A step holds more:
the weights, the gradients, the activations that the forward saves for the backward, the
temporaries of the backward and of the optimizer's update. They are not all alive at the same
time: at the start of the backward the activations are all there and hardly any gradient is; at
the optimizer step every gradient is there and the activations are gone. Adding the largest of
each would count memory that never exists at once (by 10% and more on small LLaMA models), so
:func:`estimate_peak_bytes` follows them through a step, as a memory profiler would:

1. it runs one forward and backward of the model on a small ``sample_batch`` inside a
   ``TorchDispatchMode`` that records, at every allocation, the bytes of live gradients and of
   everything else the step allocated (activations, backward temporaries). A storage that becomes
   a parameter's ``.grad`` counts as a gradient from the moment it was allocated;
2. everything that is not a gradient is scaled by ``batch_size / sample_batch_size``: activations
   grow linearly with the batch, the gradients do not;
3. it measures the temporaries of the optimizer's update by stepping the real optimizer on CPU
   copies of the parameters (shrunk, for large ones: see below), and places them where the update
   runs: after the backward, with every gradient alive, or, with per-layer updates, inside the
   backward, each next to the activations still alive when its gradient is ready;
4. the peak is the largest of these moments, plus the weights and the optimizer state, which live
   through the whole step. :class:`PeakEstimate` says what is alive at that moment, part by part.

The model may live on the ``meta`` device: the forward then allocates nothing and the counting is
the same (the forward and backward of LLaMA-7B take about a second). On ``meta`` the forward cannot read a
tensor's value (``.item()``, ``bool(tensor)``); a model that branches on one needs that branch
taken out (``coap-bench memory --fit`` does so for transformers' packed-sequence check).

What it leaves out: the sample batch itself, allocator rounding and caching, and library
workspaces that do not go through PyTorch's allocator (cuBLAS, NCCL): on a GPU, add a margin.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from ..optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit, LowRankOptimizer
from ..optim._base import DENSE_CHUNK_NUMEL
from .allocations import PeakAllocations
from .estimate import estimate_state_bytes, named_param_groups
from .memory import _tensors

__all__ = ["PEAK_OPTIMIZER_NAMES", "PeakEstimate", "estimate_peak_bytes"]

#: The optimizers :func:`estimate_peak_bytes` knows by name: ours, and ``torch.optim.AdamW``.
_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "coap_adamw": CoapAdamW,
    "coap_adamw8bit": CoapAdamW8bit,
    "coap_adafactor": CoapAdafactor,
    "coap_adafactor8bit": CoapAdafactor8bit,
    "adamw": torch.optim.AdamW,
}
PEAK_OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)

#: Parameters up to this many entries are stepped at their size to measure the update's temporaries;
#: larger ones on two shrunk copies of about 1 and 1/4 times it (see :func:`_update_temporaries`).
_PROXY_NUMEL = 1 << 19


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes alive at the peak of a training step, by what holds them; the parts add up to ``total``.

    The parts are what is alive *at the moment of the peak* (:attr:`phase`), not the largest each
    part ever gets: a peak at the start of the backward holds every activation and few gradients,
    a peak at the optimizer step every gradient and almost no activation.

    Attributes:
        optimizer: the optimizer's name.
        weights: parameters and buffers, in their dtype (each storage once).
        gradients: gradients alive at the peak, in their parameters' dtype.
        state: optimizer state (:func:`~coap_torch.utils.estimate_state_bytes`).
        activations: what the forward saved and the backward allocated that is alive at the peak,
            other than gradients, scaled to ``batch_size``.
        optimizer_temporaries: the update's temporaries alive at the peak (one parameter's update:
            our optimizers update one large parameter at a time).
        total: the sum of the five: the peak (``int(estimate)`` too).
        phase: when the peak happens, one of ``"forward"``, ``"backward"``, ``"per-layer update"``
            (inside the backward) and ``"optimizer step"``.
        batch_size: the batch the estimate is for; ``sample_batch_size``: the one measured.
        per_layer_updates: whether each parameter is updated during the backward.
        all_gradients: bytes of all the gradients at once, what regular training holds at its step
            (per-layer updates never hold them all).
    """

    optimizer: str
    weights: int
    gradients: int
    state: int
    activations: int
    optimizer_temporaries: int
    total: int
    phase: str
    batch_size: int
    sample_batch_size: int
    per_layer_updates: bool
    all_gradients: int

    def __int__(self) -> int:
        return self.total

    @property
    def parts(self) -> dict[str, int]:
        """The five parts by name, in the order of the fields; they sum to ``total``."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "state": self.state,
            "activations": self.activations,
            "optimizer_temporaries": self.optimizer_temporaries,
        }

    @property
    def mib(self) -> float:
        """``total`` in MiB (2**20 bytes)."""
        return self.total / 2**20

    @property
    def gib(self) -> float:
        """``total`` in GiB (2**30 bytes), the unit GPU memory is sold in."""
        return self.total / 2**30

    def __str__(self) -> str:
        updates = ", per-layer updates" if self.per_layer_updates else ""
        title = (
            f"{self.optimizer}, batch {self.batch_size}{updates}: peak {self.total:,} bytes "
            f"({self.mib:,.2f} MiB) during the {self.phase}"
        )
        parts = [f"  {name.replace('_', ' ')}: {value / 2**20:,.2f} MiB" for name, value in self.parts.items()]
        return "\n".join([title, *parts])


# -- the timeline of one forward and backward -----------------------------------------------------
class _Timeline(TorchDispatchMode):
    """Records, at every allocation, the live bytes of gradients and of everything else.

    Storages are told apart by their ``StorageImpl`` (``_cdata``), which meta tensors have too, and
    released when it is freed (a storage's Python object lives exactly as long as it does), so views,
    in-place ops and autograd's saved copies of a tensor all count its storage once. Storages that
    existed before (weights, the batch) are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.other: list[int] = []  # per event: live bytes that are not gradients
        self.grads: list[int] = []  # per event: live gradient bytes
        self._live: dict[int, tuple[int, int]] = {}  # storage -> (bytes, event at which it was allocated)
        self._gradient_storages: set[int] = set()
        self._moved: list[tuple[int, int, int]] = []  # (first event, last event + 1, bytes): became a gradient
        self._other_now = 0
        self._grads_now = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            raise RuntimeError(
                "the forward reads a tensor's value (.item(), bool(tensor), a Python if on a tensor), which a meta "
                "tensor does not have: take that branch out of the forward, or estimate on a real, smaller model"
            )
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self._allocated(tensor, inputs)
        return out

    def _allocated(self, tensor: Tensor, inputs: set[int]) -> None:
        key = _key(tensor)
        if key is None or key in self._live or key in inputs:  # a view or an in-place result: no new memory
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return
        self._live[key] = (storage.nbytes(), len(self.other))
        self._other_now += storage.nbytes()
        weakref.finalize(storage, self._freed, key)
        self._record()

    def _freed(self, key: int) -> None:
        nbytes, _ = self._live.pop(key, (0, 0))
        if key in self._gradient_storages:
            self._gradient_storages.discard(key)
            self._grads_now -= nbytes
        else:
            self._other_now -= nbytes

    def _record(self) -> None:
        self.other.append(self._other_now)
        self.grads.append(self._grads_now)

    def gradient_ready(self, grad: Tensor) -> int:
        """Count ``grad``'s storage as a gradient from its allocation on; returns the event of this moment."""
        key = _key(grad)
        if key in self._live and key not in self._gradient_storages:
            nbytes, first = self._live[key]
            self._gradient_storages.add(key)
            self._other_now -= nbytes
            self._grads_now += nbytes
            self._moved.append((first, len(self.other), nbytes))
        self._record()
        return len(self.other) - 1

    @property
    def now(self) -> tuple[int, int]:
        """(other, gradient) bytes live now."""
        return self._other_now, self._grads_now

    def settle(self) -> None:
        """Move each gradient's bytes to the gradient column over the events between its allocation and
        the moment it became ``.grad`` (it was the gradient being computed: it does not grow with the batch)."""
        delta = [0] * (len(self.other) + 1)
        for first, last, nbytes in self._moved:
            delta[first] += nbytes
            delta[last] -= nbytes
        shift = 0
        for index in range(len(self.other)):
            shift += delta[index]
            self.other[index] -= shift
            self.grads[index] += shift
        self._moved.clear()


def _key(tensor: Tensor) -> int | None:
    """The tensor's ``StorageImpl``, or ``None`` for a tensor without one (sparse, nested)."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


@dataclass(frozen=True)
class _Trace:
    """What :func:`_trace` saw: per-event live bytes, where the backward started, the per-layer
    update points ``(event, param)``, and what was live at the end of the backward."""

    other: list[int]
    grads: list[int]
    backward_start: int
    updates: list[tuple[int, Tensor]]
    end_other: int
    end_grads: int


def _trace(
    model: nn.Module,
    forward: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    optimized: set[int],
    per_layer: bool,
) -> _Trace:
    """One forward and backward of ``model`` on ``batch``, recorded; the model is left as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    timeline = _Timeline()
    updates: list[tuple[int, Tensor]] = []

    def ready(param: Tensor) -> None:
        if param.grad is None:
            return
        event = timeline.gradient_ready(param.grad)
        if per_layer and id(param) in optimized:
            updates.append((event, param))
            param.grad = None  # what the per-layer update does after updating

    saved_grads = [p.grad for p in params]
    saved_buffers = [(module, name, buf, buf.detach().clone()) for module, name, buf in _buffers(model)]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    handles = [p.register_post_accumulate_grad_hook(ready) for p in params]
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), timeline:
            loss = forward(model, batch)
            _check_loss(loss)
            backward_start = len(timeline.other)
            loss.backward()
            del loss
            end_other, end_grads = timeline.now
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for module, name, buf, values in saved_buffers:
                setattr(module, name, buf)
                if not buf.is_meta:
                    buf.copy_(values)
    timeline.settle()
    return _Trace(timeline.other, timeline.grads, backward_start, updates, end_other, end_grads)


def _buffers(model: nn.Module) -> Iterable[tuple[nn.Module, str, Tensor]]:
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            yield module, name, buf


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"forward must return the scalar loss, got {what}; pass forward=lambda model, batch: ... returning "
            "the loss the training step calls backward() on"
        )
    if not loss.requires_grad:
        raise ValueError("forward returned a loss that does not require grad: no parameter is trained through it")


def _default_forward(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``;
    the output's ``.loss`` if it has one (Hugging Face models given labels), else the output."""
    if isinstance(batch, Mapping):
        output = model(**batch)
    elif isinstance(batch, (tuple, list)):
        output = model(*batch)
    else:
        output = model(batch)
    loss = getattr(output, "loss", None)
    return output if loss is None else loss


# -- the optimizer: its state and the temporaries of its update ----------------------------------------
def _factory(optimizer: str | Callable[..., Any]) -> tuple[str, Callable[..., Any]]:
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; known: {', '.join(PEAK_OPTIMIZER_NAMES)}, or pass an optimizer "
                "class with state_bytes=..."
            )
        return optimizer, _OPTIMIZERS[optimizer]
    if callable(optimizer):
        return getattr(optimizer, "__name__", type(optimizer).__name__), optimizer
    raise TypeError(f"optimizer must be a name or an optimizer class, got {type(optimizer).__name__}")


def _state_bytes(name: str, build: Callable[..., Any], params: Any, options: dict[str, Any]) -> int:
    """The optimizer state: ours from their own plan, ``torch.optim.AdamW``'s two (three with ``amsgrad``)
    moments of the parameter's shape and dtype."""
    if name in _OPTIMIZERS and name != "adamw":
        return estimate_state_bytes(params, name, **options).total
    groups, _, _ = named_param_groups(params)
    try:
        built = build(groups, **options)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from None
    total = 0
    for group in built.param_groups:
        moments = 3 if group.get("amsgrad") else 2
        total += sum(moments * p.numel() * p.element_size() for p in group["params"] if p.requires_grad)
    return total


def _proxy_shape(shape: tuple[int, ...], shrink: float) -> tuple[int, ...]:
    """``shape`` with its two leading dims divided by ``shrink`` (a vector's length by ``shrink**2``)."""
    if shrink == 1 or not shape:
        return shape
    if len(shape) == 1:
        return (max(1, round(shape[0] / shrink**2)),)
    return (max(1, round(shape[0] / shrink)), max(1, round(shape[1] / shrink)), *shape[2:])


def _shrink_rank(options: dict[str, Any], shrink: float) -> dict[str, Any]:
    rank = options.get("rank")
    if shrink == 1 or not isinstance(rank, int) or isinstance(rank, bool):
        return options
    return {**options, "rank": max(1, round(rank / shrink))}


_Shapes = list[tuple[dict[str, Any], list[tuple[tuple[int, ...], torch.dtype]]]]


def _measure_update(build: Callable[..., Any], groups: _Shapes, options: dict[str, Any]) -> int:
    """:func:`_measured_update`, once per process for each optimizer, options, shapes and dtypes."""
    key = (build, repr([(sorted(group.items()), shapes) for group, shapes in groups]), repr(sorted(options.items())))
    if key not in _MEASURED:
        _MEASURED[key] = _measured_update(build, groups, options)
    return _MEASURED[key]


_MEASURED: dict[tuple[Any, ...], int] = {}


def _measured_update(build: Callable[..., Any], groups: _Shapes, options: dict[str, Any]) -> int:
    """Peak bytes one ``optimizer.step()`` allocates on top of weights, gradients and state, for CPU
    parameters of these shapes and dtypes in these groups, with random gradients: the most that a step
    holds above what it leaves (the state, counted from the start so that a refresh, which replaces
    it, shows what it really holds). Three steps: COAP refreshes ``P`` at the second and third (a
    low-cost SVD, then an Eq. 2 update), which training reaches every ``update_interval``; then the
    first step (the initial ``P``) again, on a fresh optimizer, now that the caches an optimizer
    builds once per process (8-bit code tables) exist, as they do in training after its first step."""
    generator = torch.Generator().manual_seed(0)

    def tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=generator).to(dtype)

    def fresh() -> torch.optim.Optimizer:
        params = [{**group, "params": [nn.Parameter(tensor(s, d)) for s, d in shapes]} for group, shapes in groups]
        optimizer = build(params, **options)
        for group in optimizer.param_groups:
            if isinstance(optimizer, LowRankOptimizer):
                group.update(update_interval=1, reproject_factor=2)
            for param in group["params"]:
                param.grad = tensor(tuple(param.shape), param.dtype)
        return optimizer

    def transient(optimizer: torch.optim.Optimizer) -> int:
        # The state from a generator: a list here would keep the tensors a refresh replaces alive.
        with PeakAllocations(existing=_tensors(optimizer.state)) as peak:
            optimizer.step()
        return peak.peak_bytes - peak.live_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random gradients: whatever the optimizer remarks about them
        optimizer = fresh()
        transient(optimizer)
        peaks = [transient(optimizer), transient(optimizer), transient(fresh())]
    return max(0, *peaks)


def _routing(build: Callable[..., Any], group: dict[str, Any], options: dict[str, Any], shape: tuple[int, ...],
             dtype: torch.dtype) -> dict[str, torch.dtype] | None:  # fmt: skip
    """The tensors our optimizers plan for a parameter of ``shape`` (keys and dtypes), ``None`` for
    others. For a matrix or a kernel, its vectors (Adafactor's row and column accumulators, which a
    shrunk copy may keep in float32 where the parameter has them 8-bit) are left out: next to the
    matrix's they weigh nothing in the update."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
    optimizer = build([{**group, "params": [param]}], **options)
    if not isinstance(optimizer, LowRankOptimizer):
        return None
    planned = optimizer.planned_state(param).items()
    return {key: tensor.dtype for key, tensor in planned if len(shape) < 2 or tensor.dim() >= 2}


def _in_chunks(build: Callable[..., Any], group: dict[str, Any], options: dict[str, Any], shape: tuple[int, ...],
               dtype: torch.dtype) -> bool:  # fmt: skip
    """Whether our optimizer steps a parameter of ``shape`` densely a chunk at a time
    (:meth:`~coap_torch.optim.LowRankOptimizer.steps_in_chunks`)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
    optimizer = build([{**group, "params": [param]}], **options)
    if not isinstance(optimizer, LowRankOptimizer):
        return False
    dense = not any(key.startswith("proj") for key in optimizer.planned_state(param))
    return dense and optimizer.steps_in_chunks(param) and _PROXY_NUMEL > DENSE_CHUNK_NUMEL


def _update_bytes(
    build: Callable[..., Any], group: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype,
    options: dict[str, Any],
) -> int:  # fmt: skip
    """The temporaries of updating one parameter of ``shape`` (see :func:`_update_temporaries`)."""
    numel = math.prod(shape)
    if numel > _PROXY_NUMEL and _in_chunks(build, group, options, shape, dtype):
        # Stepped a chunk at a time: its temporaries are those of a few chunks, whatever its size.
        return _measure_update(build, [(group, [((_PROXY_NUMEL,), dtype)])], options)
    if numel > _PROXY_NUMEL:
        shrinks = [math.sqrt(numel / _PROXY_NUMEL), 2 * math.sqrt(numel / _PROXY_NUMEL)]
        proxies = [(_proxy_shape(shape, s), _shrink_rank(group, s), _shrink_rank(options, s)) for s in shrinks]
        routing = _routing(build, group, options, shape, dtype)
        if all(_routing(build, g, o, s, dtype) == routing for s, g, o in proxies):
            sizes = [math.prod(s) for s, _, _ in proxies]
            measured = [_measure_update(build, [(g, [(s, dtype)])], o) for s, g, o in proxies]
            slope = max(0.0, (measured[0] - measured[1]) / (sizes[0] - sizes[1]))
            return max(measured[0], round(measured[0] + slope * (numel - sizes[0])))
    return _measure_update(build, [(group, [(shape, dtype)])], options)


def _update_temporaries(
    build: Callable[..., Any], groups: list[dict[str, Any]], options: dict[str, Any], per_layer: bool
) -> tuple[dict[int, int], int]:
    """The update temporaries of each parameter stepped alone (by ``id``), and of a regular ``step()``.

    They are measured by stepping the real optimizer on CPU parameters of the same shapes, dtypes
    and options, with random gradients. A parameter of up to :data:`_PROXY_NUMEL` entries is
    stepped at its size. A larger one is stepped on two copies whose two leading dims (and
    ``rank``, so that the rank ratio stays) are shrunk to about 1 and 1/4 times :data:`_PROXY_NUMEL`
    entries, and the two figures are extended along the line through them to its size: the update's
    tensors are products of two of (m, n, r), which all shrink alike, plus fixed-size buffers, which
    the line's intercept holds. Where a copy falls under a size threshold of the optimizer that the
    parameter is over, the line is off: for 8-bit projected moments, whose encoder works in chunks of
    2**18 values, it overestimates their update's temporaries by about a quarter (a small part of
    the peak: one parameter's update is alive at a time). A copy whose planned state differs from
    the parameter's (another routing, moments not 8-bit; see :func:`_routing`) is not used: the
    parameter is then stepped at its size. A regular ``step()`` updates the small parameters together
    (the small dense ones in bulk) and the large ones one by one. Each measurement is made once per
    process (:func:`_measure_update`).
    """
    signatures: dict[tuple[int, tuple[int, ...], torch.dtype], list[int]] = {}
    small: _Shapes = []
    for index, group in enumerate(groups):
        group_options = {k: v for k, v in group.items() if k != "params"}
        shapes = []
        for param in group["params"]:
            if param.requires_grad:
                signatures.setdefault((index, tuple(param.shape), param.dtype), []).append(id(param))
                if param.numel() <= _PROXY_NUMEL:
                    shapes.append((tuple(param.shape), param.dtype))
        if shapes:
            small.append((group_options, shapes))
    alone: dict[int, int] = {}
    largest = 0
    for (index, shape, dtype), ids in signatures.items():
        large = math.prod(shape) > _PROXY_NUMEL
        if not (per_layer or large):
            continue  # a regular step updates the small ones together: measured below
        group_options = {k: v for k, v in groups[index].items() if k != "params"}
        nbytes = _update_bytes(build, group_options, shape, dtype, options)
        alone.update(dict.fromkeys(ids, nbytes))
        largest = max(largest, nbytes) if large else largest
    together = _measure_update(build, small, options) if small and not per_layer else 0
    return alone, max(largest, together)


# -- the estimate ---------------------------------------------------------------------------------------
def _peak_moment(trace: _Trace, scale: float, alone: dict[int, int], step: int | None) -> tuple[str, int, int, int]:
    """When the step holds the most, and (gradients, activations, update temporaries) then: at each
    allocation of the forward and backward, at each per-layer update (its temporaries next to what is
    alive then), and at the optimizer's ``step()`` (its temporaries ``step``, after the backward;
    ``None`` with per-layer updates). Activations are scaled by ``scale``."""
    best = (-1, "forward", 0, 0, 0)  # (live, phase, gradients, activations, temporaries)
    for index, (other, grads) in enumerate(zip(trace.other, trace.grads)):
        activations = round(other * scale)
        if activations + grads > best[0]:
            best = (
                activations + grads,
                "forward" if index < trace.backward_start else "backward",
                grads,
                activations,
                0,
            )
    for index, param in trace.updates:
        activations, grads, temporaries = round(trace.other[index] * scale), trace.grads[index], alone[id(param)]
        if activations + grads + temporaries > best[0]:
            best = (activations + grads + temporaries, "per-layer update", grads, activations, temporaries)
    if step is not None:
        activations, grads = round(trace.end_other * scale), trace.end_grads
        if activations + grads + step >= best[0]:  # a tie: the peak lasts through the step
            best = (activations + grads + step, "optimizer step", grads, activations, step)
    return best[1:]


def _weights(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each storage once (tied weights share one)."""
    storages = {_key(t) or id(t): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def _batch_size(batch: Any) -> int:
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise ValueError(
        f"sample_batch must hold a tensor with a batch dimension (dim 0), got {type(batch).__name__}"
        + (f" {batch!r}" if isinstance(batch, (int, float)) else "")
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _refuse_hooks(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if getattr(param, "_post_accumulate_grad_hooks", None):
            raise ValueError(
                f"model: parameter {name!r} has a post-accumulate-grad hook (per-layer updates?), which the "
                "measuring backward would run, updating the model; estimate before enabling them"
            )


def estimate_peak_bytes(
    model: nn.Module,
    optimizer: str | Callable[..., torch.optim.Optimizer],
    *,
    sample_batch: Any,
    batch_size: int | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    params: Iterable[Any] | None = None,
    per_layer_updates: bool = False,
    state_bytes: int | None = None,
    **optimizer_kwargs: Any,
) -> PeakEstimate:
    """The peak bytes of a training step of ``model`` with ``optimizer`` at ``batch_size``.

    The step is ``loss = forward(model, batch); loss.backward(); optimizer.step();
    optimizer.zero_grad()``, or, with ``per_layer_updates``, the backward alone, each parameter
    updated (and its gradient freed) as soon as its gradient is ready
    (:func:`~coap_torch.optim.enable_per_layer_updates`). The figure bounds every step: the state
    is counted whole, and the update's temporaries are the largest of the first step's (the initial
    ``P``) and of a refresh's. Runs one forward and backward of ``model`` on ``sample_batch`` (see
    the module's description); gradients, buffers (BatchNorm statistics) and the global RNG are left
    as they were.

    Args:
        model: the model, on any device, ``meta`` included, in the mode it trains in (``train()``).
        optimizer: one of :data:`PEAK_OPTIMIZER_NAMES`: ``"coap_adamw"``, ``"coap_adamw8bit"``,
            ``"coap_adafactor"``, ``"coap_adafactor8bit"``, ``"adamw"`` (``torch.optim.AdamW``: moments
            in the parameter's dtype), or an optimizer class (then ``state_bytes`` is required). The
            update is measured by running the optimizer on the CPU, one large parameter at a time:
            ``torch.optim.AdamW``'s multi-tensor ``foreach`` path (its default on GPUs) holds
            temporaries for many parameters at once, which this leaves out.
        sample_batch: a small batch, the input of ``forward``: a tensor or a structure (tuple, dict)
            of tensors whose dim 0 is the batch; moved to the model's device.
        batch_size: the batch to estimate for (default: the sample's). Activations are scaled
            linearly from the sample; tensors that do not grow with the batch are scaled too (an
            overestimate, small when they are).
        forward: ``forward(model, batch) -> loss``, the scalar that ``backward()`` is called on.
            Default: ``model(batch)`` (``model(**batch)`` for a dict, ``model(*batch)`` for a tuple),
            its ``.loss`` if it has one (Hugging Face models given ``labels``).
        params: the optimizer's ``params`` (parameters or param groups with their options, as for
            :func:`~coap_torch.utils.estimate_state_bytes`); default: the model's parameters.
        per_layer_updates: update during the backward. Our optimizers do it with
            :func:`~coap_torch.optim.enable_per_layer_updates`; other optimizers with PyTorch's
            recipe of one optimizer per parameter stepped in a post-accumulate-grad hook.
        state_bytes: the optimizer state's bytes, instead of the estimate (required for a class).
        **optimizer_kwargs: the optimizer's constructor arguments (``rank``, ``rank_ratio_matrix``,
            ``state_dtype``, ``beta1`` ...), validated by its constructor.

    Returns:
        a :class:`PeakEstimate`: ``total`` and, part by part, what is alive at the peak.

    Raises:
        ValueError: an unknown optimizer name, a bad ``batch_size`` or ``state_bytes``, a
            ``sample_batch`` without a batch dimension, a ``forward`` that does not return a
            scalar loss, a model without trainable parameters or with per-layer hooks already set.
        TypeError: a ``model`` that is not a module, an argument the optimizer does not take.

    Example:
        >>> import torch
        >>> from coap_torch.utils.peak import estimate_peak_bytes
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
        >>> peak = estimate_peak_bytes(
        ...     model, "coap_adamw", sample_batch=torch.randn(8, 512), batch_size=1024,
        ...     forward=lambda model, x: model(x).square().mean(), rank_ratio_matrix=4,
        ... )
        >>> peak.weights, peak.state  # fp32 weights; per matrix P (512, 128) and two moments (2048, 128)
        (8398848, 4739072)
        >>> peak.phase  # at this batch the activations set the peak, early in the backward
        'backward'
        >>> peak.total == sum(peak.parts.values())
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, build = _factory(optimizer)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, batch), got {type(forward).__name__}")
    if not isinstance(per_layer_updates, bool):
        raise TypeError(f"per_layer_updates must be a bool, got {per_layer_updates!r}")
    sample_size = _batch_size(sample_batch)
    target = sample_size if batch_size is None else _positive_int("batch_size", batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameter (requires_grad=True): no step to estimate")
    _refuse_hooks(model)
    if params is None:
        params = list(model.parameters())
    elif not isinstance(params, Tensor):
        params = list(params)  # read twice (state, update): a generator would be spent by the first
    if state_bytes is not None:
        if isinstance(state_bytes, bool) or not isinstance(state_bytes, int) or state_bytes < 0:
            raise ValueError(f"state_bytes must be a non-negative int, got {state_bytes!r}")
        groups, _, _ = named_param_groups(params)
        state = state_bytes
    elif name in _OPTIMIZERS:
        groups, _, _ = named_param_groups(params)
        state = _state_bytes(name, build, params, optimizer_kwargs)
    else:
        raise ValueError(f"state_bytes is required for an optimizer class ({name}): give its state's bytes")

    device = trainable[0].device
    batch = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, sample_batch)
    optimized = {id(p) for group in groups for p in group["params"]}
    trace = _trace(model, forward or _default_forward, batch, optimized, per_layer_updates)
    alone, regular = _update_temporaries(build, groups, optimizer_kwargs, per_layer_updates)

    phase, gradients, activations, temporaries = _peak_moment(
        trace, target / sample_size, alone, None if per_layer_updates else regular
    )
    weights = _weights(model)
    return PeakEstimate(
        optimizer=name,
        weights=weights,
        gradients=gradients,
        state=state,
        activations=activations,
        optimizer_temporaries=temporaries,
        total=weights + gradients + state + activations + temporaries,
        phase=phase,
        batch_size=target,
        sample_batch_size=sample_size,
        per_layer_updates=per_layer_updates,
        all_gradients=sum(p.numel() * p.element_size() for p in trainable),
    )
