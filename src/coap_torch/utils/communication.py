"""What an optimizer sends under FSDP2, from shapes alone, next to what FSDP2 sends.

Under FSDP2 (dim-0 sharding) a COAP optimizer's traffic depends on where dim 0 falls in each
parameter's layout (see :mod:`coap_torch.optim._sharding`):

* ``P`` on the unsharded side of a matrix (``"rows"``): a steady step sends nothing; a refresh
  all-reduces a few small sums (:func:`~coap_torch.optim._sharded.low_cost_svd_payload_bytes`,
  :func:`~coap_torch.optim._sharded.correlation_step_payload_bytes`);
* 3-D stacks of matrices (MoE experts) and dense kernels (``"batch"``): every rank owns whole
  matrices; a refresh sends one flag (4 bytes) per stack; a kernel projected on its input mode
  only (``conv_projection="input"``) sends that flag and the sums of a row-split refresh;
* ``P`` on the sharded side (``"replicated"``: the output side of a matrix, ``P_O`` of a Tucker-2
  kernel): every step all-reduces the projected gradient (one moment's size), and a refresh
  first moves the factor's gradient matrix from column to row shards by one all-to-all (this
  rank's share of it: :func:`~coap_torch.optim._sharded.columns_to_rows`).

The Adafactor optimizers add, at every step, the sums of their factored statistics (a column
sum of ``r`` or ``n`` numbers and the row mean of each row-sharded matrix, the update's and the
weight's sums of squares; a stack or kernel sends the two scalars, a replicated one the weight's).

FSDP2 itself all-gathers every parameter in the forward pass, again in the backward pass (the
default ``reshard_after_forward=True``), and reduce-scatters every gradient: three full-model
payloads per step.

The figures are payload bytes per rank, counted as :class:`~coap_torch.optim.CommunicationLog`
counts them (the size of the tensors handed to the collective); a ring all-reduce moves about
``2 (W - 1) / W`` times that. The tests check them against the log, to the byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim._layout import Layout, layout_of
from ..optim._options import COAP_DEFAULTS
from ..optim._sharded import chunk_bounds, correlation_step_payload_bytes, low_cost_svd_payload_bytes
from ..optim._sharding import contracted, split_of
from .estimate import OPTIMIZER_NAMES, named_param_groups

__all__ = ["CommunicationEstimate", "estimate_fsdp2_communication"]


@dataclass(frozen=True)
class CommunicationEstimate:
    """Bytes per rank that a COAP optimizer and FSDP2 itself send, for one model.

    Attributes:
        projected: number of projected parameters (each refresh touches all of them).
        steady_step_bytes: payload of every step: the projected gradients of factors on the
            sharded side, and Adafactor's statistics.
        first_step_bytes: the extra payload of the first step (the initial low-cost SVDs).
        svd_step_bytes: the extra payload of a step with an (occasional low-cost) SVD refresh.
        correlation_step_bytes: the extra payload of a step with an Eq. 2 update.
        cycle_steps: ``update_interval * reproject_factor``: one SVD and ``reproject_factor - 1``
            Eq. 2 steps per cycle.
        optimizer_bytes_per_step: ``steady_step_bytes`` plus the refreshes amortised over a cycle.
        fsdp2_bytes_per_step: FSDP2's own payload per step (two all-gathers of the parameters,
            one reduce-scatter of the gradients) at ``param_bytes`` per value.
        ratio: ``optimizer_bytes_per_step / fsdp2_bytes_per_step``.
    """

    projected: int
    steady_step_bytes: int
    first_step_bytes: int
    svd_step_bytes: int
    correlation_step_bytes: int
    cycle_steps: int
    optimizer_bytes_per_step: float
    fsdp2_bytes_per_step: int
    ratio: float

    def bytes_over(self, steps: int, update_interval: int, reproject_factor: int) -> int:
        """Payload of the first ``steps`` steps: every step's, the first step's SVDs, then each refresh."""
        refreshes = [step for step in range(update_interval, steps + 1, update_interval) if step > 1]
        svds = sum(1 for step in refreshes if step % (update_interval * reproject_factor) == 0)
        eq2 = len(refreshes) - svds
        first = self.first_step_bytes if steps else 0
        return steps * self.steady_step_bytes + first + svds * self.svd_step_bytes + eq2 * self.correlation_step_bytes


def estimate_fsdp2_communication(
    model: nn.Module | Iterable[Any],
    *,
    optimizer: str = "coap_adamw",
    update_interval: int = COAP_DEFAULTS["update_interval"],
    reproject_factor: int = COAP_DEFAULTS["reproject_factor"],
    world_size: int = 8,
    param_bytes: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    **group_options: Any,
) -> CommunicationEstimate:
    """A COAP optimizer's traffic under FSDP2 (dim-0 sharding) for ``model``, amortised, against FSDP2's own.

    Args:
        model: a module or parameters / param groups, as for
            :func:`~coap_torch.utils.estimate_state_bytes`; ``meta`` parameters cost nothing.
        optimizer: one of :data:`~coap_torch.utils.estimate.OPTIMIZER_NAMES` (``"coap_adamw"`` ...;
            an 8-bit optimizer sends what its 32-bit counterpart sends: its sums are float32).
        update_interval, reproject_factor: ``T_u`` and lambda.
        world_size: the number of ranks (the all-to-all of a refresh sends this rank's share,
            counted for rank 0, which holds the largest one).
        param_bytes: bytes per value that FSDP2 gathers and reduces (2 for bf16 mixed precision);
            default: each parameter's own element size.
        compute_dtype: the dtype the optimizer computes and sums in (float32 for float32, bf16
            and fp16 parameters; float64 for float64 ones).
        **group_options: the optimizer's options (``rank``, ``rank_ratio_matrix``, ``coap``,
            ``projection_side``, ``min_conv_numel``; Adafactor's ``beta1`` and
            ``scale_parameter``), applied to every group that does not set its own. The
            optimizer's ``state_dtype`` is accepted and changes nothing: bfloat16 state is widened
            before any sum, so the traffic is the same.

    Example:
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])
        >>> estimate = estimate_fsdp2_communication(model, rank=512, update_interval=40, reproject_factor=5)
        >>> estimate.projected, estimate.steady_step_bytes, f"{estimate.ratio:.2%}"
        (4, 0, '0.31%')
    """
    if optimizer not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    adafactor = optimizer.startswith("coap_adafactor")
    groups, _, _ = named_param_groups(model)
    size = torch.empty((), dtype=compute_dtype).element_size()
    totals = {"steady": 0, "first": 0, "svd": 0, "eq2": 0}
    projected = fsdp2 = 0
    for group in groups:
        options = {**COAP_DEFAULTS, **group_options, **{k: v for k, v in group.items() if k != "params"}}
        for param in group["params"]:
            fsdp2 += 3 * param.numel() * (param_bytes or param.element_size())
            if param.dim() == 0:
                continue
            layout = layout_of(param, options)
            projected += layout.projected
            parts = _parameter_bytes(layout, size, world_size, adafactor, options)
            for key, value in parts.items():
                totals[key] += value
    cycle = update_interval * reproject_factor
    amortised = totals["steady"] + (totals["svd"] + (reproject_factor - 1) * totals["eq2"]) / cycle
    return CommunicationEstimate(
        projected=projected,
        steady_step_bytes=totals["steady"],
        first_step_bytes=totals["first"],
        svd_step_bytes=totals["svd"],
        correlation_step_bytes=totals["eq2"],
        cycle_steps=cycle,
        optimizer_bytes_per_step=amortised,
        fsdp2_bytes_per_step=fsdp2,
        ratio=amortised / fsdp2 if fsdp2 else float("nan"),
    )


def _parameter_bytes(
    layout: Layout, size: int, world_size: int, adafactor: bool, options: dict[str, Any]
) -> dict[str, int]:
    """One parameter's payload: every step's (``steady``), the first step's and each refresh kind's extra."""
    split = split_of(layout)
    steady = first = svd = eq2 = 0
    if adafactor:
        steady += _adafactor_sums(layout, split, options) * size
    if not layout.projected:
        return {"steady": steady, "first": 0, "svd": 0, "eq2": 0}
    moment = math.prod(layout.projected_shape) * size
    if split == "replicated":
        steady += moment  # the projected gradient, summed over the ranks
        if adafactor and options.get("beta1") is None:  # and at refreshes, the Eq. 2 moment
            svd += moment
            eq2 += moment
    if split == "batch":  # a finiteness flag (and at the first step a non-zero one), then nothing
        first, svd, eq2 = first + 8, svd + 4, eq2 + 4  # more for whole matrices on each rank
        if layout.kind != "conv_input":
            return {"steady": steady, "first": first, "svd": svd, "eq2": eq2}
    for (rows, columns, rank), cut in zip(_factor_problems(layout), contracted(layout)):
        # A factor on the sharded side first moves its gradient matrix to row shards: this
        # rank's columns, every row, in one all-to-all.
        share = rows * max(stop - start for start, stop in chunk_bounds(columns, world_size)) * size if cut else 0
        first += share + low_cost_svd_payload_bytes(columns, rank, size)
        svd += share + low_cost_svd_payload_bytes(columns, rank, size)
        eq2 += share + correlation_step_payload_bytes(columns, rank, size)
    return {"steady": steady, "first": first, "svd": svd, "eq2": eq2}


def _factor_problems(layout: Layout) -> list[tuple[int, int, int]]:
    """``(rows, columns, rank)`` of the matrix each factor is refreshed on (columns: the factor's side)."""
    if layout.kind == "tucker":
        out_channels, in_channels, *kernel = layout.shape
        taps = math.prod(kernel)
        return [
            (in_channels * taps, out_channels, layout.ranks[0]),
            (out_channels * taps, in_channels, layout.ranks[1]),
        ]
    if layout.kind == "conv_input":  # the mode-2 fibres as rows
        return [(layout.shape[0] * math.prod(layout.shape[2:]), layout.shape[1], layout.ranks[0])]
    rows, columns = layout.canonical_shape[-2:]
    return [(rows, columns, layout.ranks[0])]


def _adafactor_sums(layout: Layout, split: str, options: dict[str, Any]) -> int:
    """The numbers Adafactor's statistics all-reduce at every step for one parameter."""
    shape = layout.projected_shape if layout.projected else layout.shape
    weight = 1 if options.get("scale_parameter", True) else 0  # the weight's sum of squares
    if split == "replicated":
        return weight
    if split == "batch":
        return weight + 1  # the update's sum of squares
    if len(shape) >= 2:  # the column sums and the row accumulator's sum, then the update's
        return math.prod(shape[:-2]) * (shape[-1] + 1) + weight + 1
    return weight + 1
