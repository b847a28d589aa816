"""Gradient scale: does each optimizer train the same on a sum-reduced loss as on a mean-reduced one?

AdamW is invariant to the scale of the gradient (up to ``eps``), so a user who writes
``reduction="sum"`` gets the same run as with ``"mean"``. The COAP objective (Eq. 2) scales like
``|G|^2``, so the printed Eq. 2 step is not: ``coap-bench loss-scale`` trains one small regression net (two
convolutions, one of them Tucker-2, and two linear layers, on a teacher net's outputs) with both
reductions, for torch AdamW and the four COAP optimizers, at the default ``correlation_max_norm``
(the gradient of Eq. 2 clipped to norm 1, re-orthonormalized where it moved ``P``) and, with
``--faithful``, also without the clip (the printed step). For each run it prints:

* the held-out loss, and its ratio sum-run / mean-run (1.0 for a scale-invariant optimizer);
* the largest change of one weight in one step;
* the largest ``|P^T P - I|`` entry seen after any step (how far ``P`` drifted from orthonormal);
* the gradient RMS of the first step, and whether the run diverged (non-finite or exploding loss).

Figures go to ``results/bench_loss_scale.json`` (``--json PATH``)::

    coap-bench loss-scale --quick          # a smoke test, seconds
    coap-bench loss-scale --faithful       # the default run, plus the unclipped step
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

from .environment import load_average, load_averages_line, platform_summary
from .report import print_table, write_json

__all__ = ["OPTIMIZERS", "run_loss_scale", "train"]

#: The optimizers, built at lr 1e-2 (Adafactor's first moment on, as the paper uses it). Small
#: T_u and lambda so that a short run crosses many Eq. 2 steps and a few SVDs.
COAP = {"rank_ratio_matrix": 2, "rank_ratio_cnn": 2, "update_interval": 4, "reproject_factor": 5}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, **_: torch.optim.AdamW(params, lr=1e-2),
    "coap_adamw": lambda params, **kw: CoapAdamW(params, lr=1e-2, **COAP, **kw),
    "coap_adamw8bit": lambda params, **kw: CoapAdamW8bit(params, lr=1e-2, min_8bit_size=256, **COAP, **kw),
    "coap_adafactor": lambda params, **kw: CoapAdafactor(params, lr=1e-2, beta1=0.9, **COAP, **kw),
    "coap_adafactor8bit": lambda params, **kw: CoapAdafactor8bit(
        params, lr=1e-2, beta1=0.9, min_8bit_size=256, **COAP, **kw
    ),
}
DIVERGED = 1e6  # a held-out loss this many times the mean run's counts as diverged


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 32, 3), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(),  # 9216 entries: Tucker-2
        torch.nn.Flatten(), torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8),
    )  # fmt: skip


def make_data(batch: int, target_scale: float) -> dict[str, torch.Tensor]:
    """Inputs and the outputs of a fixed teacher net (times ``target_scale``), train and held-out."""
    generator = torch.Generator().manual_seed(0)
    teacher = make_net(1)
    data = {}
    with torch.no_grad():
        for split in ("train", "heldout"):
            x = torch.randn(batch, 4, 8, 8, generator=generator)
            data[split + "_x"], data[split + "_y"] = x, target_scale * teacher(x)
    return data


def projection_defect(optimizer: torch.optim.Optimizer) -> float:
    """The largest entry of ``|P^T P - I|`` over every projection the optimizer holds."""
    worst = 0.0
    for state in optimizer.state.values():
        for key in ("proj", "proj_out", "proj_in"):
            if key in state:
                P = state[key]
                eye = torch.eye(P.shape[-1], dtype=P.dtype)
                worst = max(worst, (P.mT @ P - eye).abs().max().item())
    return worst


def train(name: str, reduction: str, data: dict[str, torch.Tensor], steps: int, **options: Any) -> dict[str, Any]:
    model = make_net(0)
    optimizer = OPTIMIZERS[name](model.parameters(), **options)
    largest_jump = largest_defect = 0.0
    grad_rms = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverging faithful run warns at its refreshes
        for step in range(steps):
            loss = torch.nn.functional.mse_loss(model(data["train_x"]), data["train_y"], reduction=reduction)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                grad_rms = grads.square().mean().sqrt().item()
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            largest_jump = max(
                largest_jump, max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
            )
            largest_defect = max(largest_defect, projection_defect(optimizer))
    with torch.no_grad():
        heldout = torch.nn.functional.mse_loss(model(data["heldout_x"]), data["heldout_y"]).item()
    return {
        "heldout_loss": heldout,
        "largest_weight_change": largest_jump,
        "largest_defect": largest_defect,
        "first_grad_rms": grad_rms,
    }


def run_loss_scale(args: argparse.Namespace) -> int:
    """Train every optimizer of ``args.optimizers`` with both reductions; print the table, write the JSON."""
    if args.quick:
        args.steps = 20
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown --optimizers {unknown}; choose from {sorted(OPTIMIZERS)}")
    start, load_before = time.perf_counter(), load_average()
    data = make_data(args.batch, args.target_scale)
    variants = [("default", {})]
    if args.faithful:
        variants.append(("faithful", {"correlation_max_norm": None}))
    rows, results = [], []
    for name in names:
        for variant, options in variants if name != "adamw" else variants[:1]:
            mean = train(name, "mean", data, args.steps, **options)
            total = train(name, "sum", data, args.steps, **options)
            ratio = total["heldout_loss"] / mean["heldout_loss"]
            diverged = not math.isfinite(ratio) or ratio > DIVERGED
            results.append(
                {
                    "optimizer": name,
                    "variant": variant,
                    "mean": mean,
                    "sum": total,
                    "heldout_ratio_sum_to_mean": ratio,
                    "diverged": diverged,
                }
            )
            rows.append(
                [
                    name,
                    variant,
                    f"{mean['heldout_loss']:.4g}",
                    f"{total['heldout_loss']:.4g}",
                    "diverged" if diverged else f"{ratio:.3f}",
                    f"{total['largest_weight_change']:.3g}",
                    f"{max(mean['largest_defect'], total['largest_defect']):.1e}",
                    f"{total['first_grad_rms']:.3g}",
                ]
            )
    print_table(
        f"Held-out loss, mean- vs sum-reduced training ({args.steps} steps, batch {args.batch}, "
        f"target scale {args.target_scale:g})",
        [
            "optimizer",
            "Eq. 2 step",
            "mean run",
            "sum run",
            "sum / mean",
            "max dW (sum)",
            "max |P^T P - I|",
            "grad RMS (sum)",
        ],
        rows,
        left=2,
    )
    print(load_averages_line(load_before, load_average()))
    meta = {
        **platform_summary(),
        "steps": args.steps,
        "batch": args.batch,
        "target_scale": args.target_scale,
        "coap": COAP,
    }
    elapsed = time.perf_counter() - start
    write_json({"meta": meta, "results": results}, args.json)
    print(f"wrote {args.json} ({elapsed:.1f} s)")
    return 0
