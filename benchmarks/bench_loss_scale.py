"""Gradient scale: does each optimizer train the same on a sum-reduced loss as on a mean-reduced one?

AdamW is invariant to the scale of the gradient (up to ``eps``), so a user who writes
``reduction="sum"`` gets the same run as with ``"mean"``. The COAP objective (Eq. 2) scales like
``|G|^2``, so the printed Eq. 2 step is not: this script trains one small regression net (two
convolutions, one of them Tucker-2, and two linear layers, on a teacher net's outputs) with both
reductions, for torch AdamW and the four COAP optimizers, at the default ``correlation_max_norm``
(the gradient of Eq. 2 clipped to norm 1, re-orthonormalized where it moved ``P``) and, with
``--faithful``, also without the clip (the printed step). For each run it prints:

* the held-out loss, and its ratio sum-run / mean-run (1.0 for a scale-invariant optimizer);
* the largest change of one weight in one step;
* the largest ``|P^T P - I|`` entry seen after any step (how far ``P`` drifted from orthonormal);
* the gradient RMS of the first step, and whether the run diverged (non-finite or exploding loss).

Figures go to ``results/bench_loss_scale.json`` (``--json PATH``).

    python benchmarks/bench_loss_scale.py --quick          # a smoke test, seconds
    python benchmarks/bench_loss_scale.py --faithful       # the default run, plus the unclipped step
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

#: The optimizers, built at lr 1e-2 (Adafactor's first moment on, as the paper uses it). Small
#: T_u and lambda so that a short run crosses many Eq. 2 steps and a few SVDs.
COAP = {"rank_ratio_matrix": 2, "rank_ratio_cnn": 2, "update_interval": 4, "reproject_factor": 5}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, **_: torch.optim.AdamW(params, lr=1e-2),
    "coap_adamw": lambda params, **kw: CoapAdamW(params, lr=1e-2, **COAP, **kw),
    "coap_adamw8bit": lambda params, **kw: CoapAdamW8bit(params, lr=1e-2, min_8bit_size=256, **COAP, **kw),
    "coap_adafactor": lambda params, **kw: CoapAdafactor(params, lr=1e-2, beta1=0.9, **COAP, **kw),
    "coap_adafactor8bit": lambda params, **kw: CoapAdafactor8bit(params, lr=1e-2, beta1=0.9, min_8bit_size=256, **COAP, **kw),
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
            largest_jump = max(largest_jump, max((p - b).abs().max().item() for p, b in zip(model.parameters(), before)))
            largest_defect = max(largest_defect, projection_defect(optimizer))
    with torch.no_grad():
        heldout = torch.nn.functional.mse_loss(model(data["heldout_x"]), data["heldout_y"]).item()
    return {"heldout_loss": heldout, "largest_weight_change": largest_jump, "largest_defect": largest_defect,
            "first_grad_rms": grad_rms}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--batch", type=int, default=256, help="training and held-out examples (default 256)")
    parser.add_argument("--target-scale", type=float, default=30.0,
                        help="teacher outputs are multiplied by this (default 30: a sum-reduced gradient RMS of ~25)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ", ".join(OPTIMIZERS))
    parser.add_argument("--faithful", action="store_true", help="also run the COAP optimizers with correlation_max_norm=None")
    parser.add_argument("--quick", action="store_true", help="20 steps, for a smoke test")
    parser.add_argument("--json", type=Path, default=Path("results/bench_loss_scale.json"), help="where to write the figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps = 20
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown --optimizers {unknown}; choose from {sorted(OPTIMIZERS)}")
    torch.set_num_threads(_common.available_threads())
    start, load_before = time.perf_counter(), _common.load_average()
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
            results.append({"optimizer": name, "variant": variant, "mean": mean, "sum": total,
                            "heldout_ratio_sum_to_mean": ratio, "diverged": diverged})
            rows.append([name, variant, f"{mean['heldout_loss']:.4g}", f"{total['heldout_loss']:.4g}",
                         "diverged" if diverged else f"{ratio:.3f}", f"{total['largest_weight_change']:.3g}",
                         f"{max(mean['largest_defect'], total['largest_defect']):.1e}", f"{total['first_grad_rms']:.3g}"])
    _common.print_table(
        f"Held-out loss, mean- vs sum-reduced training ({args.steps} steps, batch {args.batch}, "
        f"target scale {args.target_scale:g})",
        ["optimizer", "Eq. 2 step", "mean run", "sum run", "sum / mean", "max dW (sum)", "max |P^T P - I|", "grad RMS (sum)"],
        rows,
        left=2,
    )
    print(_common.load_averages_line(load_before, _common.load_average()))
    meta = {**_common.environment(), "steps": args.steps, "batch": args.batch, "target_scale": args.target_scale, "coap": COAP}
    _common.write_json(args.json, {"meta": meta, "results": results}, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
