"""What other libraries' optimizers keep as state, and the state estimate of every optimizer ``coap-bench``
compares, from shapes alone.

:func:`coap_torch.estimate_state_bytes` covers our own optimizers (each one's own
:meth:`~coap_torch.optim.LowRankOptimizer.planned_state`). The peers are written down here, from
their code: ``torch.optim.AdamW``, transformers' ``Adafactor``, bitsandbytes' ``AdamW8bit`` and
galore-torch's three optimizers. :func:`estimate_state_bytes` builds the real optimizer (so its
constructor validates the options), then lists, parameter by parameter, the tensors its first
``step()`` would create; for our optimizers it is the library's function.

Bytes are counted as :func:`~coap_torch.utils.optimizer_state_nbytes` counts them (each storage
once, with all its bytes; ``step`` counters left out), so on a real model the two agree to the
byte after any number of steps. The parameters may live on the ``meta`` device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch import StateEstimate
from coap_torch import estimate_state_bytes as estimate_our_state_bytes
from coap_torch.utils.estimate import OPTIMIZER_NAMES as OUR_OPTIMIZER_NAMES
from coap_torch.utils.estimate import named_param_groups

__all__ = ["OPTIMIZER_NAMES", "PEER_NAMES", "estimate_state_bytes"]

#: bitsandbytes quantizes blocks of 256 values (one float32 absmax each) with a 256-entry code map.
_BNB_BLOCK = 256
_BNB_QMAP_ENTRIES = 256
#: The per-group options of galore-torch; a group that sets ``rank`` is projected.
_GALORE_GROUP_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
_GALORE_SIDES = {"std", "reverse_std", "right", "left", "full"}


@dataclass(frozen=True)
class _Buffer:
    """One tensor of a parameter's state: its key, element count and element size.

    ``shared`` names a storage that every parameter with this buffer points at (counted once).
    """

    key: str
    numel: int
    itemsize: int
    shared: str | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _buffer(key: str, shape: Iterable[int], dtype: torch.dtype) -> _Buffer:
    return _Buffer(key, math.prod(shape), dtype.itemsize)


# -- peers: their state layouts, read from their code ------------------------------------------
def _float_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # transformers' Adafactor (and GaLore's) promote fp16 / bf16 gradients to float32 first.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _adamw_buffers(shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> list[_Buffer]:
    """``torch.optim.AdamW``: ``zeros_like(param)`` moments (the param's dtype)."""
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
    return [_buffer(key, shape, dtype) for key in keys]


def _adafactor_buffers(shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> list[_Buffer]:
    """transformers' ``Adafactor`` on a gradient of ``shape`` and (promoted) ``dtype``.

    Tensors of 2 or more dims keep the factored second moment over their *last two* dims (a 3x3
    conv kernel (O, I, 3, 3) keeps (O, I, 3) rows and (O, I, 3) columns), ``exp_avg`` only with
    ``beta1``, and ``RMS``, a 0-d tensor rewritten every step.
    """
    buffers = [_buffer("exp_avg", shape, dtype)] if group["beta1"] is not None else []
    if len(shape) >= 2:
        buffers += [
            _buffer("exp_avg_sq_row", shape[:-1], dtype),
            _buffer("exp_avg_sq_col", shape[:-2] + shape[-1:], dtype),
        ]
    else:
        buffers.append(_buffer("exp_avg_sq", shape, dtype))
    return [*buffers, _buffer("RMS", (), dtype)]


def _bnb_buffers(numel: int, config: dict[str, Any]) -> list[_Buffer]:
    """bitsandbytes' 2-state optimizers: float32 below ``min_8bit_size``, else uint8 + absmax + code maps."""
    buffers = []
    if config["optim_bits"] == 32 or numel < config["min_8bit_size"]:
        buffers = [_Buffer("state1", numel, 4), _Buffer("state2", numel, 4)]
    else:
        blocks = -(-numel // _BNB_BLOCK)
        for index, qmap in ((1, "dynamic"), (2, "udynamic")):
            buffers += [
                _Buffer(f"state{index}", numel, 1),
                _Buffer(f"qmap{index}", _BNB_QMAP_ENTRIES, 4, shared=qmap),
                _Buffer(f"absmax{index}", blocks, 4),
            ]
    if config["max_unorm"] > 0.0:
        buffers.append(_Buffer("unorm_vec", 1, 4))
    return buffers


def _galore_projection(
    shape: tuple[int, ...], rank: int | None, proj_type: str, dtype: torch.dtype
) -> tuple[tuple[int, ...], _Buffer]:
    """(projected shape, projector buffer) of galore-torch's ``GaLoreProjector`` on a matrix.

    The projector keeps ``Vh[:r]`` (or ``U[:, :r]``) of a full ``torch.linalg.svd``. For float32
    gradients that is a *view*, which pins the whole (k, n) / (m, k) factor, k = min(m, n); other
    dtypes get a compact (r, n) / (m, r) copy in the gradient's dtype.
    """
    m, n = shape
    k = min(m, n)
    r = k if rank is None else min(int(rank), k)
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(
        proj_type, proj_type
    )
    pinned = dtype == torch.float32
    right, left = (k * n, m * k) if pinned else (r * n, m * r)
    numel, projected = {"right": (right, (m, r)), "left": (left, (r, n)), "full": (right + left, (r, r))}[side]
    return projected, _Buffer("projector", numel, dtype.itemsize)


def _check_galore_param(name: str, param: Tensor, group: dict[str, Any]) -> None:
    if param.ndim != 2:
        raise ValueError(
            f"GaLore projects matrices only, but {name} of shape {tuple(param.shape)} is in a group with "
            f"rank={group['rank']}: its projector fails on other shapes; put it in a group without 'rank'"
        )
    if group["proj_type"] not in _GALORE_SIDES:
        raise ValueError(f"unknown GaLore proj_type {group['proj_type']!r}; choose from {sorted(_GALORE_SIDES)}")


# -- one planner per family: (optimizer, param, group, site) -> buffers ------------------------
@dataclass(frozen=True)
class _Site:
    """Where a parameter sits in the optimizer: group index, index in the group, name."""

    group: int
    index: int
    name: str


Planner = Callable[[Any, Tensor, dict[str, Any], _Site], list[_Buffer]]


def _plan_adamw(optimizer: Any, param: Tensor, group: dict[str, Any], site: _Site) -> list[_Buffer]:
    return _adamw_buffers(tuple(param.shape), param.dtype, group)


def _plan_adafactor(optimizer: Any, param: Tensor, group: dict[str, Any], site: _Site) -> list[_Buffer]:
    return _adafactor_buffers(tuple(param.shape), _float_grad_dtype(param.dtype), group)


def _plan_bnb(optimizer: Any, param: Tensor, group: dict[str, Any], site: _Site) -> list[_Buffer]:
    # get_config also applies bitsandbytes' per-parameter overrides (GlobalOptimManager).
    return _bnb_buffers(param.numel(), optimizer.get_config(site.group, site.index, group))


def _galore(inner: Callable[..., list[_Buffer]], grad_dtype: Callable[[torch.dtype], torch.dtype]) -> Planner:
    """A GaLore planner: ``inner`` state on the projected gradient, plus the projector."""

    def plan(optimizer: Any, param: Tensor, group: dict[str, Any], site: _Site) -> list[_Buffer]:
        if "rank" not in group:
            return inner(optimizer, param, group, site)
        _check_galore_param(site.name, param, group)
        dtype = grad_dtype(param.dtype)
        projected, projector = _galore_projection(tuple(param.shape), group["rank"], group["proj_type"], dtype)
        # The moments (and GaLore 8-bit's swapped-in p.data) have the projected gradient's shape.
        low_rank = torch.empty(projected, dtype=param.dtype, device="meta")
        return [projector, *inner(optimizer, low_rank, group, site)]

    return plan


# -- the registry ------------------------------------------------------------------------------
def _torch_adamw(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **kwargs)


def _import(module: str, attribute: str, package: str) -> Any:
    try:
        imported = __import__(module, fromlist=[attribute])
    except ImportError as error:
        raise ImportError(f"{package} is not installed (pip install {package})", name=package) from error
    return getattr(imported, attribute)


def _lazy(module: str, attribute: str, package: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        with warnings.catch_warnings():  # GaLore's AdamW warns that it is deprecated when built
            warnings.simplefilter("ignore", FutureWarning)
            return _import(module, attribute, package)(params, **kwargs)

    return build


#: name -> (optimizer class or factory, planner). The names of the benchmark registry.


#: name -> (optimizer class or factory, planner): the peers of the benchmark registry.
_REGISTRY: dict[str, tuple[Callable[..., Any], Planner]] = {
    "adamw": (_torch_adamw, _plan_adamw),
    "adafactor": (_lazy("transformers.optimization", "Adafactor", "transformers"), _plan_adafactor),
    "adamw8bit": (_lazy("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"), _plan_bnb),
    "galore_adamw": (_lazy("galore_torch", "GaLoreAdamW", "galore-torch"), _galore(_plan_adamw, lambda d: d)),
    "galore_adamw8bit": (
        _lazy("galore_torch", "GaLoreAdamW8bit", "galore-torch"),
        _galore(_plan_bnb, lambda d: d),
    ),
    "galore_adafactor": (
        _lazy("galore_torch", "GaLoreAdafactor", "galore-torch"),
        _galore(_plan_adafactor, _float_grad_dtype),
    ),
}

#: The peers' names, and every name :func:`estimate_state_bytes` knows (the peers, then ours).
PEER_NAMES: tuple[str, ...] = tuple(_REGISTRY)
OPTIMIZER_NAMES: tuple[str, ...] = (*PEER_NAMES, *OUR_OPTIMIZER_NAMES)


def _galore_groups(groups: list[dict[str, Any]], options: dict[str, Any], flat: bool) -> list[dict[str, Any]]:
    """GaLore's per-group options (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) as GaLore reads them.

    With a model or a flat list of parameters, ``rank=...`` projects every matrix (GaLore cannot
    project other shapes) and leaves the rest in a plain group. With param groups, the groups that
    set ``rank`` are projected and the other GaLore options given here fill in their defaults.
    """
    given = {key: options.pop(key) for key in ("rank", *_GALORE_GROUP_DEFAULTS) if key in options}
    defaults = {**_GALORE_GROUP_DEFAULTS, **{k: v for k, v in given.items() if k != "rank"}}
    if flat:
        if "rank" not in given:
            return groups
        params = groups[0]["params"]
        projected = {**groups[0], "params": [p for p in params if p.ndim == 2], "rank": given["rank"], **defaults}
        rest = {**groups[0], "params": [p for p in params if p.ndim != 2]}
        return [group for group in (projected, rest) if group["params"]]
    if "rank" in given:
        raise ValueError("with param groups, set 'rank' in the groups GaLore should project, not as an option")
    return [{**defaults, **group} if "rank" in group else group for group in groups]


def _iter_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[int, int, Tensor, dict[str, Any]]]:
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            yield group_index, index, param, group


def estimate_state_bytes(
    model: nn.Module | Iterable[Any], optimizer_name: str, **optimizer_kwargs: Any
) -> StateEstimate:
    """The optimizer-state bytes ``optimizer_name`` will hold for ``model``, without allocating them:
    :func:`coap_torch.estimate_state_bytes` extended to the peers.

    Args:
        model: an :class:`torch.nn.Module` (its parameters, by name), or what an optimizer
            takes as ``params``: tensors, ``(name, tensor)`` pairs (``named_parameters()``), or a
            list of param-group dicts whose ``params`` are either, with per-group options.
            Parameters may be on the ``meta`` device.
        optimizer_name: one of :data:`OPTIMIZER_NAMES`: ``"adamw"`` (torch), ``"adafactor"``
            (transformers), ``"adamw8bit"`` (bitsandbytes), ``"galore_adamw"``,
            ``"galore_adamw8bit"``, ``"galore_adafactor"`` (galore-torch), ``"coap_adamw"``,
            ``"coap_adamw8bit"``, ``"coap_adafactor"``, ``"coap_adafactor8bit"``.
        **optimizer_kwargs: the optimizer's own constructor arguments, validated by its
            constructor. For the GaLore names, also GaLore's group options ``rank``,
            ``update_proj_gap``, ``scale`` and ``proj_type`` (see below).

    GaLore projects a parameter when its group sets ``rank``. Given a module or a flat list,
    ``rank=r`` puts every matrix in one projected group (GaLore's projector fails on other shapes);
    given param groups, set ``rank`` in the groups to project.

    Raises:
        ValueError: unknown ``optimizer_name``, no parameters, or an option the optimizer refuses.
        TypeError: an argument the optimizer does not take.
        ImportError: the peer optimizer's package is not installed.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
        >>> int(estimate_state_bytes(model, "adamw"))  # two fp32 moments per value
        67149824
        >>> estimate_state_bytes(model, "coap_adamw", rank_ratio_matrix=4).per_parameter["0.weight"]
        9437184
    """
    if optimizer_name in OUR_OPTIMIZER_NAMES:
        return estimate_our_state_bytes(model, optimizer_name, **optimizer_kwargs)
    if optimizer_name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    build, plan = _REGISTRY[optimizer_name]
    groups, names, given_groups = named_param_groups(model)
    options = dict(optimizer_kwargs)
    if optimizer_name.startswith("galore_"):
        groups = _galore_groups(groups, options, flat=not given_groups)
    try:
        optimizer = build(groups, **options)
    except TypeError as error:
        raise TypeError(f"{optimizer_name}: {error}") from None
    per_parameter: dict[str, int] = {}
    by_key: dict[str, int] = {}
    shared: dict[str, int] = {}
    for group_index, index, param, group in _iter_params(optimizer):
        name = names[id(param)]
        buffers = plan(optimizer, param, group, _Site(group_index, index, name)) if param.requires_grad else []
        per_parameter[name] = sum(b.nbytes for b in buffers if b.shared is None)
        for b in buffers:
            if b.shared is not None:
                if b.shared in shared:
                    continue  # the storage is already counted (under its first key, as the real count does)
                shared[b.shared] = b.nbytes
            by_key[b.key] = by_key.get(b.key, 0) + b.nbytes
    total = sum(per_parameter.values()) + sum(shared.values())
    return StateEstimate(optimizer_name, total, per_parameter, by_key, sum(shared.values()))
