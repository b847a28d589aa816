"""``coap-bench``: the command line of the benchmarks.

``coap-bench`` alone runs ``coap-bench digits`` with its defaults; ``coap-bench --steps 100``
is ``coap-bench digits --steps 100``.

Output paths (``--json``, ``--plots``, ``--checkpoint-dir``) are checked before anything is loaded
or trained. The exit status is 0 when the comparison finished, 1 when it finished but is not
usable (an optimizer ended with a non-finite loss, every optimizer failed, or a result file could
not be written: the table and the files are still written), 2 for a usage error (a bad option, an
output path that cannot be written, a checkpoint of another configuration or one that cannot be
loaded), each said in one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import TypeVar

from ._deps import MissingExtraError
from .optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, parse_optimizer_names
from .outputs import check_output_paths

T = TypeVar("T")

__all__ = ["build_parser", "main"]

_COMMANDS = ("digits", "llama", "memory", "ddpm")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _float_at_least(minimum: float, *, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # inf and nan pass no comparison test below, and train to nan
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    return parse


def _optimizer_list(text: str) -> list[str]:
    try:
        return parse_optimizer_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-bench",
        description="Compare COAP optimizers with their dense counterparts on real data.",
        epilog=("Without a command, runs `digits` (any options given are passed to it). Exit status: 0 done; 1 done, "
                "but an optimizer ended with a non-finite loss, every optimizer failed or a result file could not be "
                "written; 2 a usage error (an option, an output path, a checkpoint that cannot be continued)."),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    digits = commands.add_parser(
        "digits",
        help="train a small CNN on scikit-learn's digits once per optimizer and print a side-by-side table",
        description=(
            "Train a small CNN (a Tucker-projected 3x3 conv, projected linear layers) on scikit-learn's "
            "bundled digits (8x8, upsampled to 16x16; 20% held out, stratified) once per optimizer, with "
            "the same initial weights and batches, and print memory, speed, loss and accuracy side by side."
        ),
    )
    digits.add_argument("--steps", type=_positive_int, default=400, help="training steps (default 400)")
    digits.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    digits.add_argument(
        "--lr",
        type=_float_at_least(0.0, strict=True),
        default=1e-3,
        help="learning rate of every optimizer (default 1e-3)",
    )
    digits.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(DEFAULT_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers to compare, from: {', '.join(OPTIMIZERS)} (default: all)",
    )
    digits.add_argument(
        "--rank-ratio",
        type=_float_at_least(1.0),
        default=2.0,
        help="COAP rank_ratio_matrix and rank_ratio_cnn (default 2)",
    )
    digits.add_argument("--update-interval", type=_positive_int, default=32, help="COAP update_interval (default 32)")
    digits.add_argument("--reproject-factor", type=_positive_int, default=5, help="COAP reproject_factor (default 5)")
    digits.add_argument(
        "--correlation-normalize", action="store_true", help="COAP correlation_normalize (scale-invariant Eq. 2 step)"
    )
    digits.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the initial weights and batch order (default 0)"
    )
    digits.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    digits.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    digits.add_argument("--plots", metavar="DIR", help="write a loss-curve PNG to this folder (needs matplotlib)")
    digits.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_llama_parser(commands)
    from .memory import add_memory_parser

    add_memory_parser(commands)
    from .ddpm import add_ddpm_parser

    add_ddpm_parser(commands)
    return parser


def _add_llama_parser(commands: argparse._SubParsersAction) -> None:
    from .llama import DEFAULT_LLAMA_OPTIMIZERS, LLAMA_PRESETS

    llama = commands.add_parser(
        "llama",
        help="pre-train a small LLaMA once per optimizer on an offline corpus and print a side-by-side table",
        description=(
            "Pre-train a LLaMA model (transformers' LlamaForCausalLM, built locally) on Python's own documentation "
            "(or a folder of text files) with a locally trained BPE tokenizer, once per optimizer, with the same "
            "initial weights, batches and learning-rate schedule (linear warm-up, cosine to 10%), and print "
            "memory, speed, training and held-out loss side by side."
        ),
    )
    llama.add_argument("--preset", choices=list(LLAMA_PRESETS), default="tiny",
                       help="model size (default tiny; micro is for smoke tests)")
    llama.add_argument("--steps", type=_positive_int, default=400, help="training steps (default 400)")
    llama.add_argument("--batch-size", type=_positive_int, help="sequences per batch (default 16 for tiny)")
    llama.add_argument("--seq-len", type=_positive_int,
                       help="tokens per sequence (default: the preset's, at most 128 for tiny)")
    llama.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(DEFAULT_LLAMA_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers, from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_LLAMA_OPTIMIZERS)})",
    )
    llama.add_argument("--recipe", choices=["drop-in", "paper"], default="paper",
                       help="paper (default): the GaLore/COAP LLaMA recipe: attention and MLP matrices projected at "
                            "the papers' rank for the preset, embeddings and head dense, T_u 40, lambda 5, "
                            "update_proj_gap 200, scale 0.25, lr 1e-2 for low-rank methods and 1e-3 for dense ones; "
                            "drop-in: one param group, the library defaults (rank ratio 2), lr 1e-3 for all")
    llama.add_argument("--rank-ratio", type=_float_at_least(1.0),
                       help="rank = min(m, n) // R for every low-rank optimizer, instead of the recipe's rank")
    llama.add_argument("--update-interval", type=_positive_int, help="COAP update_interval T_u (default: recipe's)")
    llama.add_argument("--reproject-factor", type=_positive_int,
                       help="COAP reproject_factor lambda (default: recipe's)")
    llama.add_argument("--scale", type=_float_at_least(0.0, strict=True),
                       help="update scale of projected weights, every low-rank optimizer (default: recipe's)")
    llama.add_argument("--proj-gap", type=_positive_int,
                       help="GaLore / APOLLO update_proj_gap (default: recipe's, 200)")
    llama.add_argument("--correlation-normalize", action="store_true",
                       help="COAP correlation_normalize (the scale-invariant Eq. 2 step)")
    llama.add_argument("--weight-decay", type=_float_at_least(0.0), default=0.0,
                       help="weight decay of every optimizer (default 0, as in the papers' scripts)")
    llama.add_argument("--lr", type=_float_at_least(0.0, strict=True),
                       help="peak learning rate of every optimizer (default: the recipe's, per optimizer)")
    llama.add_argument("--lr-sweep", action="store_true",
                       help="run each optimizer at its lr x 0.5, 1, 2 and keep the lowest held-out loss")
    llama.add_argument("--warmup-steps", type=_non_negative_int, help="linear warm-up steps (default steps / 10)")
    llama.add_argument("--data-dir", metavar="PATH", help="train on this folder of *.txt / *.md files instead")
    llama.add_argument("--c4", action="store_true",
                       help="the papers' data: English C4 streamed from the Hugging Face Hub with the t5-base "
                            "tokenizer and the preset's sequence length (needs internet and `pip install datasets`)")
    llama.add_argument("--vocab-size", type=_positive_int, default=4096,
                       help="vocabulary of the local BPE tokenizer (default 4096)")
    llama.add_argument("--max-documents", type=_positive_int, help=argparse.SUPPRESS)
    llama.add_argument("--max-heldout-windows", type=_positive_int, help=argparse.SUPPRESS)
    llama.add_argument("--stop-after", type=_positive_int, help=argparse.SUPPRESS)
    llama.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seed of the initial weights and batch order (default 0)")
    llama.add_argument("--seeds", type=_positive_int, default=1,
                       help="train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
                            "held-out loss, with the spread (default 1; single-process runs only)")
    llama.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    llama.add_argument("--in-process", action="store_true",
                       help="run every optimizer in this process (default on CPU: a fresh process each, so that "
                            "peak RSS is per run and a crashing peer cannot end the comparison)")
    llama.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    llama.add_argument("--plots", metavar="DIR", help="write PNG plots to this folder (needs matplotlib)")
    llama.add_argument("--checkpoint-dir", metavar="DIR",
                       help="save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds; "
                            "with --distributed a torch.distributed.checkpoint folder DIR/<optimizer>/) and "
                            "continue from there when started again")
    llama.add_argument("--checkpoint-every", type=_positive_int, default=100,
                       help="steps between checkpoints (default 100)")
    llama.add_argument("--no-progress", action="store_true", help="no progress bars")
    llama.add_argument("--distributed", choices=["ddp", "fsdp2"],
                       help="train on every rank of a torchrun job (gloo on CPU, NCCL on GPU) and report per-rank "
                            "optimizer state and communication: torchrun --nproc-per-node 2 -m coap_torch.bench.cli "
                            "llama --distributed fsdp2 ...")
    llama.add_argument("--per-layer", action="store_true",
                       help="update each parameter during backward (COAP optimizers; single process or fsdp2) and "
                            "report the peak-memory saving")


def _llama(args: argparse.Namespace, argv: list[str]) -> int:
    from .llama import LlamaConfig, format_llama_table, run_llama, write_llama_plots

    config = config_from_args(LlamaConfig, args, argv)
    if config.distributed or config.per_layer:
        if config.seeds > 1:
            raise ValueError(f"--seeds {config.seeds} is for single-process runs; run --distributed / --per-layer "
                             "once per --seed instead")
        from .llama_distributed import run_llama_command

        return run_llama_command(config, args, _run_and_report)
    return _run_and_report(lambda: run_llama(config), args, format_llama_table, write_llama_plots)


def config_from_args(config_class: type[T], args: argparse.Namespace, argv: list[str]) -> T:
    """A job's config dataclass from its parsed flags: each field from the flag of the same name,
    ``isolate`` from ``--in-process``, ``progress`` from ``--no-progress``, and the command line."""
    import torch

    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {args.device!r}: {error}") from None
    flags = vars(args)
    given = {field.name: flags[field.name] for field in dataclasses.fields(config_class) if field.name in flags}
    given["optimizers"] = tuple(args.optimizers)
    return config_class(**given, isolate=False if args.in_process else None, progress=not args.no_progress,
                        argv=["coap-bench", *argv])


def write_json_reported(run: dict, path: str) -> bool:
    """Write the run's JSON and say where, or say why it could not be written; whether it was."""
    from .report import write_json

    try:
        print(f"results written to {write_json(run, path)}", file=sys.stderr)
    except OSError as error:
        print(f"coap-bench: error: --json {path}: results not written ({error.strerror or error})", file=sys.stderr)
        return False
    return True


def _write_plots_reported(run: dict, directory: str, write_plots) -> bool:
    try:
        paths = write_plots(run, directory)
    except OSError as error:
        print(f"coap-bench: error: --plots {directory}: plots not written ({error.strerror or error})",
              file=sys.stderr)
        return False
    if paths is None:
        print(
            'no plots written: matplotlib is not installed (pip install matplotlib, or "coap-torch[examples]")',
            file=sys.stderr,
        )
    else:
        paths = paths if isinstance(paths, list) else [paths]
        print(f"plots written to {', '.join(map(str, paths))}", file=sys.stderr)
    return True


def _run_and_report(run_job, args: argparse.Namespace, format_table, write_plots) -> int:
    """Run a job, print its table, write the JSON and plots it was asked for; the exit status.

    The status is 1 when an output could not be written, when an optimizer ended with a non-finite
    loss, or when every optimizer failed (:func:`~coap_torch.bench.runner.run_problems`), each said
    on stderr after the table and the files are written, so that no result is lost.
    """
    from .runner import run_problems

    started = time.perf_counter()
    run = run_job()
    run["config"]["total_seconds"] = time.perf_counter() - started
    print(format_table(run), flush=True)
    written = True
    if args.json:
        written &= write_json_reported(run, args.json)
    if args.plots:
        written &= _write_plots_reported(run, args.plots, write_plots)
    problems = run_problems(run["results"])
    for problem in problems:
        print(f"coap-bench: error: {problem}", file=sys.stderr)
    return 0 if written and not problems else 1


def _digits(args: argparse.Namespace) -> int:
    import torch

    from .digits import DigitsConfig, run_digits
    from .report import format_table, write_plots

    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {args.device!r}: {error}") from None
    config = DigitsConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizers=tuple(args.optimizers),
        rank_ratio=args.rank_ratio,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        correlation_normalize=args.correlation_normalize,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    return _run_and_report(lambda: run_digits(config), args, format_table, write_plots)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coap-bench``; returns the exit status."""
    args_list = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not args_list or (args_list[0] not in _COMMANDS and args_list[0] not in ("-h", "--help")):
        args_list = ["digits", *args_list]
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        check_output_paths(args)  # before any data is loaded or trained on
        if args.command == "llama":
            return _llama(args, args_list)
        if args.command == "ddpm":
            from .ddpm import run_ddpm_command

            return run_ddpm_command(args, args_list)
        if args.command == "memory":
            from .memory import run_memory_command

            return run_memory_command(args, args_list)
        return _digits(args)
    except MissingExtraError as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    return 0  # unreachable: parser.exit raises SystemExit


if __name__ == "__main__":
    sys.exit(main())
