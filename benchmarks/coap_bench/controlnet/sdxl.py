"""``coap-bench controlnet --preset sdxl``: the memory of the paper's ControlNet-SDXL, from a build on ``meta``.

The model is ``ControlNetModel.from_unet`` of SDXL's UNet config (``memory.py``'s ``controlnet-sdxl`` study,
1.25B parameters, nothing downloaded). Each optimizer's state is
:func:`~coap_bench.state_layouts.estimate_state_bytes` of its real configuration at the paper's ControlNet
row (rank ratio 2; COAP with ``P`` on the paper's side and 8-bit blocks of the release's size, as ``coap-bench
memory``), next to the paper's figure where it prints one. Beside it: float32 weights and gradients, what a
training step holds besides the state and the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..memory import MODELS, run_memory
from .presets import DEFAULT_CONTROLNET_OPTIMIZERS

__all__ = ["format_sdxl_memory", "sdxl_memory"]

_STUDY = "controlnet-sdxl"


def sdxl_memory(optimizers: Sequence[str] = DEFAULT_CONTROLNET_OPTIMIZERS) -> dict[str, Any]:
    """The state of each of ``optimizers`` on ControlNet-SDXL at rank ratio 2 (the paper's rows at other ratios
    too), with the paper's figures, notes and the model's weight bytes; plain data."""
    run = run_memory((_STUDY,))
    wanted = set(optimizers)
    rows = [row for row in run["rows"] if row["optimizer"] in wanted or row["optimizer"] == "-"]
    parameters = run["models"].get(_STUDY, {}).get("parameters")
    adamw = next((row for row in rows if row["optimizer"] == "adamw" and row.get("bytes")), None)
    for row in rows:
        if adamw is not None and row.get("bytes"):
            row["ratio_to_adamw"] = row["bytes"] / adamw["bytes"]
    notes = {name: text for name, text in run["notes"].items() if any(name in row["notes"] for row in rows)}
    return {
        "config": {"preset": "sdxl", "optimizers": list(optimizers), **run["config"]},
        "model": {
            "title": MODELS[_STUDY].title,
            "parameters": parameters,
            "weight_bytes": 4 * parameters if parameters else None,
        },
        "rows": rows,
        "notes": notes,
        "import_notes": run["import_notes"],
        "results": [],
    }


def format_sdxl_memory(run: dict[str, Any]) -> str:
    """The table of :func:`sdxl_memory`: state per optimizer (GiB), its ratio to AdamW, the paper's figure."""
    model = run["model"]
    gib = 2**30
    lines = [
        (
            f"controlnet sdxl: {model['title']}, {model['parameters']:,} trainable parameters, built on meta "
            f"(nothing downloaded); float32 weights {model['weight_bytes'] / gib:.2f} GiB and gradients "
            f"{model['weight_bytes'] / gib:.2f} GiB besides the optimizer state below."
        ),
        "",
        "| optimizer | setting | state | vs AdamW | paper | ours / paper | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    order = list(run["notes"])
    for row in run["rows"]:
        if row.get("error"):
            lines.append(f"| {row['optimizer']} | {row['setting']} | - | - | - | - | {row['error']} |")
            continue
        paper = f"{row['paper']:g} GiB" if row.get("paper") is not None else "-"
        ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else "-"
        refs = " ".join(f"[{order.index(name) + 1}]" for name in row["notes"] if name in order)
        lines.append(
            f"| {row['optimizer']} | {row['setting']} | {row['ours']:.2f} GiB | {row.get('ratio_to_adamw', 0):.3f} | "
            f"{paper} | {ratio} | {refs} |"
        )
    lines += [
        "",
        (
            "paper: supplementary Table 1's ControlNet-SDXL row (GB = GiB). COAP rows: P on each matrix's smaller "
            f"side, 8-bit blocks of {run['config']['coap_8bit_block_size']} values, as the paper's release; rank "
            "ratio 2 as the recipe of this job (T_u 8 and lambda 10 change no byte)."
        ),
    ]
    lines += [f"[{i}] {run['notes'][name]}" for i, name in enumerate(order, 1)]
    lines += [
        "",
        (
            "Training this preset needs the SDXL weights, its VAE and text encoders, and a GPU: not built into this "
            "job yet (the small preset trains the same pipeline end to end)."
        ),
    ]
    return "\n".join(lines)
