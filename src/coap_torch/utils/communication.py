"""What an optimizer's subspace refreshes send under FSDP2, from shapes alone, next to what FSDP2 sends.

Under FSDP2 a COAP optimizer keeps ``P`` on the unsharded side of every row-sharded matrix, so a
steady step sends nothing; a refresh all-reduces a few small sums per projected matrix
(:func:`~coap_torch.optim._sharded.low_cost_svd_payload_bytes`,
:func:`~coap_torch.optim._sharded.correlation_step_payload_bytes`, the same formulas the tests
check against the bytes :class:`~coap_torch.optim._sharded.CommunicationLog` counts). FSDP2
itself all-gathers every parameter in the forward pass, again in the backward pass (the default
``reshard_after_forward=True``), and reduce-scatters every gradient: three full-model payloads
per step.

The figures are payload bytes per rank, counted as :class:`CommunicationLog` counts them (the
size of the tensors handed to the collective, whatever the world size); a ring moves about
``2 (W - 1) / W`` times that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim._layout import layout_of
from ..optim._options import COAP_DEFAULTS
from ..optim._sharded import correlation_step_payload_bytes, low_cost_svd_payload_bytes
from .estimate import named_param_groups

__all__ = ["CommunicationEstimate", "estimate_fsdp2_communication"]


@dataclass(frozen=True)
class CommunicationEstimate:
    """Bytes per rank that COAP-AdamW's refreshes and FSDP2 itself send, for one model.

    Attributes:
        projected: number of row-sharded projected matrices (each refresh touches all of them).
        svd_step_bytes: payload of a step with an (occasional low-cost) SVD refresh, the first
            step included.
        correlation_step_bytes: payload of a step with an Eq. 2 update.
        cycle_steps: ``update_interval * reproject_factor``: one SVD, ``reproject_factor - 1``
            Eq. 2 steps and no traffic on the other steps.
        optimizer_bytes_per_step: the refreshes' payload amortised over a cycle.
        fsdp2_bytes_per_step: FSDP2's own payload per step (two all-gathers of the parameters,
            one reduce-scatter of the gradients) at ``param_bytes`` per value.
        ratio: ``optimizer_bytes_per_step / fsdp2_bytes_per_step``.
    """

    projected: int
    svd_step_bytes: int
    correlation_step_bytes: int
    cycle_steps: int
    optimizer_bytes_per_step: float
    fsdp2_bytes_per_step: int
    ratio: float

    def bytes_over(self, steps: int, update_interval: int, reproject_factor: int) -> int:
        """Payload of the first ``steps`` steps: the first step's SVD, then each refresh."""
        refreshes = range(update_interval, steps + 1, update_interval)
        svds = 1 + sum(1 for step in refreshes if step > 1 and step % (update_interval * reproject_factor) == 0)
        eq2 = sum(1 for step in refreshes if step > 1) - (svds - 1)
        return svds * self.svd_step_bytes + eq2 * self.correlation_step_bytes


def estimate_fsdp2_communication(
    model: nn.Module | Iterable[Any],
    *,
    update_interval: int = COAP_DEFAULTS["update_interval"],
    reproject_factor: int = COAP_DEFAULTS["reproject_factor"],
    param_bytes: int | None = None,
    state_dtype: torch.dtype = torch.float32,
    **group_options: Any,
) -> CommunicationEstimate:
    """COAP-AdamW's refresh traffic under FSDP2 (dim-0 sharding) for ``model``, amortised, against FSDP2's own.

    Args:
        model: a module or parameters / param groups, as for
            :func:`~coap_torch.utils.estimate_state_bytes`; ``meta`` parameters cost nothing.
        update_interval, reproject_factor: ``T_u`` and lambda.
        param_bytes: bytes per value that FSDP2 gathers and reduces (2 for bf16 mixed precision);
            default: each parameter's own element size.
        state_dtype: the dtype of ``P`` and of the gradient sums (float32 for float32, bf16 and
            fp16 parameters).
        **group_options: the routing options of the optimizer (``rank``, ``rank_ratio_matrix``,
            ``coap``, ``min_conv_numel``), applied to every group that does not set its own.

    Only matrices are counted: kernels and stacks of matrices cannot be projected on a row
    shard (the optimizer refuses them). CoapAdamW8bit sends the same; the Adafactor optimizers
    add a few sums per matrix at every step (their column accumulator is a sum over all rows).

    Example:
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])
        >>> estimate = estimate_fsdp2_communication(model, rank=512, update_interval=40, reproject_factor=5)
        >>> estimate.projected, f"{estimate.ratio:.2%}"
        (4, '0.31%')
    """
    groups, _, _ = named_param_groups(model)
    element_size = torch.empty((), dtype=state_dtype).element_size()
    svd = correlation = projected = fsdp2 = 0
    for group in groups:
        options = {**COAP_DEFAULTS, **group_options, **{k: v for k, v in group.items() if k != "params"}}
        options["projection_side"] = "input"  # where FSDP2 puts P
        for param in group["params"]:
            fsdp2 += 3 * param.numel() * (param_bytes or param.element_size())
            layout = layout_of(param, options)
            if layout.kind != "matrix" or param.dim() != 2:
                continue
            n, rank = param.shape[1], layout.ranks[0]
            projected += 1
            svd += low_cost_svd_payload_bytes(n, rank, element_size)
            correlation += correlation_step_payload_bytes(n, rank, element_size)
    cycle = update_interval * reproject_factor
    amortised = (svd + (reproject_factor - 1) * correlation) / cycle
    return CommunicationEstimate(
        projected=projected,
        svd_step_bytes=svd,
        correlation_step_bytes=correlation,
        cycle_steps=cycle,
        optimizer_bytes_per_step=amortised,
        fsdp2_bytes_per_step=fsdp2,
        ratio=amortised / fsdp2 if fsdp2 else float("nan"),
    )
