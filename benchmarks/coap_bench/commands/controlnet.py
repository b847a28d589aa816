"""``coap-bench controlnet``: train a diffusers ControlNetModel on a frozen UNet once per optimizer; with
``--preset sdxl``, the memory of the paper's ControlNet-SDXL."""

from __future__ import annotations

import argparse
import sys

from ..arguments import add_optimizers_flag, add_run_flags, config_from_args, non_negative_int
from ..controlnet import (
    CONTROLNET_PRESETS,
    ControlNetConfig,
    format_controlnet_table,
    format_sdxl_memory,
    run_controlnet,
    sdxl_memory,
    write_controlnet_plots,
)
from ..outputs import run_and_report

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "controlnet",
        help="train a diffusers ControlNet on a frozen UNet once per optimizer on offline images and print a table",
        description=(
            "Train a ControlNet (diffusers' ControlNetModel.from_unet, zero convolutions) on a frozen "
            "UNet2DConditionModel (built from a config and trained briefly on the same images once, then cached; "
            "nothing downloaded) to follow the Sobel edge maps of scikit-learn's bundled digits, once per optimizer, "
            "with the same frozen UNet, ControlNet initialisation, images, noise, timesteps and learning-rate "
            "schedule, and print memory, speed, held-out denoising loss and control fidelity (edge F1 of samples) "
            "side by side. --preset sdxl prints the memory of the paper's ControlNet-SDXL instead."
        ),
    )
    add_run_flags(
        parser,
        ControlNetConfig,
        {
            "--preset": "small (default): 16x16 digits for CPUs; sdxl: the paper's ControlNet-SDXL, built on meta, "
            "its optimizer state next to the paper's; micro: smoke tests",
            "--steps": "ControlNet training steps (default: small 100)",
            "--batch-size": "images per batch (default: small 16)",
        },
    )
    add_optimizers_flag(parser, ControlNetConfig)
    add_run_flags(
        parser,
        ControlNetConfig,
        {
            "--recipe": "paper (default): the paper's ControlNet row, rank ratio 2, T_u 8, lambda 10, GaLore's gap "
            "T_u x lambda = 80; drop-in: the library defaults (rank ratio 2, T_u 32, lambda 5, GaLore's gap 200); "
            "both at the preset's lr for every optimizer",
            "--rank-ratio": "rank ratio of every low-rank optimizer (matrices and kernels)",
            "--update-interval": None,
            "--reproject-factor": None,
            "--scale": "update scale of projected weights, every low-rank optimizer: a number, or auto (default: "
            "recipe's, 1)",
            "--proj-gap": "GaLore update_proj_gap (default: recipe's)",
            "--correlation-normalize": None,
            "--state-dtype": "precision of the COAP optimizers' state between steps (default float32); the others "
            "ignore it",
            "--weight-decay": "weight decay of every optimizer (default 1e-2, diffusers' ControlNet script's)",
            "--lr": "peak learning rate of every optimizer (default: small 4e-3)",
            "--lr-sweep": None,
            "--warmup-steps": None,
        },
    )
    parser.add_argument(
        "--pretrain-steps",
        type=non_negative_int,
        help="steps of the frozen UNet's training, done once and cached (default: small 800)",
    )
    parser.add_argument(
        "--unet-seed",
        type=non_negative_int,
        default=0,
        help="seed of the frozen UNet's weights and training batches, the same for every --seed (default 0)",
    )
    parser.add_argument(
        "--pretrained",
        metavar="PATH",
        help="use this diffusers UNet2DConditionModel folder (save_pretrained) as the frozen UNet instead",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the frozen UNet is cached (default: $COAP_TORCH_CACHE or ~/.cache/coap-torch, under controlnet/)",
    )
    add_run_flags(
        parser,
        ControlNetConfig,
        {
            "--samples": "held-out edge maps sampled from for the edge F1 (default: small 64)",
            "--sample-steps": "DDIM steps of the samples (default: small 10)",
            "--eval-every": None,
            "--heldout-repeats": None,
            "--stop-after": None,
            "--seed": "seed of the ControlNet's initialisation, batches, noise and samples (default 0)",
            "--seeds": "train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean held-out "
            "loss and edge F1, with the spread (default 1)",
            "--device": None,
            "--threads": None,
            "--in-process": "run every optimizer in this process (default on CPU: a fresh process each)",
            "--json": None,
            "--plots": "write loss plots and a PNG grid of edge maps and samples per optimizer to this folder "
            "(matplotlib)",
            "--checkpoint-dir": None,
            "--checkpoint-every": None,
            "--no-progress": None,
        },
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = config_from_args(ControlNetConfig, args, argv)
    if CONTROLNET_PRESETS[config.preset].memory_only and not config.pretrained:
        return _report_memory(config, args)
    return run_and_report(lambda: run_controlnet(config), args, format_controlnet_table, write_controlnet_plots)


def _report_memory(config: ControlNetConfig, args: argparse.Namespace) -> int:
    """``--preset sdxl``: the paper's model on meta, each optimizer's state next to the paper's figure."""
    if args.plots:
        print("no plots for the sdxl preset: it trains nothing", file=sys.stderr)
        args.plots = None
    return run_and_report(lambda: sdxl_memory(config.optimizers), args, format_sdxl_memory, None)
