"""The per-rank table of a distributed run: each rank's optimizer state, the optimizer's own collectives and
the engine's (:func:`format_rank_table`)."""

from __future__ import annotations

import textwrap
from typing import Any

from ..report import format_bytes, markdown_table
from .collectives import ENGINE_BYTES_METHOD
from .runs import ENGINE_ESTIMATE_METHOD

__all__ = ["format_rank_table"]

_RANK_HEADER = [
    "optimizer",
    "rank",
    "state",
    "opt calls/step",
    "opt comm/step",
    "opt comm steady",
    "opt comm refresh",
    "engine/step",
    "engine est.",
    "opt / engine",
]


def _maybe_bytes(value: float | None) -> str:
    return "n/a" if value is None else format_bytes(round(value))


def _ratio(share: float | None, engine: float | None) -> str:
    return "n/a" if share is None or not engine else f"{share / engine:.2%}"


def _rank_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result.get("ranks", []):
        share, calls = r["optimizer_comm_bytes_per_step"], r.get("optimizer_comm_calls_per_step")
        rows.append(
            [
                result["name"],
                str(r["rank"]),
                format_bytes(r["state_bytes"]),
                "n/a" if calls is None else f"{calls:.2f}",
                _maybe_bytes(share),
                _maybe_bytes(r["optimizer_comm_steady_step_bytes"]),
                _maybe_bytes(r.get("optimizer_comm_refresh_step_bytes")),
                _maybe_bytes(r["engine_bytes_per_step"]),
                _maybe_bytes(r.get("engine_estimate_bytes_per_step")),
                _ratio(share, r["engine_bytes_per_step"]),
            ]
        )
    return rows


def format_rank_table(run: dict[str, Any], unit: str) -> list[str]:
    """The lines of the per-rank table of ``run`` (whose ``config`` names the engine, world size, backend
    and ``batch_per_rank``, counted in ``unit``: "sequences", "images"), with its notes."""
    config = run["config"]
    rows = [row for result in run["results"] for row in _rank_rows(result)]
    title = (
        f"per rank: {config['engine']} on {config['world_size']} ranks ({config['backend']}), "
        f"{config['batch_per_rank']} {unit} per rank and step"
    )
    notes = (
        "state: the rank's optimizer-state bytes (DTensor state counted by its local shard); opt calls/step and "
        "opt comm/step: the optimizer's own collectives (optimizer.communication), calls and payload bytes per "
        "step amortised over the run, n/a for optimizers without their own collectives; opt comm steady: the "
        "largest step without a projection refresh; opt comm refresh: the mean step with one; engine/step: what "
        "the engine moved in one step (DDP: gradient all-reduce and buffer broadcast; FSDP2: parameter "
        f"all-gathers and gradient reduce-scatters), {ENGINE_BYTES_METHOD}; engine est.: estimated "
        f"{ENGINE_ESTIMATE_METHOD}; opt / engine: opt comm/step over engine/step. Payload = the full tensor of "
        "each collective (what a rank sends is (W-1)/W of it, twice that for a ring all-reduce)."
    )
    return [title, "", *markdown_table(_RANK_HEADER, rows), "", *textwrap.wrap(notes, width=120)]
