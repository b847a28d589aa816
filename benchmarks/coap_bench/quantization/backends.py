"""The quantizers compared by ``coap-bench quantization``: ours (plain and as the 8-bit optimizers store
second moments), bitsandbytes', and torchao's (eager and compiled). A peer is imported quietly: what it
prints becomes a note of its backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import coap_torch.functional.quantization as ours_q

from .._quiet import import_notes, quiet_import
from ..environment import package_version

__all__ = [
    "BLOCK_SIZE",
    "KINDS",
    "Backend",
    "backend_bitsandbytes",
    "backend_ours",
    "backend_ours_sqrt",
    "backend_torchao_compiled",
    "backend_torchao_eager",
    "short_error",
]

BLOCK_SIZE = 256
FULL_SHAPE = (5632, 512)
QUICK_SHAPE = (512, 128)
KINDS = ("signed", "unsigned")


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


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
        version=package_version("coap-torch"),
        notes=[
            f"pure torch, part of coap_torch: no extra dependency ({source.name}, {source.stat().st_size / 1024:.1f} KiB)"
        ],
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
        version=package_version("coap-torch"),
        notes=["the 8-bit optimizers' second-moment storage (unsigned data only)"],
    )


def backend_bitsandbytes() -> Backend:
    backend = Backend(
        name="bitsandbytes",
        description="bitsandbytes.functional.quantize_blockwise / dequantize_blockwise, blocksize=256",
        dists=("bitsandbytes",),
    )
    noted = len(import_notes())
    try:
        bitsandbytes = quiet_import("bitsandbytes")
        F = quiet_import("bitsandbytes.functional")
        cextension = quiet_import("bitsandbytes.cextension")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library that fails to load
        backend.error = f"not importable: {short_error(exc)}"
        return backend
    backend.version = getattr(bitsandbytes, "__version__", None)
    backend.notes += [f"import: {note}" for note in import_notes()[noted:]]
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
    backend.notes.append(
        "maps: default create_dynamic_map(signed=True) for signed data, "
        "create_dynamic_map(signed=False) (its optimizers' second-state map) for unsigned"
    )
    return backend


def _import_torchao(backend: Backend) -> Any:
    noted = len(import_notes())
    torchao = quiet_import("torchao")
    quant_utils = quiet_import("torchao.optim.quant_utils")
    subclass_8bit = quiet_import("torchao.optim.subclass_8bit")
    backend.version = getattr(torchao, "__version__", None)
    backend.notes += [f"import: {note}" for note in import_notes()[noted:]]
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
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library that fails to load
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
            state = cache[key] = OptimState8bit.zeros(
                x.shape, signed=kind == "signed", block_size=BLOCK_SIZE, device=x.device
            )
        state.copy_(x)
        return state

    def dequantize(state: Any, kind: str) -> Tensor:
        return state.dequantize()

    backend.quantize, backend.dequantize = quantize, dequantize
    backend.notes.append(
        "quantize = copy_(x) into a persistent OptimState8bit (the subclass's copy_ quantizes, "
        "as in torchao's optimizer step)"
    )
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
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library that fails to load
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
