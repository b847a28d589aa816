"""Benchmark the four COAP optimizers (and CoapAdamW against torch.optim.AdamW): optimizer-state
bytes, step time, refresh cost.

Three sections, each printed as a table and written to a JSON file:

1. **State bytes** after one step of ``CoapAdamW``, ``CoapAdamW8bit``, ``CoapAdafactor`` and
   ``CoapAdafactor8bit`` (rank r; Adafactor with ``beta1=0.9``), each against its closed form
   (the functions ``coap_*_bytes`` below, README's table with the block count rounded up and
   ``min_8bit_size`` applied to every moment), and ``torch.optim.AdamW``'s ``8 * m * n``.
2. **Step time** of one optimizer step on a single ``nn.Parameter`` with a fixed random gradient:
   for each of the four optimizers its steady step (no refresh of ``P``), its Eq. 2 refresh step,
   its low-cost-SVD refresh step, and the step amortised over a full ``T_u * lambda`` cycle, as
   ratios to the matmul floor (the two ``(max, min, r)`` matmuls ``G P`` and ``U P^T``), with the
   ratio 8-bit / 32-bit of the same optimizer; and CoapAdamW's step against
   ``torch.optim.AdamW`` (``foreach=False`` and ``foreach=True``) and against the *floor*: the
   two matmuls plus Adam's elementwise moment update on the ``max * r`` projected entries, all
   timed in the same run.
3. **Refresh cost** at one shape: ``correlation_aware_step`` and the warm-started ``low_cost_svd``
   as ratios to a full ``torch.linalg.svd(G, full_matrices=False)`` (GaLore's per-refresh cost),
   and the closed-form Eq. 2 step against an autograd reference of the same step.

Run ``python benchmarks/bench_optimizer.py --help`` for the options; ``--quick`` is a smoke test
that finishes in seconds. Targets are printed as PASS / FAIL markers; nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coap_torch import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit, optimizer_state_nbytes
from coap_torch.functional import adam_direction_, coap_objective, correlation_aware_step, low_cost_svd, orthonormalize
from coap_torch.utils.memory import state_nbytes_by_kind

# The helpers shared with the other benchmark scripts live next to this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from _common import (
    Timing,
    available_threads,
    environment,
    fmt_ms,
    load_average,
    load_averages_line,
    parse_shape,
    print_table,
    round_robin,
    shape_str,
    write_json,
)

FULL_SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))
FULL_RANK = 512
FULL_REFRESH_SHAPE = (2048, 5632)
QUICK_SHAPES = ((512, 512), (512, 1024), (1024, 512))
QUICK_RANK = 128
QUICK_REFRESH_SHAPE = (512, 1024)

# Targets (printed, never asserted).
STATE_BYTES_TOLERANCE = 0  # measured state bytes (step counters excluded) equal the closed form exactly
STEADY_TARGET = 1.25  # steady step <= 1.25 x floor
AMORTISED_TARGET = 1.5  # amortised step <= 1.5 x floor
REFRESH_TARGET = 0.1  # correlation_aware_step, low_cost_svd <= 0.1 x full SVD
CLOSED_FORM_TARGET = 1.0  # closed-form Eq. 2 step faster than autograd
EIGHT_BIT_TARGET = 1.5  # amortised step of an 8-bit optimizer <= 1.5 x its 32-bit counterpart

# Hyper-parameters of the timed steps (the optimizer's defaults).
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2
CORRELATION_LR = 0.1
# CoapAdafactor / CoapAdafactor8bit: a manual lr with a first moment (the paper's setting).
ADAFACTOR_LR = 1e-3
ADAFACTOR_BETA1 = 0.9
# CoapAdamW8bit / CoapAdafactor8bit: the optimizers' defaults.
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096

#: The four COAP optimizers, in the order of the tables; each 8-bit one maps to its 32-bit twin.
COAP_OPTIMIZERS = ("CoapAdamW", "CoapAdamW8bit", "CoapAdafactor", "CoapAdafactor8bit")
EIGHT_BIT_PAIRS = {"CoapAdamW8bit": "CoapAdamW", "CoapAdafactor8bit": "CoapAdafactor"}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
class Timer:
    """Medians of wall-clock times; synchronizes CUDA around every timed call."""

    def __init__(self, device: torch.device, *, repeats: int, warmup: int, inner: int) -> None:
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.inner = inner

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        setup: Callable[[], object] | None = None,
        repeats: int | None = None,
        warmup: int | None = None,
        inner: int | None = None,
    ) -> Timing:
        """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` samples, each the mean of
        ``inner`` calls. ``setup`` runs before every call, outside the timed region."""
        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        inner = self.inner if inner is None else inner
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        self.sync()
        timing = Timing()
        for _ in range(repeats):
            total = 0.0
            for _ in range(inner):
                if setup is not None:
                    setup()
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                total += time.perf_counter() - start
            timing.samples_ms.append(total / inner * 1e3)
        return timing

    def interleaved(self, cases: dict[str, Case]) -> dict[str, Timing]:
        """Time several operations round-robin: every round takes one sample of each case (the
        order rotating from round to round), so that background load on a shared machine hits
        all of them alike and their ratios stay meaningful."""
        names = list(cases)
        for name in names:
            case = cases[name]
            for _ in range(self.warmup if case.warmup is None else case.warmup):
                if case.setup is not None:
                    case.setup()
                case.fn()
        self.sync()
        timings = {name: Timing() for name in names}
        rounds = max(self.repeats if c.repeats is None else c.repeats for c in cases.values())
        for index, order in round_robin(names, rounds):
            for name in order:
                case = cases[name]
                if index >= (self.repeats if case.repeats is None else case.repeats):
                    continue
                inner = self.inner if case.inner is None else case.inner
                total = 0.0
                for _ in range(inner):
                    if case.setup is not None:
                        case.setup()
                    self.sync()
                    start = time.perf_counter()
                    case.fn()
                    self.sync()
                    total += time.perf_counter() - start
                timings[name].samples_ms.append(total / inner * 1e3)
        return timings


@dataclass
class Case:
    """One operation to time; ``None`` fields take the :class:`Timer`'s settings."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None = None
    repeats: int | None = None
    warmup: int | None = None
    inner: int | None = None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_shape(part) for part in text.split(",") if part.strip())


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}x"


def random_matrix(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    # Drawn on the CPU from a private generator: same data on every device, global RNG untouched.
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def coap_optimizer(param: nn.Parameter, args: argparse.Namespace, name: str = "CoapAdamW") -> torch.optim.Optimizer:
    """One of :data:`COAP_OPTIMIZERS` on ``[param]``, with the benchmark's settings."""
    coap = dict(
        rank=args.rank,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        correlation_lr=CORRELATION_LR,
    )
    quant = dict(block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE)
    if name in ("CoapAdamW", "CoapAdamW8bit"):
        cls, extra = (CoapAdamW, {}) if name == "CoapAdamW" else (CoapAdamW8bit, quant)
        return cls([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **coap, **extra)
    if name in ("CoapAdafactor", "CoapAdafactor8bit"):
        cls, extra = (CoapAdafactor, {}) if name == "CoapAdafactor" else (CoapAdafactor8bit, quant)
        return cls([param], lr=ADAFACTOR_LR, beta1=ADAFACTOR_BETA1, relative_step=False, scale_parameter=False,
                   **coap, **extra)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {COAP_OPTIMIZERS}")


def fresh_param(weight: Tensor, grad: Tensor) -> nn.Parameter:
    param = nn.Parameter(weight.clone())
    param.grad = grad  # shared and never modified by the optimizers
    return param


# ------------------------------------------------------------------------------------------------
# closed forms of the state bytes (README, "The four optimizers"), for one projected (m, n) matrix
# ------------------------------------------------------------------------------------------------
def moment_8bit_bytes(numel: int, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of one moment of ``numel`` entries in an 8-bit optimizer: ``numel`` uint8 codes and one
    float32 absmax per block (the last block rounded up) when ``numel >= min_8bit_size``, else
    ``4 * numel`` (float32). This applies to every moment, 1-D accumulators included."""
    if numel >= min_8bit_size:
        return numel + 4 * math.ceil(numel / block_size)
    return 4 * numel


def coap_adamw_bytes(shape: tuple[int, int], rank: int, element_size: int = 4) -> int:
    """``CoapAdamW``: ``4 (2 m r + n r)`` (m >= n): two moments (m, r) and ``P`` (n, r)."""
    big, small = max(shape), min(shape)
    return element_size * (2 * big * rank + small * rank)


def coap_adamw8bit_bytes(
    shape: tuple[int, int], rank: int, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE
) -> int:
    """``CoapAdamW8bit``: ``4 n r + 2 m r + 8 ceil(m r / 256)`` (m >= n): ``P`` in float32, both
    moments 8-bit (float32 if ``m r < min_8bit_size``)."""
    big, small = max(shape), min(shape)
    return 4 * small * rank + 2 * moment_8bit_bytes(big * rank, block_size, min_8bit_size)


def coap_adafactor_bytes(shape: tuple[int, int], rank: int, beta1: bool = True) -> int:
    """``CoapAdafactor``: ``4 (n r + m r + m + r)`` with ``beta1`` set, ``4 (n r + m + r)`` without
    (m >= n): ``P`` (n, r), the first moment (m, r), row (m,) and column (r,) accumulators."""
    big, small = max(shape), min(shape)
    return 4 * (small * rank + (big * rank if beta1 else 0) + big + rank)


def coap_adafactor8bit_bytes(
    shape: tuple[int, int],
    rank: int,
    beta1: bool = True,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> int:
    """``CoapAdafactor8bit``: ``4 n r + m r + 4 ceil(m r / 256) + 4 (m + r)`` with ``beta1`` set
    (m >= n), where an accumulator with ``>= min_8bit_size`` entries is 8-bit too: the row
    accumulator (m,) costs ``m + 4 ceil(m / 256)`` when ``m >= 4096``, the column one (r,) likewise."""
    big, small = max(shape), min(shape)
    first = moment_8bit_bytes(big * rank, block_size, min_8bit_size) if beta1 else 0
    rows = moment_8bit_bytes(big, block_size, min_8bit_size)
    cols = moment_8bit_bytes(rank, block_size, min_8bit_size)
    return 4 * small * rank + first + rows + cols


def adamw_bytes(shape: tuple[int, int]) -> int:
    """``torch.optim.AdamW``: ``8 m n``."""
    return 8 * shape[0] * shape[1]


#: The closed form of each COAP optimizer, as configured by :func:`coap_optimizer`.
FORMULAS: dict[str, Callable[[tuple[int, int], int], int]] = {
    "CoapAdamW": coap_adamw_bytes,
    "CoapAdamW8bit": coap_adamw8bit_bytes,
    "CoapAdafactor": coap_adafactor_bytes,
    "CoapAdafactor8bit": coap_adafactor8bit_bytes,
}
FORMULA_TEXT = {
    "CoapAdamW": "4*(2*m*r + n*r)",
    "CoapAdamW8bit": "4*n*r + 2*q(m*r)",
    "CoapAdafactor": "4*(n*r + m*r + m + r)",
    "CoapAdafactor8bit": "4*n*r + q(m*r) + q(m) + q(r)",
}
FORMULA_NOTE = (
    "m = max(m,n), n = min(m,n); q(k) = k + 4*ceil(k/256) (uint8 codes + fp32 absmax per block) if "
    "k >= min_8bit_size = 4096, else 4*k (fp32)"
)


def formula_bytes(shape: tuple[int, int], rank: int, element_size: int = 4) -> int:
    """CoapAdamW's closed form (kept under its old name)."""
    return coap_adamw_bytes(shape, rank, element_size)


def measure_state_bytes(
    name: str, shape: tuple[int, int], args: argparse.Namespace, weight: Tensor, grad: Tensor
) -> tuple[nn.Parameter, torch.optim.Optimizer, dict[str, Any]]:
    """Build optimizer ``name`` on a copy of ``weight``, take one step, and compare its state bytes
    with the closed form. Returns the parameter, the optimizer and the row for the JSON."""
    param = fresh_param(weight, grad)
    opt = coap_optimizer(param, args, name)
    opt.step()
    measured = optimizer_state_nbytes(opt)
    formula = FORMULAS[name](shape, args.rank)
    row = {
        "measured_bytes": measured,
        "measured_bytes_incl_step": optimizer_state_nbytes(opt, include_step=True),
        "formula_bytes": formula,
        "minus_formula_bytes": measured - formula,
        "formula": FORMULA_TEXT[name],
        "bytes_by_key": state_nbytes_by_kind(opt),
        "state_shapes": {
            k: [list(v.shape), str(v.dtype).replace("torch.", "")]
            for k, v in opt.state[param].items()
            if isinstance(v, Tensor) and k != "step"
        },
        "equal_formula": measured == formula,
    }
    return param, opt, row


def amortised(steady: float, eq2: float, svd: float, update_interval: int, reproject_factor: int) -> float:
    """Mean step time over one cycle of ``T_u * lambda`` steps (step 1's initialisation excluded):
    ``T_u * lambda - lambda`` steady steps, ``lambda - 1`` Eq. 2 refreshes and one SVD refresh."""
    cycle = update_interval * reproject_factor
    n_eq2 = reproject_factor - 1
    n_steady = cycle - reproject_factor
    return (n_steady * steady + n_eq2 * eq2 + svd) / cycle


#: Prefix of each optimizer's timing keys in the JSON (CoapAdamW keeps its historical ``coap_``).
OPT_KEYS = {
    "CoapAdamW": "coap",
    "CoapAdamW8bit": "coap_adamw8bit",
    "CoapAdafactor": "coap_adafactor",
    "CoapAdafactor8bit": "coap_adafactor8bit",
}


def eight_bit_target_key(name: str) -> str:
    """Summary / target key of the 8-bit optimizer ``name`` against its 32-bit twin."""
    return f"{name}_amortised_le_{EIGHT_BIT_TARGET}x_{EIGHT_BIT_PAIRS[name]}"


def optimizer_step_rows(
    timings: dict[str, Timing],
    cycles: dict[str, Timing],
    args: argparse.Namespace,
    t_floor: Timing,
    t_floor_mm: Timing,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per-optimizer step times, amortised step and ratios to the floors; and 8-bit / 32-bit."""
    T_u, lam = args.update_interval, args.reproject_factor
    rows: dict[str, dict[str, Any]] = {}
    for name in COAP_OPTIMIZERS:
        key = OPT_KEYS[name]
        steady, svd = timings[f"{key}_steady"], timings[f"{key}_svd_refresh"]
        eq2 = timings.get(f"{key}_eq2_refresh")
        amort = amortised(steady.median, eq2.median if eq2 is not None else 0.0, svd.median, T_u, lam)
        amort_min = amortised(steady.min, eq2.min if eq2 is not None else 0.0, svd.min, T_u, lam)
        cycle = cycles.get(name)
        rows[name] = {
            "ms": {
                "steady": steady.median,
                "eq2_refresh": eq2.median if eq2 is not None else None,
                "svd_refresh": svd.median,
                "amortised": amort,
                "amortised_from_min": amort_min,
                "full_cycle_mean": cycle.median / (T_u * lam) if cycle is not None else None,
            },
            "ratios": {
                "steady_over_floor_matmuls": steady.median / t_floor_mm.median,
                "amortised_over_floor_matmuls": amort / t_floor_mm.median,
                "steady_over_floor": steady.median / t_floor.median,
                "amortised_over_floor": amort / t_floor.median,
            },
            "ratios_from_min": {
                "steady_over_floor_matmuls": steady.min / t_floor_mm.min,
                "amortised_over_floor_matmuls": amort_min / t_floor_mm.min,
                "steady_over_floor": steady.min / t_floor.min,
                "amortised_over_floor": amort_min / t_floor.min,
            },
            "samples": {
                "steady": steady.to_json(),
                "eq2_refresh": eq2.to_json() if eq2 is not None else None,
                "svd_refresh": svd.to_json(),
                "full_cycle": cycle.to_json() if cycle is not None else None,
            },
        }
    eight_bit: dict[str, dict[str, Any]] = {}
    for name, twin in EIGHT_BIT_PAIRS.items():
        q, f = rows[name]["ms"], rows[twin]["ms"]
        amort_ratio = q["amortised"] / f["amortised"]
        eight_bit[name] = {
            "over": twin,
            "steady": q["steady"] / f["steady"],
            "amortised": amort_ratio,
            "amortised_from_min": q["amortised_from_min"] / f["amortised_from_min"],
            "target": amort_ratio <= EIGHT_BIT_TARGET,
        }
    return rows, eight_bit


# ------------------------------------------------------------------------------------------------
# sections 1 + 2: state bytes and step time, per shape
# ------------------------------------------------------------------------------------------------
def bench_shape(
    shape: tuple[int, int], args: argparse.Namespace, timer: Timer, device: torch.device, generator: torch.Generator
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    m, n = shape
    rank = args.rank
    T_u, lam = args.update_interval, args.reproject_factor
    weight = random_matrix(shape, generator, device) * 0.02
    grad = random_matrix(shape, generator, device)

    # -- the four COAP optimizers: one step initialises P and the moments ------------------------
    coaps: dict[str, tuple[nn.Parameter, torch.optim.Optimizer]] = {}
    coap_rows: dict[str, dict[str, Any]] = {}
    for name in COAP_OPTIMIZERS:
        param, opt, row = measure_state_bytes(name, shape, args, weight, grad)
        coaps[name] = (param, opt)
        coap_rows[name] = row
    coap_param, coap = coaps["CoapAdamW"]
    state = coap.state[coap_param]
    measured = coap_rows["CoapAdamW"]["measured_bytes"]
    formula = coap_rows["CoapAdamW"]["formula_bytes"]
    proj_shape = tuple(state["proj"].shape)
    moment_shape = tuple(state["exp_avg"].shape)

    # -- torch.optim.AdamW, both implementations -------------------------------------------------
    adamw = {}
    for foreach in (False, True):
        p = fresh_param(weight, grad)
        opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=foreach)
        opt.step()
        adamw[foreach] = (p, opt)
    adamw_measured = optimizer_state_nbytes(adamw[False][1])
    adamw_formula = adamw_bytes(shape)
    for name, row in coap_rows.items():
        row["over_adamw"] = row["measured_bytes"] / adamw_measured
        twin = EIGHT_BIT_PAIRS.get(name)
        row["over_32bit"] = row["measured_bytes"] / coap_rows[twin]["measured_bytes"] if twin else None

    state_row = {
        "shape": list(shape),
        "rank": rank,
        "proj_shape": list(proj_shape),
        "moment_shape": list(moment_shape),
        "coap_measured_bytes": measured,
        "coap_measured_bytes_incl_step": coap_rows["CoapAdamW"]["measured_bytes_incl_step"],
        "coap_formula_bytes": formula,
        "coap_minus_formula_bytes": measured - formula,
        "adamw_measured_bytes": adamw_measured,
        "adamw_formula_bytes": adamw_formula,
        "coap_over_adamw": measured / adamw_measured,
        "formula_over_adamw_formula": formula / adamw_formula,
        # every optimizer: measured / formula bytes, ratios to AdamW and to the 32-bit twin
        "optimizers": coap_rows,
        "target_state_bytes_equal_formula": all(
            abs(r["minus_formula_bytes"]) <= STATE_BYTES_TOLERANCE for r in coap_rows.values()
        )
        and adamw_measured == adamw_formula,
    }

    # -- step kinds, chosen through each optimizer's step counter (reset outside the timed region) --
    counters = {name: opt.state[param]["step"] for name, (param, opt) in coaps.items()}

    def at_step(k: int, name: str = "CoapAdamW") -> Callable[[], None]:
        c = counters[name]
        return lambda: c.fill_(float(k - 1))  # the next step() runs step k

    steady_step = 2 if T_u > 2 else None
    if steady_step is None:
        raise SystemExit("--update-interval must be > 2 for a steady (refresh-free) step to exist")
    eq2_step = T_u if lam > 1 else None
    svd_step = T_u * lam
    # -- the floor: G P, Adam's elementwise update on (max, r), U P^T in the parameter's layout --
    transposed = m < n
    P = state["proj"].clone()
    G_c = grad.mT if transposed else grad  # (max, min), the optimizer's orientation
    exp_avg = torch.zeros(moment_shape, device=device)
    exp_avg_sq = torch.zeros(moment_shape, device=device)
    beta1, beta2 = BETAS
    R = G_c @ P

    def floor_project() -> Tensor:
        return G_c @ P

    def floor_adam(R: Tensor = R) -> Tensor:
        # Bias corrections are scalars, foldable into eps and the matmul's alpha: left out.
        exp_avg.lerp_(R, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        return exp_avg / exp_avg_sq.sqrt().add_(EPS)

    U = floor_adam()

    def floor_restore(U: Tensor = U) -> Tensor:
        return P @ U.mT if transposed else U @ P.mT  # (m, n), contiguous

    def floor() -> Tensor:
        return floor_restore(floor_adam(floor_project()))

    # All step kinds of the four optimizers and the references of this shape are timed
    # round-robin (see Timer.interleaved), so their ratios share the machine's load.
    cases = {}
    for name, (_, opt) in coaps.items():
        key = OPT_KEYS[name]
        cases[f"{key}_steady"] = Case(opt.step, setup=at_step(steady_step, name))
        cases[f"{key}_svd_refresh"] = Case(opt.step, setup=at_step(svd_step, name), repeats=args.svd_step_repeats)
        if eq2_step is not None:
            cases[f"{key}_eq2_refresh"] = Case(opt.step, setup=at_step(eq2_step, name))
    cases.update(
        {
            "adamw_foreach_false": Case(adamw[False][1].step),
            "adamw_foreach_true": Case(adamw[True][1].step),
            "floor": Case(floor),
            "floor_matmuls": Case(lambda: floor_restore(floor_project())),
            "floor_adam_elementwise": Case(floor_adam),
        }
    )
    timings = timer.interleaved(cases)
    t_steady, t_svd, t_floor = timings["coap_steady"], timings["coap_svd_refresh"], timings["floor"]
    t_eq2 = timings.get("coap_eq2_refresh")
    t_adamw = {False: timings["adamw_foreach_false"], True: timings["adamw_foreach_true"]}
    t_floor_mm, t_floor_adam = timings["floor_matmuls"], timings["floor_adam_elementwise"]

    t_amortised = amortised(t_steady.median, t_eq2.median if t_eq2 is not None else 0.0, t_svd.median, T_u, lam)
    amortised_min = amortised(t_steady.min, t_eq2.min if t_eq2 is not None else 0.0, t_svd.min, T_u, lam)
    t_cycles: dict[str, Timing] = {}
    if args.full_cycle:
        # The real schedule: T_u * lambda consecutive steps (steps 1..cycle on initialised state).
        for name, (_, opt) in coaps.items():
            def cycle(opt: torch.optim.Optimizer = opt, c: Tensor = counters[name]) -> None:
                c.fill_(0.0)
                for _ in range(T_u * lam):
                    opt.step()

            t_cycles[name] = timer(cycle, repeats=max(1, args.repeats // 2), warmup=0, inner=1)
    t_cycle = t_cycles.get("CoapAdamW")

    per_optimizer, eight_bit = optimizer_step_rows(timings, t_cycles, args, t_floor, t_floor_mm)

    floor_ms = t_floor.median
    a_false, a_true = t_adamw[False].median, t_adamw[True].median
    step_row: dict[str, Any] = {
        "shape": list(shape),
        "rank": rank,
        "transposed": transposed,
        "ms": {
            "coap_steady": t_steady.median,
            "coap_eq2_refresh": t_eq2.median if t_eq2 is not None else None,
            "coap_svd_refresh": t_svd.median,
            "coap_amortised": t_amortised,
            "coap_amortised_from_min": amortised_min,
            "coap_full_cycle_mean": (t_cycle.median / (T_u * lam)) if t_cycle is not None else None,
            "adamw_foreach_false": a_false,
            "adamw_foreach_true": a_true,
            "floor": floor_ms,
            "floor_matmuls": t_floor_mm.median,
            "floor_adam_elementwise": t_floor_adam.median,
        },
        "ratios": {
            "steady_over_floor": t_steady.median / floor_ms,
            "amortised_over_floor": t_amortised / floor_ms,
            "steady_over_adamw_foreach_false": t_steady.median / a_false,
            "steady_over_adamw_foreach_true": t_steady.median / a_true,
            "amortised_over_adamw_foreach_false": t_amortised / a_false,
            "amortised_over_adamw_foreach_true": t_amortised / a_true,
            "eq2_refresh_over_steady": (t_eq2.median / t_steady.median) if t_eq2 is not None else None,
            "svd_refresh_over_steady": t_svd.median / t_steady.median,
        },
        # The same ratios from the fastest sample of each operation: interference from other
        # processes only ever adds time, so on a shared machine these are the cleaner estimate.
        "ratios_from_min": {
            "steady_over_floor": t_steady.min / t_floor.min,
            "amortised_over_floor": amortised_min / t_floor.min,
            "steady_over_adamw_foreach_false": t_steady.min / t_adamw[False].min,
            "steady_over_adamw_foreach_true": t_steady.min / t_adamw[True].min,
            "amortised_over_adamw_foreach_false": amortised_min / t_adamw[False].min,
            "amortised_over_adamw_foreach_true": amortised_min / t_adamw[True].min,
        },
        "targets": {
            "steady_le_1.25x_floor": t_steady.median <= STEADY_TARGET * floor_ms,
            "amortised_le_1.5x_floor": t_amortised <= AMORTISED_TARGET * floor_ms,
            **{eight_bit_target_key(name): row["target"] for name, row in eight_bit.items()},
        },
        # all four COAP optimizers: step kinds, amortised step, ratios to the floors
        "optimizers": per_optimizer,
        # 8-bit / 32-bit of the same optimizer (steady, amortised), with the target
        "eight_bit_over_32bit": eight_bit,
        "samples": {
            "coap_steady": t_steady.to_json(),
            "coap_eq2_refresh": t_eq2.to_json() if t_eq2 is not None else None,
            "coap_svd_refresh": t_svd.to_json(),
            "coap_full_cycle": t_cycle.to_json() if t_cycle is not None else None,
            "adamw_foreach_false": t_adamw[False].to_json(),
            "adamw_foreach_true": t_adamw[True].to_json(),
            "floor": t_floor.to_json(),
            "floor_matmuls": t_floor_mm.to_json(),
            "floor_adam_elementwise": t_floor_adam.to_json(),
        },
    }

    profile = None
    if args.profile:
        resets = {"steady": at_step(steady_step), "svd_refresh": at_step(svd_step)}
        if eq2_step is not None:
            resets["eq2_refresh"] = at_step(eq2_step)
        profile = profile_steady_step(coap, coap_param, state, resets, timer, transposed, t_steady)
        profile["shape"] = list(shape)
    return state_row, step_row, profile


# ------------------------------------------------------------------------------------------------
# optional: where the steady step's time goes
# ------------------------------------------------------------------------------------------------
def profile_steady_step(
    coap: CoapAdamW,
    param: nn.Parameter,
    state: dict[str, Any],
    resets: dict[str, Callable[[], None]],
    timer: Timer,
    transposed: bool,
    t_steady: Timing,
) -> dict[str, Any]:
    """Where a CoapAdamW step spends its time.

    The pieces of a steady step and of the two refreshes are re-run one by one on the same
    tensors with the public functional API (so the breakdown does not depend on private code),
    and torch.profiler's op table of one real step of each kind is kept as the ground truth.
    """
    grad = param.grad
    P = state["proj"].clone()
    exp_avg, exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    G_c = grad.mT if transposed else grad
    weight = param.detach().clone()
    decay, lr = 1 - LR * WEIGHT_DECAY, LR
    rank = P.shape[-1]

    R = G_c @ P
    U = adam_direction_(exp_avg, exp_avg_sq, R, step=2, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def fused_restore_apply() -> None:
        # W <- decay * W - lr * restore(U) as one GEMM with accumulation, in W's own layout.
        if transposed:
            weight.addmm_(P, U.mT, beta=decay, alpha=-lr)
        else:
            weight.addmm_(U, P.mT, beta=decay, alpha=-lr)

    def unfused_restore_apply() -> None:
        full = U @ P.mT
        weight.mul_(decay)
        weight.add_(full.mT if transposed else full, alpha=-lr)

    P_new = correlation_aware_step(P, G_c, exp_avg, lr=CORRELATION_LR)
    Rot = P.mT @ P_new
    Q = torch.linalg.qr(G_c @ P)[0]
    B = Q.mT @ G_c
    Vh = torch.linalg.svd(B, full_matrices=False)[2]

    cases = {
        # steady step
        "steady: project G_c @ P": Case(lambda: G_c @ P),
        "steady: adam_direction_ on (max, r)": Case(
            lambda: adam_direction_(exp_avg, exp_avg_sq, R, step=2, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
        ),
        "steady: restore + decay + update, one addmm_": Case(fused_restore_apply),
        "alt: restore U @ P^T, then mul_ + add_": Case(unfused_restore_apply),
        # Eq. 2 refresh = steady + these
        "eq2: correlation_aware_step": Case(lambda: correlation_aware_step(P, G_c, exp_avg, lr=CORRELATION_LR)),
        "eq2: rotations P^T P', M R, V (R*R)": Case(lambda: (P.mT @ P_new, exp_avg @ Rot, exp_avg_sq @ Rot.square())),
        # SVD refresh = steady + low_cost_svd + rotations; low_cost_svd's pieces:
        "svd: low_cost_svd (warm)": Case(lambda: low_cost_svd(G_c, rank, sketch=P)),
        "svd:   G_c @ P": Case(lambda: G_c @ P),
        "svd:   qr (max, r)": Case(lambda: torch.linalg.qr(R)),
        "svd:   Q^T G_c": Case(lambda: Q.mT @ G_c),
        "svd:   svd (r, min)": Case(lambda: torch.linalg.svd(B, full_matrices=False)),
        "svd:   orthonormalize (min, r)": Case(lambda: orthonormalize(Vh.mT)),
    }
    parts = timer.interleaved(cases)
    steady_parts = [k for k in parts if k.startswith("steady:")]
    steady_sum = sum(parts[k].median for k in steady_parts)

    op_tables: dict[str, str] = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if param.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total" if param.device.type == "cuda" else "self_cpu_time_total"
        for kind, reset in resets.items():
            reset()
            coap.step()
            timer.sync()
            reset()
            with profile(activities=activities) as prof:
                coap.step()
                timer.sync()
            op_tables[kind] = prof.key_averages().table(sort_by=sort_by, row_limit=12)
    except Exception as exc:  # the profiler is optional
        op_tables["error"] = f"(torch.profiler unavailable: {exc})"

    return {
        "steady_ms": t_steady.median,
        "parts_ms": {k: v.median for k, v in parts.items()},
        "steady_parts_sum_ms": steady_sum,
        "steady_unaccounted_ms": t_steady.median - steady_sum,
        "op_tables": op_tables,
    }


# ------------------------------------------------------------------------------------------------
# section 3: refresh cost
# ------------------------------------------------------------------------------------------------
def autograd_correlation_step(P: Tensor, grad: Tensor, exp_avg_proj: Tensor, lr: float = CORRELATION_LR) -> Tensor:
    """The Eq. 2 step by autograd on the literal objective: a reference for the closed form."""
    with torch.enable_grad():
        P = P.detach().requires_grad_()
        coap_objective(P, grad, exp_avg_proj).backward()
    return (P - lr * P.grad).detach()


def bench_refresh(
    shape: tuple[int, int], args: argparse.Namespace, timer: Timer, device: torch.device, generator: torch.Generator
) -> dict[str, Any]:
    m, n = shape
    rank = args.refresh_rank
    G = random_matrix(shape, generator, device)
    G_c = G.mT if m < n else G  # (max, min), the optimizer's orientation; P is (min, r)
    P = orthonormalize(random_matrix((min(shape), rank), generator, device))
    M = (G_c @ P) * 0.1  # a plausible low-rank first moment (max, r)

    timings = timer.interleaved(
        {
            "full_svd": Case(
                lambda: torch.linalg.svd(G, full_matrices=False), repeats=args.full_svd_repeats, warmup=1, inner=1
            ),
            "correlation_aware_step": Case(lambda: correlation_aware_step(P, G_c, M, lr=CORRELATION_LR)),
            "low_cost_svd_warm": Case(lambda: low_cost_svd(G_c, rank, sketch=P)),
            "autograd_eq2_step": Case(lambda: autograd_correlation_step(P, G_c, M, CORRELATION_LR)),
        }
    )
    t_svd, t_cas = timings["full_svd"], timings["correlation_aware_step"]
    t_lcs, t_auto = timings["low_cost_svd_warm"], timings["autograd_eq2_step"]

    closed = correlation_aware_step(P, G_c, M, lr=CORRELATION_LR)
    reference = autograd_correlation_step(P, G_c, M, CORRELATION_LR)
    step_closed, step_reference = P - closed, P - reference
    rel_err = (torch.linalg.vector_norm(step_closed - step_reference) / torch.linalg.vector_norm(step_reference)).item()

    full = t_svd.median
    return {
        "shape": list(shape),
        "rank": rank,
        "ms": {
            "full_svd": full,
            "correlation_aware_step": t_cas.median,
            "low_cost_svd_warm": t_lcs.median,
            "autograd_eq2_step": t_auto.median,
        },
        "ratios": {
            "correlation_aware_step_over_full_svd": t_cas.median / full,
            "low_cost_svd_over_full_svd": t_lcs.median / full,
            "correlation_aware_step_over_autograd": t_cas.median / t_auto.median,
        },
        "ratios_from_min": {
            "correlation_aware_step_over_full_svd": t_cas.min / t_svd.min,
            "low_cost_svd_over_full_svd": t_lcs.min / t_svd.min,
            "correlation_aware_step_over_autograd": t_cas.min / t_auto.min,
        },
        "closed_form_vs_autograd_step_rel_err": rel_err,
        "targets": {
            "correlation_aware_step_le_0.1x_full_svd": t_cas.median <= REFRESH_TARGET * full,
            "low_cost_svd_le_0.1x_full_svd": t_lcs.median <= REFRESH_TARGET * full,
            "closed_form_faster_than_autograd": t_cas.median < CLOSED_FORM_TARGET * t_auto.median,
        },
        "samples": {
            "full_svd": t_svd.to_json(),
            "correlation_aware_step": t_cas.to_json(),
            "low_cost_svd_warm": t_lcs.to_json(),
            "autograd_eq2_step": t_auto.to_json(),
        },
    }


# ------------------------------------------------------------------------------------------------
# printing
# ------------------------------------------------------------------------------------------------
def print_state_bytes(rows: list[dict[str, Any]]) -> None:
    mib = 2.0**20
    table = []
    for r in rows:
        for name, o in r["optimizers"].items():
            table.append(
                [
                    shape_str(r["shape"]),
                    r["rank"],
                    name,
                    f"{o['measured_bytes']:,} ({o['measured_bytes'] / mib:.2f} MiB)",
                    f"{o['formula_bytes']:,}",
                    o["minus_formula_bytes"],
                    f"{o['over_adamw']:.4f}",
                    f"{o['over_32bit']:.4f}" if o["over_32bit"] is not None else "-",
                    f"{mark(o['equal_formula'])} (==formula)",
                ]
            )
        adamw_ok = r["adamw_measured_bytes"] == r["adamw_formula_bytes"]
        table.append(
            [
                shape_str(r["shape"]),
                "-",
                "torch AdamW",
                f"{r['adamw_measured_bytes']:,} ({r['adamw_measured_bytes'] / mib:.2f} MiB)",
                f"{r['adamw_formula_bytes']:,}",
                r["adamw_measured_bytes"] - r["adamw_formula_bytes"],
                "1.0000",
                "-",
                f"{mark(adamw_ok)} (==formula)",
            ]
        )
    print_table(
        "1. Optimizer-state bytes after one step ('step' counters excluded)",
        ["shape", "rank", "optimizer", "measured", "formula", "diff B", "/AdamW", "8-bit/32-bit", "target"],
        table,
        left=3,
    )
    print("  formulas (bytes): " + "; ".join(f"{name} {text}" for name, text in FORMULA_TEXT.items())
          + "; torch AdamW 8*m*n")
    print(f"  {FORMULA_NOTE}")
    print(f"  CoapAdafactor*: beta1={ADAFACTOR_BETA1} (first moment kept); 8-bit: block_size={BLOCK_SIZE}, "
          f"min_8bit_size={MIN_8BIT_SIZE}")


def print_step_times(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    T_u, lam = args.update_interval, args.reproject_factor
    cycle = T_u * lam
    print_table(
        "2a. Step time, ms (median)",
        ["shape", "COAP steady", "COAP Eq.2", "COAP SVD", "COAP amortised", "full cycle", "AdamW fe=F",
         "AdamW fe=T", "floor", "floor mm", "floor adam"],
        [
            [
                shape_str(r["shape"]),
                fmt_ms(r["ms"]["coap_steady"]),
                fmt_ms(r["ms"]["coap_eq2_refresh"]) if r["ms"]["coap_eq2_refresh"] is not None else "-",
                fmt_ms(r["ms"]["coap_svd_refresh"]),
                fmt_ms(r["ms"]["coap_amortised"]),
                fmt_ms(r["ms"]["coap_full_cycle_mean"]) if r["ms"]["coap_full_cycle_mean"] is not None else "-",
                fmt_ms(r["ms"]["adamw_foreach_false"]),
                fmt_ms(r["ms"]["adamw_foreach_true"]),
                fmt_ms(r["ms"]["floor"]),
                fmt_ms(r["ms"]["floor_matmuls"]),
                fmt_ms(r["ms"]["floor_adam_elementwise"]),
            ]
            for r in rows
        ],
    )
    print_table(
        "2b. Step time ratios",
        ["shape", "steady/floor", "amort./floor", "steady/AdamW F", "steady/AdamW T", "amort./AdamW F",
         "amort./AdamW T", "Eq.2/steady", "SVD/steady"],
        [
            [
                shape_str(r["shape"]),
                f"{fmt_ratio(r['ratios']['steady_over_floor'])} {mark(r['targets']['steady_le_1.25x_floor'])}",
                f"{fmt_ratio(r['ratios']['amortised_over_floor'])} {mark(r['targets']['amortised_le_1.5x_floor'])}",
                fmt_ratio(r["ratios"]["steady_over_adamw_foreach_false"]),
                fmt_ratio(r["ratios"]["steady_over_adamw_foreach_true"]),
                fmt_ratio(r["ratios"]["amortised_over_adamw_foreach_false"]),
                fmt_ratio(r["ratios"]["amortised_over_adamw_foreach_true"]),
                fmt_ratio(r["ratios"]["eq2_refresh_over_steady"]) if r["ratios"]["eq2_refresh_over_steady"] else "-",
                fmt_ratio(r["ratios"]["svd_refresh_over_steady"]),
            ]
            for r in rows
        ],
    )
    print(f"  targets: steady <= {STEADY_TARGET}x floor, amortised <= {AMORTISED_TARGET}x floor")
    for r in rows:
        q = r["ratios_from_min"]
        print(
            f"  from the fastest samples, {shape_str(r['shape'])}: steady/floor {fmt_ratio(q['steady_over_floor'])}, "
            f"amortised/floor {fmt_ratio(q['amortised_over_floor'])}, steady/AdamW F "
            f"{fmt_ratio(q['steady_over_adamw_foreach_false'])}, "
            f"steady/AdamW T {fmt_ratio(q['steady_over_adamw_foreach_true'])}"
        )
    print(
        f"  amortised = (({cycle} - {lam}) * steady + ({lam} - 1) * Eq.2 + 1 * SVD) / {cycle}"
        f"  (T_u={T_u}, lambda={lam}; each step kind timed separately by setting the step counter)"
    )
    print("  floor = G_c @ P + Adam elementwise moment update on (max(m,n), r) + U @ P^T (in the parameter's layout)")
    print("  AdamW fe=F / fe=T: torch.optim.AdamW(foreach=False) / (foreach=True)")
    if any(r["ms"]["coap_full_cycle_mean"] is not None for r in rows):
        print(f"  full cycle: mean step time over {cycle} consecutive real steps (--full-cycle)")


def print_coap_step_times(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    T_u, lam = args.update_interval, args.reproject_factor
    table = []
    for r in rows:
        for name, o in r["optimizers"].items():
            ms, ratios = o["ms"], o["ratios"]
            adam = name.startswith("CoapAdamW")
            eight = r["eight_bit_over_32bit"].get(name)
            table.append(
                [
                    shape_str(r["shape"]),
                    name,
                    fmt_ms(ms["steady"]),
                    fmt_ms(ms["eq2_refresh"]) if ms["eq2_refresh"] is not None else "-",
                    fmt_ms(ms["svd_refresh"]),
                    fmt_ms(ms["amortised"]),
                    fmt_ms(ms["full_cycle_mean"]) if ms["full_cycle_mean"] is not None else "-",
                    fmt_ratio(ratios["steady_over_floor_matmuls"]),
                    fmt_ratio(ratios["amortised_over_floor_matmuls"]),
                    fmt_ratio(ratios["amortised_over_floor"]) if adam else "-",
                    f"{fmt_ratio(eight['steady'])}" if eight else "-",
                    f"{fmt_ratio(eight['amortised'])} {mark(eight['target'])}" if eight else "-",
                ]
            )
    print_table(
        "2c. Step time of the four COAP optimizers, ms (median), and ratios",
        ["shape", "optimizer", "steady", "Eq.2", "SVD", "amortised", "full cycle", "steady/floor mm",
         "amort./floor mm", "amort./floor", "8-bit/32-bit steady", "8-bit/32-bit amort."],
        table,
        left=2,
    )
    print(f"  target: amortised step of an 8-bit optimizer <= {EIGHT_BIT_TARGET}x that of its 32-bit twin "
          f"(CoapAdamW8bit/CoapAdamW, CoapAdafactor8bit/CoapAdafactor)")
    for r in rows:
        parts = []
        for name, o in r["optimizers"].items():
            parts.append(f"{name} amort./floor mm {fmt_ratio(o['ratios_from_min']['amortised_over_floor_matmuls'])}")
        for name, e in r["eight_bit_over_32bit"].items():
            parts.append(f"{name}/{e['over']} amort. {fmt_ratio(e['amortised_from_min'])}")
        print(f"  from the fastest samples, {shape_str(r['shape'])}: " + ", ".join(parts))
    print("  floor mm = G_c @ P + U @ P^T (the two (max, min, r) matmuls every optimizer here performs); "
          "floor = floor mm + Adam's elementwise update (AdamW variants only)")
    print(f"  amortised over T_u*lambda = {T_u}*{lam} steps, as in 2a; CoapAdafactor*: lr={ADAFACTOR_LR}, "
          f"beta1={ADAFACTOR_BETA1}, relative_step=False, scale_parameter=False")


def print_profile(profiles: list[dict[str, Any]], show_ops: bool) -> None:
    for prof in profiles:
        steady = prof["steady_ms"]
        rows = [[name, fmt_ms(ms), f"{ms / steady:.1%}"] for name, ms in prof["parts_ms"].items()]
        rows.append(["steady: sum of its parts", fmt_ms(prof["steady_parts_sum_ms"]),
                     f"{prof['steady_parts_sum_ms'] / steady:.1%}"])
        rows.append(["steady: rest (python, step counter, ...)", fmt_ms(prof["steady_unaccounted_ms"]),
                     f"{prof['steady_unaccounted_ms'] / steady:.1%}"])
        rows.append(["steady step (measured above)", fmt_ms(steady), "100.0%"])
        print_table(
            f"Profile, {shape_str(prof['shape'])}: pieces timed in isolation (median, round-robin)",
            ["piece", "ms", "of steady step"],
            rows,
        )
        if show_ops:
            for kind, table in prof["op_tables"].items():
                print(f"\ntorch.profiler, one {kind} step of CoapAdamW, {shape_str(prof['shape'])}:")
                print(table)


def print_refresh(row: dict[str, Any]) -> None:
    ms, ratios, targets = row["ms"], row["ratios"], row["targets"]
    print_table(
        f"3. Refresh cost at {shape_str(row['shape'])}, rank {row['rank']} (median)",
        ["operation", "ms", "ratio", "target"],
        [
            ["torch.linalg.svd(G, full_matrices=False)", fmt_ms(ms["full_svd"]), "1.000x (reference)", ""],
            ["correlation_aware_step (closed form)", fmt_ms(ms["correlation_aware_step"]),
             f"{fmt_ratio(ratios['correlation_aware_step_over_full_svd'])} of full SVD",
             f"{mark(targets['correlation_aware_step_le_0.1x_full_svd'])} (<= {REFRESH_TARGET}x)"],
            ["low_cost_svd (warm-start sketch = P)", fmt_ms(ms["low_cost_svd_warm"]),
             f"{fmt_ratio(ratios['low_cost_svd_over_full_svd'])} of full SVD",
             f"{mark(targets['low_cost_svd_le_0.1x_full_svd'])} (<= {REFRESH_TARGET}x)"],
            ["autograd Eq.2 step (coap_objective.backward)", fmt_ms(ms["autograd_eq2_step"]), "", ""],
            ["correlation_aware_step / autograd", "",
             fmt_ratio(ratios["correlation_aware_step_over_autograd"]),
             f"{mark(targets['closed_form_faster_than_autograd'])} (< 1x)"],
        ],
    )
    q = row["ratios_from_min"]
    print(
        "  from the fastest samples: correlation_aware_step/full SVD "
        f"{fmt_ratio(q['correlation_aware_step_over_full_svd'])}, "
        f"low_cost_svd/full SVD {fmt_ratio(q['low_cost_svd_over_full_svd'])}, "
        f"closed form/autograd {fmt_ratio(q['correlation_aware_step_over_autograd'])}"
    )
    print(f"  closed-form vs autograd step, relative difference: {row['closed_form_vs_autograd_step_rel_err']:.2e}")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the four COAP optimizers (and CoapAdamW vs torch.optim.AdamW): state bytes, "
        "step time, refresh cost.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {','.join(map(shape_str, QUICK_SHAPES))}, rank {QUICK_RANK}, "
                             "2 repeats, 1 warm-up, 1 thread")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    parser.add_argument("--json", type=Path, default=Path("results/bench_optimizer.json"),
                        help="where to write the results (default: results/bench_optimizer.json)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per measurement, the median is reported (default: 5 on CPU, 20 on CUDA, "
                             "2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before each measurement (default: 2 on CPU, 5 on CUDA, 1 with --quick)")
    parser.add_argument("--inner", type=int, default=None,
                        help="calls averaged into one sample (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--svd-step-repeats", type=int, default=None,
                        help="samples of CoapAdamW's SVD-refresh step (default: --repeats)")
    parser.add_argument("--full-svd-repeats", type=int, default=None,
                        help="samples of the full torch.linalg.svd in section 3 (default: --repeats)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: all CPUs available to this process; 1 with --quick)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help=f"comma-separated MxN shapes (default: {','.join(map(shape_str, FULL_SHAPES))})")
    parser.add_argument("--rank", type=int, default=None, help=f"rank of the COAP optimizers (default: {FULL_RANK})")
    parser.add_argument("--refresh-shape", type=parse_shape, default=None,
                        help=f"shape of section 3 (default: {shape_str(FULL_REFRESH_SHAPE)})")
    parser.add_argument("--refresh-rank", type=int, default=None, help="rank of section 3 (default: --rank)")
    parser.add_argument("--update-interval", type=int, default=32, help="T_u (default: 32)")
    parser.add_argument("--reproject-factor", type=int, default=5, help="lambda (default: 5)")
    parser.add_argument("--full-cycle", action="store_true",
                        help="also time T_u*lambda consecutive real steps per shape (slow on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="break the steady step down into its parts and print a torch.profiler op table")
    parser.add_argument("--skip-refresh", action="store_true", help="skip section 3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and gradients")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.rank = args.rank or QUICK_RANK
        args.refresh_shape = args.refresh_shape or QUICK_REFRESH_SHAPE
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        # One thread: a smoke test should not depend on (or suffer from) other load on the machine;
        # BLAS threads oversubscribed by a concurrent process can make it 10x slower.
        args.threads = args.threads or 1
    args.shapes = args.shapes or FULL_SHAPES
    args.rank = args.rank or FULL_RANK
    args.refresh_shape = args.refresh_shape or FULL_REFRESH_SHAPE
    args.refresh_rank = args.refresh_rank or args.rank
    args.repeats = args.repeats or (20 if cuda else 5)
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.inner = args.inner or (10 if cuda else 1)
    args.svd_step_repeats = args.svd_step_repeats or args.repeats
    args.full_svd_repeats = args.full_svd_repeats or args.repeats
    if args.threads is None:
        args.threads = available_threads()
    for name in ("repeats", "inner", "svd_step_repeats", "full_svd_repeats", "threads", "rank", "refresh_rank",
                 "update_interval", "reproject_factor"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    for shape in (*args.shapes, args.refresh_shape):
        if min(shape) <= max(args.rank, args.refresh_rank if shape == args.refresh_shape else args.rank):
            raise SystemExit(f"rank must be below min(m, n) for shape {shape_str(shape)} to be projected")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    device = torch.device(args.device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace, device: torch.device) -> int:
    started = time.perf_counter()
    load_before = load_average()
    timer = Timer(device, repeats=args.repeats, warmup=args.warmup, inner=args.inner)
    generator = torch.Generator().manual_seed(args.seed)
    meta = {
        **environment(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "inner": args.inner,
        "svd_step_repeats": args.svd_step_repeats,
        "full_svd_repeats": args.full_svd_repeats,
        "shapes": [list(s) for s in args.shapes],
        "rank": args.rank,
        "update_interval": args.update_interval,
        "reproject_factor": args.reproject_factor,
        "lr": LR,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "correlation_lr": CORRELATION_LR,
        "statistic": "median",
        "amortisation": "((T_u*lambda - lambda) * steady + (lambda - 1) * eq2 + 1 * svd) / (T_u*lambda)",
        "floor": "G_c @ P + Adam elementwise moment update on (max(m,n), r) + U @ P^T in the parameter's layout",
        "floor_matmuls": "G_c @ P + U @ P^T in the parameter's layout",
        "optimizers": list(COAP_OPTIMIZERS),
        "adafactor": {"lr": ADAFACTOR_LR, "beta1": ADAFACTOR_BETA1, "relative_step": False,
                      "scale_parameter": False},
        "eight_bit": {"block_size": BLOCK_SIZE, "min_8bit_size": MIN_8BIT_SIZE},
        "formulas": {**FORMULA_TEXT, "torch AdamW": "8*m*n", "note": FORMULA_NOTE},
        "targets": {
            "state_bytes_tolerance_bytes": STATE_BYTES_TOLERANCE,
            "steady_over_floor_max": STEADY_TARGET,
            "amortised_over_floor_max": AMORTISED_TARGET,
            "refresh_over_full_svd_max": REFRESH_TARGET,
            "closed_form_over_autograd_max": CLOSED_FORM_TARGET,
            "eight_bit_amortised_over_32bit_max": EIGHT_BIT_TARGET,
        },
    }
    if load_before is not None and load_before > 0.25 * (os.cpu_count() or 1):
        print(
            f"note: load average {load_before:.2f} on {os.cpu_count()} CPUs before the run; other processes "
            "compete for the CPU (operations are timed round-robin so ratios stay comparable, absolute ms inflate)"
        )
    print(
        f"bench_optimizer: torch {meta['torch']} on {meta['device']}"
        f"{' (' + meta['device_name'] + ')' if meta['device_name'] else ''}, {meta['threads']} threads, "
        f"median of {args.repeats} (warm-up {args.warmup}, {args.inner} call(s) per sample), rank {args.rank}, "
        f"T_u={args.update_interval}, lambda={args.reproject_factor}"
    )

    state_rows, step_rows, profiles = [], [], []
    for shape in args.shapes:
        print(f"  timing {shape_str(shape)} ...", flush=True)
        state_row, step_row, profile = bench_shape(shape, args, timer, device, generator)
        state_rows.append(state_row)
        step_rows.append(step_row)
        if profile is not None:
            profiles.append(profile)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    refresh = None
    if not args.skip_refresh:
        print(f"  timing refresh at {shape_str(args.refresh_shape)} ...", flush=True)
        refresh = bench_refresh(args.refresh_shape, args, timer, device, generator)

    print_state_bytes(state_rows)
    print_step_times(step_rows, args)
    print_coap_step_times(step_rows, args)
    if refresh is not None:
        print_refresh(refresh)
    if profiles:
        print_profile(profiles, show_ops=True)

    summary = {
        "state_bytes_equal_formula": all(r["target_state_bytes_equal_formula"] for r in state_rows),
        "steady_le_1.25x_floor": all(r["targets"]["steady_le_1.25x_floor"] for r in step_rows),
        "amortised_le_1.5x_floor": all(r["targets"]["amortised_le_1.5x_floor"] for r in step_rows),
        **{
            eight_bit_target_key(name): all(r["eight_bit_over_32bit"][name]["target"] for r in step_rows)
            for name in EIGHT_BIT_PAIRS
        },
    }
    if refresh is not None:
        summary.update(refresh["targets"])
    elapsed = time.perf_counter() - started
    meta["elapsed_s"] = elapsed
    meta["load_average_1min_before"] = load_before
    meta["load_average_1min_after"] = load_average()
    results = {
        "meta": meta,
        "state_bytes": state_rows,
        "step_time": step_rows,
        "refresh": refresh,
        "profile": profiles or None,
        "summary": summary,
    }
    print("\nSummary: " + ", ".join(f"{k} {mark(v)}" for k, v in summary.items()))
    print(load_averages_line(load_before, meta["load_average_1min_after"]))
    write_json(args.json, results, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
