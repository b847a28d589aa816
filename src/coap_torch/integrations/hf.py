"""Hugging Face ``Trainer`` / Accelerate: choose what is projected the way GaLore users already do.

``coap_optimizer_cls_and_kwargs`` gives ``Trainer(optimizer_cls_and_kwargs=...)`` an optimizer
factory: Trainer calls it with the model it trains, and it splits the parameters by module name
with the semantics of ``TrainingArguments.optim_target_modules`` (a list of names or
substrings, a regex, or ``"all-linear"``), plus convolutions. Matched ``nn.Linear`` / ``nn.Conv*``
weights are projected; every other parameter is trained exactly like ``torch.optim.AdamW``
(``coap=False``). Weight decay follows Trainer's rule: none for biases and norms.

Passing a ready optimizer works too, as for any torch optimizer::

    Trainer(model, args, optimizers=(CoapAdamW(model.parameters(), lr=1e-3), None))

Trainer's checkpoints load the optimizer state with ``torch.load(..., weights_only=True)``, which
COAP state (plain tensors and numbers) supports, so ``resume_from_checkpoint`` works.

Example (no Trainer needed to try the factory):

    >>> import torch
    >>> from coap_torch import CoapAdamW
    >>> from coap_torch.integrations.hf import coap_optimizer_cls_and_kwargs
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    >>> factory, kwargs = coap_optimizer_cls_and_kwargs(r"0", CoapAdamW, lr=1e-3, rank=16)
    >>> opt = factory()(model, **kwargs)        # what Trainer does with a factory
    >>> [(len(g["params"]), g["coap"], g["weight_decay"]) for g in opt.param_groups]
    [(1, True, 0.01), (1, False, 0.01), (4, False, 0.0)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..optim import CoapAdamW, LowRankOptimizer

__all__ = ["CoapOptimizerFactory", "coap_optimizer_cls_and_kwargs", "coap_param_groups", "target_parameter_names"]

#: Trainer's rule for parameters without weight decay (``Trainer.get_decay_parameter_names``).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")

_PROJECTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(targets: str | Sequence[str], name: str) -> bool:
    """``transformers.trainer_utils.check_target_module_exists``: a full-match regex for a
    string, for a list an exact name, a substring or a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)


def _all_linear(targets: str | Sequence[str]) -> bool:
    items = [targets] if isinstance(targets, str) else list(targets)
    return any(item.replace("_", "-") == "all-linear" for item in items)


def target_parameter_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the weights to project: matched ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules.

    ``target_modules`` has the meaning of ``TrainingArguments.optim_target_modules``; the string
    ``"all-linear"`` (alone or in a list) selects every ``nn.Linear``. Raises ``ValueError`` when
    nothing matches, naming the patterns.
    """
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(
            f"target_modules must be a list of strings, a regex string or 'all-linear', got {target_modules!r}"
        )
    all_linear = _all_linear(target_modules)
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, _PROJECTABLE) or getattr(module, "weight", None) is None:
            continue
        if (all_linear and isinstance(module, nn.Linear)) or _matches(target_modules, module_name):
            names.append(f"{module_name}.weight" if module_name else "weight")
    if not names:
        raise ValueError(f"no nn.Linear or nn.Conv module of the model matches target_modules={target_modules!r}")
    return names


def _no_decay(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or any(re.search(p, full) for p in NO_DECAY_PATTERNS):
                names.add(full)
    return names


def coap_param_groups(
    model: nn.Module, target_modules: str | Sequence[str], weight_decay: float
) -> list[dict[str, Any]]:
    """Param groups: projected targets, then dense parameters with and without weight decay.

    Empty groups are left out; parameters that do not require gradients are skipped.
    """
    targets = set(target_parameter_names(model, target_modules))
    no_decay = _no_decay(model)
    projected, dense, dense_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in targets:
            projected.append(param)
        elif name in no_decay:
            dense_no_decay.append(param)
        else:
            dense.append(param)
    groups = [
        {"params": projected, "coap": True, "weight_decay": weight_decay},
        {"params": dense, "coap": False, "weight_decay": weight_decay},
        {"params": dense_no_decay, "coap": False, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


class CoapOptimizerFactory:
    """What ``Trainer`` calls with the model it trains (``optimizer_cls()(model, **kwargs)``)."""

    def __call__(
        self,
        model: nn.Module,
        *,
        optimizer_cls: type[LowRankOptimizer],
        target_modules: str | Sequence[str],
        **optimizer_kwargs: Any,
    ) -> LowRankOptimizer:
        weight_decay = optimizer_kwargs.pop("weight_decay", _default_weight_decay(optimizer_cls))
        groups = coap_param_groups(model, target_modules, weight_decay)
        return optimizer_cls(groups, weight_decay=weight_decay, **optimizer_kwargs)


def _default_weight_decay(optimizer_cls: type[LowRankOptimizer]) -> float:
    import inspect

    return inspect.signature(optimizer_cls.__init__).parameters["weight_decay"].default


def coap_optimizer_cls_and_kwargs(
    target_modules: str | Sequence[str] = "all-linear",
    optimizer_cls: type[LowRankOptimizer] = CoapAdamW,
    **optimizer_kwargs: Any,
) -> tuple[type[CoapOptimizerFactory], dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` argument of ``transformers.Trainer`` for a COAP optimizer.

    Args:
        target_modules: which modules are projected, as ``TrainingArguments.optim_target_modules``
            (names or substrings, a regex, ``"all-linear"``); ``nn.Conv1d/2d/3d`` count too.
        optimizer_cls: :class:`~coap_torch.CoapAdamW` (default) or another COAP optimizer.
        optimizer_kwargs: its arguments. ``lr`` and ``weight_decay`` must be given here: Trainer
            passes none of ``TrainingArguments`` to an optimizer factory (its scheduler then
            scales the ``lr`` given here).

    Example::

        trainer = Trainer(model, args, train_dataset=data, optimizer_cls_and_kwargs=coap_optimizer_cls_and_kwargs(
            ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"], CoapAdamW, lr=1e-3, rank_ratio_matrix=4))
    """
    if isinstance(optimizer_cls, type) and not issubclass(optimizer_cls, LowRankOptimizer):
        raise TypeError(f"optimizer_cls must be a COAP optimizer class, got {optimizer_cls!r}")
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(
            f"target_modules must be a list of strings, a regex string or 'all-linear', got {target_modules!r}"
        )
    kwargs = {"optimizer_cls": optimizer_cls, "target_modules": target_modules, **optimizer_kwargs}
    return CoapOptimizerFactory, kwargs
