"""``coap-bench memory``: the optimizer-state memory of the paper's models, next to the paper's figures."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ..memory import MODELS, format_memory_report, run_memory
from ..outputs import write_json_reported

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    memory = commands.add_parser(
        "memory",
        help="optimizer-state memory of the paper's models (built on meta, nothing trained) next to the paper's figures",
        description=(
            "Build the COAP paper's models on the meta device from their published configurations (nothing is "
            "downloaded or allocated) and print the optimizer-state memory of every optimizer at the paper's ranks, "
            "next to the figures the paper prints, with the reasons where they differ."
        ),
    )
    memory.add_argument("--models", type=_model_list, default=list(MODELS), metavar="A,B",
                        help=f"comma-separated models, from: {', '.join(MODELS)} (default: all)")  # fmt: skip
    memory.add_argument("--json", metavar="PATH", help="write the rows, notes and layer tables to this JSON file")


def _model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"known: {', '.join(MODELS)}")  # fmt: skip
    return names


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the report, write the JSON it was asked for; returns the exit status."""
    started = time.perf_counter()
    result = run_memory(args.models)
    result["config"].update(argv=["coap-bench", *argv], total_seconds=time.perf_counter() - started)
    print(format_memory_report(result), flush=True)
    if args.json and not write_json_reported(result, args.json):
        return 1
    return 0
