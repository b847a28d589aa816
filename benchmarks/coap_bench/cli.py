"""``coap-bench``: the command line of the benchmark suite.

``coap-bench`` alone runs ``coap-bench digits`` with its defaults; ``coap-bench --steps 100``
is ``coap-bench digits --steps 100``. Each command lives in its module of :mod:`coap_bench.commands`.

Output paths (``--json``, ``--plots``, ``--checkpoint-dir``) are checked before anything is loaded
or trained. The exit status is 0 when the command finished, 1 when a comparison finished but is not
usable (an optimizer ended with a non-finite loss, every optimizer failed, or a result file could
not be written: the table and the files are still written), 2 for a usage error (a bad option, an
output path that cannot be written, a checkpoint of another configuration or one that cannot be
loaded), each said in one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._deps import MissingExtraError
from .commands import controlnet, ddpm, digits, finetune, llama, loss_scale, memory, quantization, sit, step
from .outputs import check_output_paths

__all__ = ["build_parser", "main"]

#: The commands, in the order ``coap-bench --help`` lists them, and their modules.
COMMANDS = {
    "digits": digits,
    "llama": llama,
    "memory": memory,
    "ddpm": ddpm,
    "controlnet": controlnet,
    "sit": sit,
    "finetune": finetune,
    "step": step,
    "quantization": quantization,
    "loss-scale": loss_scale,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-bench",
        description="Compare COAP optimizers with their dense counterparts on real data.",
        epilog=(
            "Without a command, runs `digits` (any options given are passed to it). Exit status: 0 done; 1 done, "
            "but an optimizer ended with a non-finite loss, every optimizer failed or a result file could not be "
            "written; 2 a usage error (an option, an output path, a checkpoint that cannot be continued)."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coap-bench``; returns the exit status."""
    args_list = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help")):
        args_list = ["digits", *args_list]
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        check_output_paths(args)  # before any data is loaded or trained on
        return COMMANDS[args.command].run(args, args_list)
    except MissingExtraError as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"coap-bench: error: {error}\n")
    return 0  # unreachable: parser.exit raises SystemExit


if __name__ == "__main__":
    sys.exit(main())
