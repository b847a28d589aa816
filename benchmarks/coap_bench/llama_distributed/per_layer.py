"""What updating each parameter during backward saves: peak allocated tensor bytes of a few training steps
with and without per-layer updates (:func:`measure_per_layer_saving`)."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch

from coap_torch.optim import enable_per_layer_updates
from coap_torch.utils.allocations import PeakAllocations

from ..llama import LLAMA_PRESETS, LlamaConfig, build_llama_run, causal_lm_loss, load_llama_data, token_batches
from ..llama_model import build_llama
from ..optimizers import OPTIMIZERS

__all__ = ["PER_LAYER_STEPS", "measure_per_layer_saving"]

#: Steps of :func:`measure_per_layer_saving` after its warm-up step.
PER_LAYER_STEPS = 2


def _train_measured(
    name: str, config: LlamaConfig, data: Any, per_layer: bool, steps: int, batch_size: int
) -> tuple[int, list[float]]:
    device = torch.device(config.device)
    model, optimizer = build_llama_run(name, config.lr_for(name), config, data.vocab_size, device)
    batches = token_batches(config, data.train, device, batch_size)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, batches.next())
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step()]  # the optimizer state exists before the measured steps in both modes
    updates = enable_per_layer_updates(optimizer) if per_layer else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        losses += [step() for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with PeakAllocations() as allocations:
            losses += [step() for _ in range(steps)]
        peak = allocations.peak_bytes
    if updates is not None:
        updates.remove()
    return peak, losses


def measure_per_layer_saving(
    config: LlamaConfig,
    names: tuple[str, ...] | None = None,
    *,
    steps: int = PER_LAYER_STEPS,
    batch_sizes: tuple[int, ...] | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Peak allocated tensor bytes of ``steps`` training steps without and with per-layer updates.

    For each COAP optimizer of ``names`` (default: those of ``config.optimizers``) and each batch
    size (default: the run's and a single sequence), trains the model of ``config`` from its
    initial weights on its first batches twice, in this process: a warm-up step (so the optimizer
    state exists in both modes), then ``steps`` measured steps. Per-layer updates save the
    gradients, so the saving shows where gradients rather than activations set the peak: at small
    batches, or with large matrices.
    The peak is the most tensor memory the measured steps held on top of the model and the state:
    :class:`~coap_torch.utils.allocations.PeakAllocations` on the CPU,
    ``torch.cuda.max_memory_allocated`` minus what was allocated before on a GPU. Both modes see
    the same batches, so their loss curves agree (``max_loss_difference``).
    """
    config = config.resolved()
    if data is None:
        data = load_llama_data(config)
    names = tuple(n for n in (names or config.optimizers) if OPTIMIZERS[n].family == "coap")
    batch_sizes = tuple(dict.fromkeys(batch_sizes or (config.batch_size, 1)))
    model = build_llama(LLAMA_PRESETS[config.preset], data.vocab_size, seed=config.seed, device="meta")
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rows = []
    for name, batch_size in itertools.product(names, batch_sizes):
        with warnings.catch_warnings():
            # A single sequence's first gradient has a low numerical rank; the optimizer says so,
            # but this measures memory, not the subspace.
            warnings.filterwarnings("ignore", message=".*numerical rank", category=RuntimeWarning)
            regular, regular_losses = _train_measured(name, config, data, False, steps, batch_size)
            per_layer, per_layer_losses = _train_measured(name, config, data, True, steps, batch_size)
        rows.append(
            {
                "name": name,
                "batch_size": batch_size,
                "regular_peak_bytes": regular,
                "per_layer_peak_bytes": per_layer,
                "saving_bytes": regular - per_layer,
                "gradient_bytes": gradient_bytes,
                "regular_losses": regular_losses,
                "per_layer_losses": per_layer_losses,
                "max_loss_difference": max(abs(a - b) for a, b in zip(regular_losses, per_layer_losses)),
            }
        )
    kind = (
        "torch.cuda.max_memory_allocated"
        if torch.device(config.device).type == "cuda"
        else "peak allocated tensor bytes, PeakAllocations"
    )
    return {"steps": steps, "seq_len": config.seq_len, "kind": kind, "results": rows}
