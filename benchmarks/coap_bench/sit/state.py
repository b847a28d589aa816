"""The optimizer state a SiT preset will hold, planned from shapes on the ``meta`` device (no training).

``coap-bench sit --preset xl-2`` on a CPU prints this table: every optimizer with the param groups and
options its run would get (:func:`~coap_bench.optimizers.build_optimizer`'s: COAP's group options, GaLore's
``rank`` groups, Adafactor's ``beta1``), counted by :func:`coap_bench.state_layouts.estimate_state_bytes`
(:func:`coap_torch.estimate_state_bytes` for ours), which agrees to the byte with the state of a trained
optimizer (a test checks it on the micro preset).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._quiet import gather_import_notes
from ..environment import versions
from ..optimizers import ADAFACTOR_OPTIONS, OPTIMIZERS, LowRankSettings, low_rank_groups
from ..runner import compare_to_baseline, failed_result
from ..state_layouts import estimate_state_bytes
from .model import build_sit, count_parameters
from .presets import SIT_PRESETS, SitConfig

__all__ = ["planned_state_bytes", "run_sit_memory", "same_layout_as_memory_job"]


def planned_state_bytes(model: torch.nn.Module, name: str, settings: LowRankSettings, lr: float) -> int:
    """The state bytes optimizer ``name`` will hold for ``model``'s trainable parameters under ``settings``."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adafactor = ADAFACTOR_OPTIONS if "adafactor" in name else {}
    family = OPTIMIZERS[name].family
    if family == "coap":
        groups = [{"params": params, **settings.coap_options()}]
        options = {"weight_decay": settings.weight_decay, **settings.state_options(), **adafactor}
        return int(estimate_state_bytes(groups, name, lr=lr, **options))
    if family == "galore":
        tensors = [p for _, p in params]
        groups = low_rank_groups(tensors, [], settings, update_proj_gap=settings.proj_gap, proj_type="std")
        return int(estimate_state_bytes(groups, name, lr=lr, weight_decay=settings.weight_decay, **adafactor))
    return int(estimate_state_bytes(params, name, lr=lr, weight_decay=settings.weight_decay, **adafactor))


def same_layout_as_memory_job() -> bool:
    """Whether the ``xl-2`` SiT has the parameter names and shapes ``coap-bench memory`` counts for SiT-XL/2."""
    from ..memory import SiT as MemoryJobSiT

    with torch.device("meta"):
        reference = MemoryJobSiT()
    ours = build_sit("xl-2", device="meta")
    shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    return shapes == {name: tuple(p.shape) for name, p in reference.named_parameters()}


def run_sit_memory(config: SitConfig) -> dict[str, Any]:
    """The planned state of every optimizer of ``config`` for its preset's SiT, as a run's result (rows with
    ``state_bytes`` and the ratios to AdamW; an optimizer without an estimate or package is a failed row)."""
    config = config.resolved()
    preset = SIT_PRESETS[config.preset]
    model = build_sit(preset, device="meta")
    results = []
    for name in config.optimizers:
        settings = config.settings(name)
        lr = config.lr_for(name)
        spec = OPTIMIZERS[name]
        try:
            spec.import_modules()
            state = planned_state_bytes(model, name, settings, lr)
        except (ImportError, ValueError) as error:
            results.append(failed_result(name, lr, f"{type(error).__name__}: {error}"))
            continue
        results.append(
            {
                "name": name,
                "optimizer": spec.description,
                "family": spec.family,
                "lr": lr,
                "failed": False,
                "planned": True,
                "state_bytes": state,
                "low_rank": dataclasses.asdict(settings) if spec.family != "dense" else None,
            }
        )
    compare_to_baseline(results)
    settings = dataclasses.asdict(config)
    settings.update(
        optimizers=list(config.optimizers),
        model=preset.model_config(),
        parameters=count_parameters(preset),
        memory_only=True,
        memory_job_layout=same_layout_as_memory_job() if config.preset == "xl-2" else None,
    )
    return {
        "config": settings,
        "versions": versions(),
        "argv": list(config.argv),
        "results": results,
        "import_notes": gather_import_notes(results),
    }
