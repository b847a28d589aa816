"""The distributed run as tables: the llama table, then per rank its state and communication; and the
saving of per-layer updates."""

from __future__ import annotations

import textwrap
from typing import Any

from ..llama import format_llama_table
from ..report import format_bytes, markdown_table
from .collectives import ENGINE_BYTES_METHOD

__all__ = ["format_distributed_table", "format_per_layer_saving"]

_RANK_HEADER = ["optimizer", "rank", "state", "opt comm/step", "opt comm steady", "engine/step", "opt / engine"]


def _maybe_bytes(value: float | None) -> str:
    return "n/a" if value is None else format_bytes(round(value))


def _rank_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result.get("ranks", []):
        share = r["optimizer_comm_bytes_per_step"]
        ratio = (
            "n/a" if share is None or not r["engine_bytes_per_step"] else f"{share / r['engine_bytes_per_step']:.2%}"
        )
        rows.append(
            [
                result["name"],
                str(r["rank"]),
                format_bytes(r["state_bytes"]),
                _maybe_bytes(share),
                _maybe_bytes(r["optimizer_comm_steady_step_bytes"]),
                _maybe_bytes(r["engine_bytes_per_step"]),
                ratio,
            ]
        )
    return rows


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
    rows = [row for result in run["results"] for row in _rank_rows(result)]
    title = (
        f"per rank: {config['engine']} on {config['world_size']} ranks ({config['backend']}), "
        f"{config['batch_per_rank']} sequences per rank and step"
    )
    text += ["", title, ""]
    text += markdown_table(_RANK_HEADER, rows)
    notes = (
        "state: the rank's optimizer-state bytes (DTensor state counted by its local shard); opt comm/step: the "
        "optimizer's own collectives (optimizer.communication), payload bytes per step amortised over the run, n/a "
        "for optimizers without their own collectives; opt comm steady: the largest step without a projection "
        "refresh; engine/step: what the engine moved in one step (DDP: gradient all-reduce and buffer broadcast; "
        "FSDP2: parameter all-gathers and gradient reduce-scatters), "
        f"{ENGINE_BYTES_METHOD}. Payload = the full tensor of each collective (what a rank sends is (W-1)/W of it, "
        "twice that for a ring all-reduce)."
    )
    text += ["", *textwrap.wrap(notes, width=120)]
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
