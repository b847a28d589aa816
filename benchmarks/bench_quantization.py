"""Compare block-wise 8-bit quantization backends for optimizer state on this machine.

The 8-bit COAP optimizers (``CoapAdamW8bit``, ``CoapAdafactor8bit``) store each moment as uint8
codes of a dynamic code map with one float32 absmax per block of 256 values, quantized and
dequantized by the pure-torch codec in ``coap_torch.functional.quantization``. This script puts
that codec next to the libraries that offer the same kind of state:

* **ours**: ``coap_torch.functional.quantization.quantize_blockwise`` / ``dequantize_blockwise``
  (signed map for first moments, unsigned map for second moments); also, for second moments,
  **ours, sqrt-stored**: what the 8-bit optimizers actually do with ``v`` (quantize ``sqrt(v)``
  with the unsigned map, square after dequantizing);
* **bitsandbytes**: ``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise``
  with ``blocksize=256``: the default (signed) dynamic map for signed data, and
  ``create_dynamic_map(signed=False)`` (the map bitsandbytes' 8-bit optimizers use for their
  second state) for non-negative data;
* **torchao (eager)**: ``torchao.optim.subclass_8bit.OptimState8bit``, the tensor subclass of
  torchao's ``AdamW8bit``: ``OptimState8bit.zeros(shape, signed, block_size=256)``, quantized by
  ``copy_`` from a float tensor and read back by ``dequantize()``;
* **torchao (compiled)**: the helpers that subclass uses (``scale_tensor`` +
  ``quantize_8bit_with_qmap``, ``dequant_with_qmap``) under ``torch.compile``, as torchao's
  optimizers run them (compilation time reported apart; ``--no-compile`` skips it).

For each backend and each kind of data (normal values, signed; squared normal values, unsigned,
like second moments), at one moment shape (default ``5632x512``: the moment of a ``2048x5632``
matrix at rank 512):

1. **time** of quantize and of dequantize (median of ``--repeats`` samples, the backends timed
   round-robin so that load from other processes hits them alike), their sum, and the ratio of
   the sum to ours measured in the same run (also from the fastest samples);
2. **round-trip error**: ``max |x - deq(q(x))| / max |x|``, the same per block of 256 against the
   block's absmax, the mean relative error ``mean(|x - deq(q(x))| / |x|)`` over non-zero ``x``,
   the relative RMS error, and the fraction of non-zero values decoded as 0;
3. **dependency size**: what installing the backend adds (``du`` of its site-packages folders,
   and the installed size of each requirement other than torch).

Backends that cannot be imported (or fail at their first call) are skipped with a line that says
why. The results are printed as tables and written to JSON (``results/bench_quantization.json``).
bitsandbytes and torchao are *not* dependencies of coap-torch: install them to compare
(``pip install bitsandbytes``; ``pip install --no-deps torchao``), uninstall them afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import coap_torch.functional.quantization as ours_q

# The helpers shared with the other benchmark scripts live next to this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common
from _common import (
    Timing,
    available_threads,
    environment,
    fmt_ms,
    load_average,
    load_averages_line,
    print_table,
    round_robin,
    shape_str,
    write_json,
)

BLOCK_SIZE = 256
FULL_SHAPE = (5632, 512)
QUICK_SHAPE = (512, 128)
KINDS = ("signed", "unsigned")
KIND_DATA = {"signed": "normal", "unsigned": "squared normal"}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, int]:
    return _common.parse_shape(text, example="5632x512")


@contextlib.contextmanager
def captured_logs(names: Sequence[str]) -> Iterator[list[str]]:
    """Collect (instead of printing) what the named loggers emit, e.g. the warnings of an import."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname}: {record.getMessage()}")

    saved = []
    handler = Collect(level=logging.WARNING)
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield records
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# ------------------------------------------------------------------------------------------------
# installed size of a distribution
# ------------------------------------------------------------------------------------------------
def _disk_usage(path: Path) -> int:
    """Bytes on disk under ``path`` (like ``du``: allocated blocks, directories included)."""
    def usage(p: Path) -> int:
        st = p.lstat()
        return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size

    if path.is_symlink() or not path.is_dir():
        return usage(path)
    total = usage(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += usage(Path(root) / name)
    return total


def distribution_size(name: str) -> dict[str, Any]:
    """Installed size of distribution ``name``: ``du`` of its top-level entries in site-packages
    (package folders, modules, its .dist-info), in MiB, and its requirements (no extras)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return {"name": name, "installed": False}
    top: set[str] = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if parts and parts[0] not in ("..", "") and not parts[0].startswith("/"):
            top.add(parts[0])
    base = Path(dist.locate_file(""))
    entries = {t: _disk_usage(base / t) for t in sorted(top) if (base / t).exists()}
    requires = []
    for req in dist.requires or ():
        if re.search(r"\bextra\s*==", req):
            continue
        requires.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return {
        "name": name,
        "installed": True,
        "version": dist.version,
        "entries": sorted(entries),
        "size_mib": sum(entries.values()) / 2**20,
        "requires": requires,
    }


def dependency_report(dists: Sequence[str]) -> dict[str, Any]:
    """Sizes of ``dists`` and of their requirements other than torch (which coap-torch needs anyway)."""
    packages = [distribution_size(d) for d in dists]
    requirements = {}
    for pkg in packages:
        for req in pkg.get("requires", ()):
            key = req.lower().replace("_", "-")
            if key == "torch" or key in requirements or key in (d.lower() for d in dists):
                continue
            requirements[key] = distribution_size(req)
    return {
        "packages": packages,
        "size_mib": sum(p.get("size_mib", 0.0) for p in packages),
        "requirements_besides_torch": requirements,
        "requirements_size_mib": sum(r.get("size_mib", 0.0) for r in requirements.values()),
    }


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
@dataclass
class Backend:
    """A quantizer: ``quantize(x, kind)`` returns whatever ``dequantize(state, kind)`` reads back."""

    name: str
    description: str
    quantize: Callable[[Tensor, str], Any] | None = None
    dequantize: Callable[[Any, str], Tensor] | None = None
    kinds: tuple[str, ...] = KINDS
    version: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    dists: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    #: the 256-value code map used for ``kind`` (to check that each value got its nearest code)
    code_map: Callable[[str], Tensor] | None = None

    @property
    def available(self) -> bool:
        return self.error is None


def backend_ours() -> Backend:
    def quantize(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        return ours_q.quantize_blockwise(x, signed=kind == "signed", block_size=BLOCK_SIZE)

    def dequantize(state: tuple[Tensor, Tensor], kind: str) -> Tensor:
        return ours_q.dequantize_blockwise(*state, signed=kind == "signed", block_size=BLOCK_SIZE)

    source = Path(ours_q.__file__)
    return Backend(
        name="ours",
        description="coap_torch.functional.quantization.quantize_blockwise / dequantize_blockwise",
        quantize=quantize,
        dequantize=dequantize,
        code_map=lambda kind: ours_q.dynamic_code_map(kind == "signed"),
        version=_version("coap-torch"),
        notes=[f"pure torch, part of coap_torch: no extra dependency ({source.name}, {source.stat().st_size / 1024:.1f} KiB)"],
    )


def backend_ours_sqrt() -> Backend:
    """The second-moment storage of the 8-bit optimizers: sqrt(v) with the unsigned map."""

    def quantize(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        return ours_q.quantize_blockwise(x.sqrt(), signed=False, block_size=BLOCK_SIZE)

    def dequantize(state: tuple[Tensor, Tensor], kind: str) -> Tensor:
        return ours_q.dequantize_blockwise(*state, signed=False, block_size=BLOCK_SIZE).square_()

    return Backend(
        name="ours, sqrt-stored",
        description="quantize_blockwise(sqrt(v), signed=False); dequantize, then square (as CoapAdamW8bit stores v)",
        quantize=quantize,
        dequantize=dequantize,
        kinds=("unsigned",),
        version=_version("coap-torch"),
        notes=["the 8-bit optimizers' second-moment storage (unsigned data only)"],
    )


def backend_bitsandbytes() -> Backend:
    backend = Backend(
        name="bitsandbytes",
        description="bitsandbytes.functional.quantize_blockwise / dequantize_blockwise, blocksize=256",
        dists=("bitsandbytes",),
    )
    try:
        with captured_logs(["bitsandbytes"]) as logs:
            import bitsandbytes
            import bitsandbytes.functional as F
            from bitsandbytes import cextension
    except Exception as exc:  # ImportError, or a library that fails to load
        backend.error = f"not importable: {short_error(exc)}"
        return backend
    backend.version = getattr(bitsandbytes, "__version__", None)
    backend.notes += [f"import: {line}" for line in logs]
    lib = getattr(cextension, "lib", None)
    native = lib is not None and type(lib).__name__ != "ErrorHandlerMockBNBNativeLibrary"
    lib_name = Path(getattr(getattr(lib, "_lib", None), "_name", "") or "").name
    backend.extra["cpu_kernel"] = f"native {lib_name}" if native and lib_name else "pure-torch fallback"
    backend.notes.append(f"CPU kernel: {backend.extra['cpu_kernel']}")
    codes = {"signed": None, "unsigned": F.create_dynamic_map(signed=False)}  # None: its default (signed) map
    maps = {"signed": F.create_dynamic_map(signed=True), "unsigned": codes["unsigned"]}
    backend.code_map = lambda kind: maps[kind]

    def quantize(x: Tensor, kind: str) -> Any:
        return F.quantize_blockwise(x, code=codes[kind], blocksize=BLOCK_SIZE)

    def dequantize(state: Any, kind: str) -> Tensor:
        q, quant_state = state
        return F.dequantize_blockwise(q, quant_state)

    backend.quantize, backend.dequantize = quantize, dequantize
    backend.notes.append("maps: default create_dynamic_map(signed=True) for signed data, "
                         "create_dynamic_map(signed=False) (its optimizers' second-state map) for unsigned")
    return backend


def _import_torchao(backend: Backend) -> Any:
    with captured_logs(["torchao", "torch"]) as logs:
        import torchao
        from torchao.optim import quant_utils, subclass_8bit
    backend.version = getattr(torchao, "__version__", None)
    failed = [line for line in logs if "Failed to load" in line]
    if failed:
        names = sorted({Path(m.group(1)).name for line in failed if (m := re.search(r"Failed to load (\S+?):", line))})
        backend.notes.append(
            f"import: {len(failed)} extension libraries not loadable with this CPU-only torch "
            f"({', '.join(names)}); not used by the 8-bit optimizer state"
        )
    return torchao, quant_utils, subclass_8bit


def backend_torchao_eager() -> Backend:
    backend = Backend(
        name="torchao (eager)",
        description="torchao.optim.subclass_8bit.OptimState8bit: zeros(shape, signed, block_size=256), "
        "copy_(x) quantizes, dequantize()",
        dists=("torchao",),
    )
    try:
        _, _, subclass_8bit = _import_torchao(backend)
        OptimState8bit = subclass_8bit.OptimState8bit
    except Exception as exc:
        backend.error = f"not importable: {short_error(exc)}"
        return backend
    backend.code_map = lambda kind: torch.tensor(
        subclass_8bit.get_qmap_signed() if kind == "signed" else subclass_8bit.get_qmap_unsigned(), dtype=torch.float32
    )

    cache: dict[tuple[str, tuple[int, ...]], Any] = {}

    def quantize(x: Tensor, kind: str) -> Any:
        # As in torchao's optimizers: the state tensor persists, and copy_ re-quantizes into it.
        key = (kind, tuple(x.shape))
        state = cache.get(key)
        if state is None:
            state = cache[key] = OptimState8bit.zeros(x.shape, signed=kind == "signed", block_size=BLOCK_SIZE,
                                                      device=x.device)
        state.copy_(x)
        return state

    def dequantize(state: Any, kind: str) -> Tensor:
        return state.dequantize()

    backend.quantize, backend.dequantize = quantize, dequantize
    backend.notes.append("quantize = copy_(x) into a persistent OptimState8bit (the subclass's copy_ quantizes, "
                         "as in torchao's optimizer step)")
    return backend


def backend_torchao_compiled() -> Backend:
    backend = Backend(
        name="torchao (compiled)",
        description="torch.compile(scale_tensor + quantize_8bit_with_qmap), torch.compile(dequant_with_qmap) "
        "from torchao.optim.quant_utils (what torchao's compiled optimizer step runs)",
        dists=("torchao",),
    )
    try:
        _, quant_utils, subclass_8bit = _import_torchao(backend)
    except Exception as exc:
        backend.error = f"not importable: {short_error(exc)}"
        return backend
    qmaps = {
        "signed": torch.tensor(subclass_8bit.get_qmap_signed(), dtype=torch.float32),
        "unsigned": torch.tensor(subclass_8bit.get_qmap_unsigned(), dtype=torch.float32),
    }

    def _quantize(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
        scaled, scale = quant_utils.scale_tensor(x, BLOCK_SIZE)
        return quant_utils.quantize_8bit_with_qmap(scaled, qmap), scale

    backend.code_map = lambda kind: qmaps[kind]
    compiled_q = torch.compile(_quantize, fullgraph=True, dynamic=False)
    compiled_dq = torch.compile(quant_utils.dequant_with_qmap, fullgraph=True, dynamic=False)

    def quantize(x: Tensor, kind: str) -> Any:
        return compiled_q(x, qmaps[kind])

    def dequantize(state: Any, kind: str) -> Tensor:
        codes, scale = state
        return compiled_dq(codes, qmaps[kind], scale)

    backend.quantize, backend.dequantize = quantize, dequantize
    return backend


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def make_data(shape: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "signed": torch.randn(shape, generator=generator),  # first moments: either sign
        "unsigned": torch.randn(shape, generator=generator).square_(),  # second moments: >= 0
    }


def nearest_code_error(x64: Tensor, block_absmax: Tensor, code_map: Tensor) -> Tensor:
    """The smallest error a value can have with this code map: ``min_j |map_j * a_b - x|``."""
    nb = block_absmax.numel()
    pad = nb * BLOCK_SIZE - x64.numel()
    scale = block_absmax.repeat_interleave(BLOCK_SIZE)[: x64.numel()] if pad else block_absmax.repeat_interleave(BLOCK_SIZE)
    values = code_map.double().sort().values
    normalized = x64 / scale.clamp_min(torch.finfo(torch.float64).tiny)
    upper = torch.searchsorted(values, normalized).clamp(max=values.numel() - 1)
    lower = (upper - 1).clamp(min=0)
    best = torch.minimum((values[upper] * scale - x64).abs(), (values[lower] * scale - x64).abs())
    return best


def roundtrip_errors(x: Tensor, y: Tensor, code_map: Tensor | None = None) -> dict[str, float]:
    """Round-trip error of ``y = deq(q(x))`` (computed in float64); with the backend's code map,
    also the fraction of values that did not get their nearest code (float32 rounding allowed)."""
    x64, y64 = x.double().reshape(-1), y.double().reshape(-1)
    err = (y64 - x64).abs()
    absmax = x64.abs().max()
    n = x64.numel()
    nb = math.ceil(n / BLOCK_SIZE)
    pad = nb * BLOCK_SIZE - n
    block_err = torch.nn.functional.pad(err, (0, pad)).view(nb, BLOCK_SIZE).amax(1)
    block_absmax = torch.nn.functional.pad(x64.abs(), (0, pad)).view(nb, BLOCK_SIZE).amax(1)
    nonzero = x64 != 0
    not_nearest = None
    if code_map is not None:
        best = nearest_code_error(x64, block_absmax, code_map)
        scale = block_absmax.repeat_interleave(BLOCK_SIZE)[:n]
        # a relative 1e-6 of the block's absmax covers float32 rounding of the scaling and of ties
        not_nearest = (err > best + 1e-6 * scale).double().mean().item()
    return {
        "not_nearest_code_fraction": not_nearest,
        "max_abs_err_over_absmax": (err.max() / absmax).item(),
        "max_block_err_over_block_absmax": (block_err / block_absmax.clamp_min(torch.finfo(torch.float64).tiny)).max().item(),
        "mean_rel_err": (err[nonzero] / x64[nonzero].abs()).mean().item(),
        "rel_rms_err": (torch.linalg.vector_norm(y64 - x64) / torch.linalg.vector_norm(x64)).item(),
        "zeroed_fraction": ((y64 == 0) & nonzero).double().mean().item() if nonzero.any() else 0.0,
        "max_abs_err": err.max().item(),
        "absmax": absmax.item(),
    }


def first_call(backend: Backend, data: dict[str, Tensor]) -> dict[str, Any]:
    """Run each kind once (compiling where needed) and return the states; a failure marks the backend."""
    states = {}
    for kind in backend.kinds:
        started = time.perf_counter()
        try:
            state = backend.quantize(data[kind], kind)
            out = backend.dequantize(state, kind)
            if tuple(out.shape) != tuple(data[kind].shape):
                raise RuntimeError(f"dequantized shape {tuple(out.shape)} != {tuple(data[kind].shape)}")
        except Exception as exc:
            backend.error = f"failed on {data[kind].device.type} ({kind} data): {short_error(exc)}"
            return {}
        backend.extra.setdefault("first_call_s", {})[kind] = time.perf_counter() - started
        states[kind] = state
    return states


def time_backends(
    backends: list[Backend], data: dict[str, Tensor], states: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[tuple[str, str], dict[str, Timing]]:
    """Round-robin timing: every round takes one quantize and one dequantize sample of every
    (backend, kind), in an order that rotates from round to round."""
    cases = [(b, kind) for kind in KINDS for b in backends if kind in b.kinds]
    timings = {(b.name, kind): {"quantize": Timing(), "dequantize": Timing(), "roundtrip": Timing()} for b, kind in cases}
    for b, kind in cases:
        for _ in range(args.warmup):
            b.dequantize(b.quantize(data[kind], kind), kind)
    for _, order in round_robin(cases, args.repeats):
        for b, kind in order:
            x, state = data[kind], states[b.name][kind]
            start = time.perf_counter()
            b.quantize(x, kind)
            mid = time.perf_counter()
            b.dequantize(state, kind)
            end = time.perf_counter()
            t = timings[(b.name, kind)]
            t["quantize"].samples_ms.append((mid - start) * 1e3)
            t["dequantize"].samples_ms.append((end - mid) * 1e3)
            t["roundtrip"].samples_ms.append((end - start) * 1e3)
    return timings


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare 8-bit block-wise quantization backends (ours, bitsandbytes, torchao) for optimizer state.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shape {shape_str(QUICK_SHAPE)}, 3 repeats, 1 warm-up, no torch.compile")
    parser.add_argument("--shape", type=parse_shape, default=None,
                        help=f"shape of the moment tensor (default: {shape_str(FULL_SHAPE)})")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per operation (default: 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed round trips per operation (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: all CPUs available to this process)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd torchao backend")
    parser.add_argument("--json", type=Path, default=Path("results/bench_quantization.json"),
                        help="where to write the results (default: results/bench_quantization.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.shape = args.shape or QUICK_SHAPE
        args.repeats = args.repeats or 3
        args.warmup = 1 if args.warmup is None else args.warmup
        args.no_compile = True
    args.shape = args.shape or FULL_SHAPE
    args.repeats = args.repeats or 15
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.threads is None:
        args.threads = available_threads()
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_before = load_average()
    shape = args.shape
    numel = shape[0] * shape[1]
    print(
        f"bench_quantization: torch {torch.__version__} on cpu, {torch.get_num_threads()} threads, "
        f"{shape_str(shape)} float32 ({numel:,} values), blocks of {BLOCK_SIZE}, "
        f"median of {args.repeats} (warm-up {args.warmup}), backends timed round-robin"
    )
    if load_before is not None:
        print(f"load average (1 min) before: {load_before:.2f} on {os.cpu_count()} CPUs")

    factories = [backend_ours, backend_ours_sqrt, backend_bitsandbytes, backend_torchao_eager]
    if not args.no_compile:
        factories.append(backend_torchao_compiled)
    backends = []
    for factory in factories:
        try:
            backends.append(factory())
        except Exception as exc:  # a factory must never stop the comparison
            backends.append(Backend(name=factory.__name__.removeprefix("backend_"), description="", error=short_error(exc)))

    generator = torch.Generator().manual_seed(args.seed)
    data = make_data(shape, generator)
    states: dict[str, dict[str, Any]] = {}
    for b in backends:
        if b.available:
            print(f"  first call: {b.name} ...", flush=True)
            states[b.name] = first_call(b, data)
    usable = [b for b in backends if b.available]
    for b in backends:
        if not b.available:
            print(f"  skipped: {b.name}: {b.error}")
    if not any(b.name == "ours" for b in usable):
        raise SystemExit("our codec failed: nothing to compare against")

    print("  timing ...", flush=True)
    timings = time_backends(usable, data, states, args)
    errors = {
        (b.name, kind): roundtrip_errors(
            data[kind], b.dequantize(states[b.name][kind], kind), b.code_map(kind) if b.code_map else None
        )
        for b in usable
        for kind in b.kinds
    }

    results_backends: dict[str, Any] = {}
    for b in backends:
        entry: dict[str, Any] = {
            "available": b.available,
            "error": b.error,
            "description": b.description,
            "version": b.version,
            "notes": b.notes,
            **b.extra,
        }
        if b.dists:
            entry["dependency"] = dependency_report(b.dists)
        if b.available:
            entry["timing"], entry["errors"] = {}, {}
            for kind in b.kinds:
                t, ref = timings[(b.name, kind)], timings[("ours", kind)]
                entry["timing"][kind] = {
                    "quantize_ms": t["quantize"].median,
                    "dequantize_ms": t["dequantize"].median,
                    "roundtrip_ms": t["roundtrip"].median,
                    "roundtrip_over_ours": t["roundtrip"].median / ref["roundtrip"].median,
                    "quantize_over_ours": t["quantize"].median / ref["quantize"].median,
                    "dequantize_over_ours": t["dequantize"].median / ref["dequantize"].median,
                    "roundtrip_over_ours_from_min": t["roundtrip"].min / ref["roundtrip"].min,
                    "samples": {k: v.to_json() for k, v in t.items()},
                }
                entry["errors"][kind] = errors[(b.name, kind)]
        results_backends[b.name] = entry

    print_results(results_backends, args)
    elapsed = time.perf_counter() - started
    load_after = load_average()
    meta = {
        **environment(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "shape": list(shape),
        "numel": numel,
        "dtype": "float32",
        "block_size": BLOCK_SIZE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "quick": args.quick,
        "statistic": "median; backends timed round-robin (rotating order), ratios against ours in the same run",
        "data": {"signed": "torch.randn(shape)", "unsigned": "torch.randn(shape) ** 2"},
        "size_unit": "MiB of disk usage (du) of the site-packages entries of each distribution",
        "load_average_1min_before": load_before,
        "load_average_1min_after": load_after,
        "elapsed_s": elapsed,
    }
    print("\n" + load_averages_line(load_before, load_after))
    write_json(args.json, {"meta": meta, "backends": results_backends}, elapsed)
    return 0


def print_results(backends: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for kind in KINDS:
        for name, b in backends.items():
            if not b["available"] or kind not in b["timing"]:
                continue
            t = b["timing"][kind]
            rows.append([
                name, f"{kind} ({KIND_DATA[kind]})", fmt_ms(t["quantize_ms"]), fmt_ms(t["dequantize_ms"]),
                fmt_ms(t["roundtrip_ms"]), f"{t['roundtrip_over_ours']:.3f}x",
                f"{t['roundtrip_over_ours_from_min']:.3f}x",
            ])
    print_table(
        f"1. Time of quantize + dequantize, {shape_str(args.shape)} float32, ms (median of {args.repeats})",
        ["backend", "data", "quantize", "dequantize", "q + dq", "q+dq / ours", "(from fastest)"],
        rows,
        left=2,
    )

    rows = []
    for kind in KINDS:
        for name, b in backends.items():
            if not b["available"] or kind not in b["errors"]:
                continue
            e = b["errors"][kind]
            rows.append([
                name, f"{kind} ({KIND_DATA[kind]})", f"{e['max_abs_err_over_absmax']:.3e}",
                f"{e['max_block_err_over_block_absmax']:.3e}", f"{e['mean_rel_err']:.3e}", f"{e['rel_rms_err']:.3e}",
                f"{e['zeroed_fraction']:.2e}",
                f"{e['not_nearest_code_fraction']:.2e}" if e["not_nearest_code_fraction"] is not None else "-",
            ])
    print_table(
        "2. Round-trip error deq(q(x)) vs x",
        ["backend", "data", "max|err|/absmax", "max block err/block absmax", "mean rel err", "rel RMS err",
         "nonzero -> 0", "not nearest code"],
        rows,
        left=2,
    )
    print("  max|err|/absmax: over the whole tensor; block: the largest error in a block of 256 over that "
          "block's absmax; mean rel err: mean |err|/|x| over x != 0; rel RMS err: ||err|| / ||x||;")
    print("  nonzero -> 0: fraction of x != 0 decoded as 0; not nearest code: fraction of values whose error exceeds "
          "that of the nearest value of the backend's own code map (beyond 1e-6 of the block's absmax)")

    rows = []
    for name, b in backends.items():
        dep = b.get("dependency")
        if dep is None:
            size, pkgs, reqs = "0 (none)", "coap-torch", "-"
        else:
            pkgs = ", ".join(f"{p['name']} {p.get('version', '(not installed)')}" for p in dep["packages"])
            size = f"{dep['size_mib']:.1f}" if any(p.get("installed") for p in dep["packages"]) else "-"
            req = dep["requirements_besides_torch"]
            reqs = ", ".join(
                f"{k} ({v['size_mib']:.1f} MiB)" if v.get("installed") else f"{k} (not installed)" for k, v in req.items()
            ) or "none"
        rows.append([name, "yes" if b["available"] else "no", pkgs, size, reqs])
    print_table(
        "3. Dependency: installed size (du of the site-packages entries), MiB",
        ["backend", "usable", "package", "MiB", "requires besides torch"],
        rows,
        left=3,
    )
    for name, b in backends.items():
        for note in b["notes"]:
            print(f"  {name}: {note}")
        if b.get("first_call_s"):
            first = ", ".join(f"{k} {v:.2f} s" for k, v in b["first_call_s"].items())
            compiled = ", compilation included (less on a re-run: torch.compile caches on disk)" if "compiled" in name else ""
            print(f"  {name}: first call (quantize + dequantize{compiled}): {first}")
        if not b["available"]:
            print(f"  {name}: skipped: {b['error']}")



if __name__ == "__main__":
    sys.exit(main())
