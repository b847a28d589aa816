"""The digits benchmark: a small CNN on scikit-learn's bundled 8x8 digits, once per optimizer.

The data is real and offline (:func:`sklearn.datasets.load_digits`: 1797 images, 10 classes),
upsampled to 16x16 and split by sample into a stratified training set and a held-out set that
never changes. The model exercises both projection paths of COAP: ``conv2`` (64, 32, 3, 3) is
Tucker-2 projected, ``fc1`` (192, 1024) and ``fc2`` (10, 192) are projected matrices; biases and
the small first kernel stay dense. The hidden width is 192, not 256, so that ``fc1``'s rank (96 at
the default rank ratio 2) stays below the batch size: at rank 128 a first gradient of 128
samples is often rank-deficient, which leaves part of the first subspace to the seeded sketch.

Every optimizer gets the same initial weights and the same batches: both come from
:class:`torch.Generator` objects seeded from ``seed`` at the start of each run, never from the
global RNG.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coap_torch.utils import optimizer_state_nbytes, state_nbytes_by_kind

from ._deps import require
from ._quiet import import_notes
from .optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, LowRankSettings, build_optimizer
from .probes import Eq2Probe
from .timing import timed_step

__all__ = ["DigitsCNN", "DigitsConfig", "DigitsData", "build_model", "load_data", "run_digits", "train_one"]

#: Side of the (upsampled) images fed to the model.
IMAGE_SIZE = 16
#: Share of the samples held out (stratified by class).
HELDOUT_FRACTION = 0.2
#: Seed of the held-out split: fixed, so every ``--seed`` is scored on the same images.
SPLIT_SEED = 0
#: Width of the hidden linear layer.
HIDDEN = 192
#: Offset between the seed of the initial weights and the seed of the batch order.
_BATCH_STREAM = 2**32


@dataclass
class DigitsConfig:
    """Options of one ``coap-bench digits`` run (the command-line flags, same names)."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    rank_ratio: float = 2.0
    update_interval: int = 32
    reproject_factor: int = 5
    correlation_normalize: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class DigitsData:
    """The training and held-out tensors, already on the run's device."""

    train_x: Tensor
    train_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor


class DigitsCNN(nn.Module):
    """conv(1->32) -> pool -> conv(32->64) -> pool -> linear(1024->192) -> linear(192->10), ReLU between."""

    def __init__(self, image_size: int = IMAGE_SIZE, num_classes: int = 10, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def build_model(seed: int, device: torch.device | str = "cpu") -> DigitsCNN:
    """A :class:`DigitsCNN` with PyTorch's default initialisation drawn from a generator seeded with ``seed``."""
    with torch.device("meta"):  # no global-RNG draws: the weights are filled below
        model = DigitsCNN()
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.bias.uniform_(-bound, bound, generator=generator)
    return model.to(device)


def load_data(device: torch.device | str = "cpu") -> DigitsData:
    """Load, upsample, split (stratified, fixed seed) and standardise the digits."""
    datasets = require("sklearn.datasets", package="scikit-learn")
    model_selection = require("sklearn.model_selection", package="scikit-learn")
    np = require("numpy")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, heldout_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    train_idx, heldout_idx = torch.as_tensor(train_idx), torch.as_tensor(heldout_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DigitsData(
        train_x=images[train_idx].to(device),
        train_y=labels[train_idx].to(device),
        heldout_x=images[heldout_idx].to(device),
        heldout_y=labels[heldout_idx].to(device),
    )


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches: a fresh permutation each epoch, the last partial batch dropped."""
    per_epoch = n // batch_size
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            order = torch.randperm(n, generator=generator)
        yield order[k * batch_size : (k + 1) * batch_size]


def _projection_kinds(optimizer: torch.optim.Optimizer, names: dict[Tensor, str]) -> dict[str, str]:
    kinds = {}
    for param, name in names.items():
        state = optimizer.state.get(param, {})
        kinds[name] = "tucker" if "proj_out" in state else "matrix" if "proj" in state else "dense"
    return kinds


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        total += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum().item())
    model.train(was_training)
    return total / len(y), correct / len(y)


def train_one(name: str, config: DigitsConfig, data: DigitsData) -> dict[str, Any]:
    """Train a fresh model with optimizer ``name`` and return its measurements."""
    tqdm = require("tqdm").tqdm
    device = torch.device(config.device)
    model = build_model(config.seed, device)
    names = {param: pname for pname, param in model.named_parameters()}
    settings = LowRankSettings(
        rank_ratio=config.rank_ratio,
        update_interval=config.update_interval,
        reproject_factor=config.reproject_factor,
        correlation_normalize=config.correlation_normalize,
        seed=config.seed,
    )
    optimizer = build_optimizer(name, list(model.parameters()), [], config.lr, settings)
    probe = Eq2Probe(optimizer, names)
    generator = torch.Generator().manual_seed(config.seed + _BATCH_STREAM)

    losses: list[float] = []
    iteration_s: list[float] = []
    step_s: list[float] = []
    started = time.perf_counter()
    model.train()
    batches = _batches(len(data.train_y), config.batch_size, config.steps, generator)
    with tqdm(total=config.steps, desc=name, file=sys.stderr, disable=not config.progress, unit="step") as bar:
        for step, idx in enumerate(batches, start=1):
            idx = idx.to(device)
            x, y = data.train_x[idx], data.train_y[idx]
            probe.before_step()
            loss, iteration, step_time = timed_step(lambda x=x, y=y: F.cross_entropy(model(x), y), optimizer, device)
            probe.after_step(step)
            iteration_s.append(iteration)
            step_s.append(step_time)
            losses.append(loss.item())
            bar.update(1)
            if step % 10 == 0 or step == config.steps:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    wall = time.perf_counter() - started

    final_loss, final_accuracy = evaluate(model, data.train_x, data.train_y)
    heldout_loss, heldout_accuracy = evaluate(model, data.heldout_x, data.heldout_y)
    nonfinite = next((i for i, value in enumerate(losses, start=1) if not math.isfinite(value)), None)
    return {
        "name": name,
        "lr": config.lr,
        "state_bytes": optimizer_state_nbytes(optimizer),
        "state_bytes_by_kind": state_nbytes_by_kind(optimizer),
        "iteration_ms": statistics.median(iteration_s) * 1e3,
        "step_ms": statistics.median(step_s) * 1e3,
        "final_loss": final_loss,
        "final_accuracy": final_accuracy,
        "last_batch_loss": losses[-1],
        "first_nonfinite_step": nonfinite,
        "heldout_loss": heldout_loss,
        "heldout_accuracy": heldout_accuracy,
        "p_step_rel_change": probe.median(),
        "p_step_rel_changes": probe.changes,
        "projections": _projection_kinds(optimizer, names),
        "wall_seconds": wall,
        "loss_curve": losses,
    }


def run_digits(config: DigitsConfig) -> dict[str, Any]:
    """Run every optimizer of ``config`` and return ``{"config": ..., "results": [...], "import_notes": [...]}``
    (``import_notes``: what packages printed while imported, as notes for the table).

    ``state_ratio_to_adamw`` divides each optimizer's state by AdamW's: the measured one when
    ``adamw`` is in the run, else its closed form (two float32 moments per parameter).
    """
    unknown = [name for name in config.optimizers if name not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer {', '.join(map(repr, unknown))}; known: {', '.join(OPTIMIZERS)}")
    data = load_data(config.device)
    if config.batch_size > len(data.train_y):
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train_y)} training samples")
    results = [train_one(name, config, data) for name in config.optimizers]

    reference_model = build_model(config.seed)
    n_params = sum(p.numel() for p in reference_model.parameters())
    by_name = {r["name"]: r for r in results}
    reference = by_name["adamw"]["state_bytes"] if "adamw" in by_name else 2 * 4 * n_params
    for result in results:
        result["state_ratio_to_adamw"] = result["state_bytes"] / reference

    settings = dataclasses.asdict(config)
    settings["optimizers"] = list(config.optimizers)
    settings.update(
        dataset="sklearn.datasets.load_digits",
        train_samples=len(data.train_y),
        heldout_samples=len(data.heldout_y),
        heldout_fraction=HELDOUT_FRACTION,
        split_seed=SPLIT_SEED,
        image_size=IMAGE_SIZE,
        model=repr(reference_model),
        parameters=n_params,
        adamw_state_bytes_reference=reference,
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    return {"config": settings, "results": results, "import_notes": import_notes()}
