"""The distributed run as tables: the llama table, then per rank its state and communication; and the
saving of per-layer updates."""

from __future__ import annotations

from typing import Any

from ..distributed import format_rank_table
from ..llama import format_llama_table
from ..report import format_bytes

__all__ = ["format_distributed_table", "format_per_layer_saving"]


def format_distributed_table(run: dict[str, Any]) -> str:
    """:func:`~coap_bench.llama.format_llama_table`, then the per-rank state and communication table."""
    config = run["config"]
    text = [format_llama_table(run, notes=True)]
    per_layer = [r["name"] for r in run["results"] if r.get("per_layer")]
    if per_layer:
        remark = (
            f"per-layer updates: {', '.join(per_layer)} updated each parameter inside backward, so their "
            "step ms is the empty optimizer.step() and iter ms includes the updates"
        )
        text += ["", remark]
    if "per_layer_saving" in run:
        text += ["", format_per_layer_saving(run["per_layer_saving"])]
    if config.get("engine") is None:
        return "\n".join(text)
    text += ["", *format_rank_table(run, "sequences")]
    return "\n".join(text)


def format_per_layer_saving(saving: dict[str, Any]) -> str:
    """One line per optimizer: peak allocated tensor bytes of training steps without and with per-layer updates."""
    lines = [f"per-layer updates ({saving['kind']}, {saving['steps']} steps after a warm-up step):"]
    for row in saving["results"]:
        lines.append(
            f"  {row['name']}, batch {row['batch_size']} x {saving['seq_len']}: peak "
            f"{format_bytes(row['regular_peak_bytes'])} -> "
            f"{format_bytes(row['per_layer_peak_bytes'])} with per-layer updates (saves "
            f"{format_bytes(row['saving_bytes'])}; the gradients are {format_bytes(row['gradient_bytes'])}); "
            f"largest loss difference {row['max_loss_difference']:.2e}"
        )
    return "\n".join(lines)
