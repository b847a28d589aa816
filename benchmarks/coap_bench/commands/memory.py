"""``coap-bench memory``: the optimizer-state memory of the paper's models, next to the paper's figures;
with ``--fit``, the peak of a LLaMA training step per optimizer and precision, and the GPU sizes it fits."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ..memory import MODELS, format_memory_report, run_memory
from ..outputs import write_json_reported

__all__ = ["add_parser", "run"]

#: The options of ``--fit`` alone, with their defaults (None: the preset's).
_FIT_OPTIONS = {"preset": "7b", "batch_size": 1, "seq_len": None, "checkpointing": False, "optimizers": None}


def add_parser(commands: argparse._SubParsersAction) -> None:
    memory = commands.add_parser(
        "memory",
        help="optimizer-state memory of the paper's models (built on meta, nothing trained) next to the paper's "
        "figures; --fit: which optimizers fit LLaMA-7B training in 16, 24, 40 and 80 GiB",
        description=(
            "Build the COAP paper's models on the meta device from their published configurations (nothing is "
            "downloaded or allocated) and print the optimizer-state memory of every optimizer at the paper's ranks, "
            "next to the figures the paper prints, with the reasons where they differ. With --fit, print the peak "
            "of a LLaMA training step (weights, gradients, state, activations, update temporaries) for each "
            "optimizer and state precision, with and without per-layer updates, and whether it fits in 16, 24, 40 "
            "and 80 GiB."
        ),
    )
    memory.add_argument("--models", type=_model_list, default=None, metavar="A,B",
                        help=f"comma-separated models, from: {', '.join(MODELS)} (default: all)")  # fmt: skip
    memory.add_argument("--json", metavar="PATH",
                        help="write the rows (and the state table's notes and layer tables) to this JSON file")  # fmt: skip
    fit = memory.add_argument_group("--fit: the peak of a training step")
    fit.add_argument("--fit", action="store_true",
                     help="print the peak memory of a LLaMA training step per optimizer and precision and the "
                          "budgets it fits in, instead of the state table")  # fmt: skip
    fit.add_argument("--preset", default=None, metavar="NAME",
                     help="the LLaMA preset of --fit (default: 7b; any of coap-bench llama's presets)")  # fmt: skip
    fit.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help="sequences per step for --fit (default: 1; a larger global batch by gradient accumulation)")  # fmt: skip
    fit.add_argument("--seq-len", type=int, default=None, metavar="N",
                     help="tokens per sequence for --fit (default: the preset's, 256 for the papers' sizes)")  # fmt: skip
    fit.add_argument("--optimizers", type=_fit_optimizers, default=None, metavar="A,B",
                     help="the rows of --fit, from: adamw, adamw8bit, coap_adamw, coap_adamw8bit, coap_adafactor, "
                          "coap_adafactor8bit (default: all)")  # fmt: skip
    fit.add_argument("--checkpointing", action="store_true", default=None,
                     help="--fit with activation checkpointing of every decoder layer (default: none)")  # fmt: skip


def _model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"known: {', '.join(MODELS)}")  # fmt: skip
    return names


def _fit_optimizers(text: str) -> tuple[str, ...]:
    from ..memory_fit import FIT_OPTIMIZERS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FIT_OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"known: {', '.join(FIT_OPTIMIZERS)}")  # fmt: skip
    return names


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the report, write the JSON it was asked for; returns the exit status."""
    started = time.perf_counter()
    given = [f"--{name.replace('_', '-')}" for name in _FIT_OPTIONS if getattr(args, name) is not None]
    if args.fit:
        if args.models is not None:
            raise ValueError("--models is the state table's; --fit estimates one LLaMA preset (--preset)")
        from ..memory_fit import format_fit_report, run_fit

        options = {name: default if getattr(args, name) is None else getattr(args, name)
                   for name, default in _FIT_OPTIONS.items()}  # fmt: skip
        result = run_fit(**{name: value for name, value in options.items() if value is not None})
        report = format_fit_report
    else:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --fit")
        result = run_memory(args.models or list(MODELS))
        report = format_memory_report
    result["config"].update(argv=["coap-bench", *argv], total_seconds=time.perf_counter() - started)
    print(report(result), flush=True)
    if args.json and not write_json_reported(result, args.json):
        return 1
    return 0
