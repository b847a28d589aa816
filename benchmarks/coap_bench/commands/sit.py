"""``coap-bench sit``: train a class-conditional SiT (linear interpolant, velocity prediction) once per optimizer;
with ``--preset xl-2`` on a CPU, print the optimizer state SiT-XL/2 would need."""

from __future__ import annotations

import argparse

from ..arguments import add_optimizers_flag, add_run_flags, config_from_args, float_at_least, positive_int
from ..outputs import run_and_report
from ..sit import (
    SitConfig,
    format_sit_table,
    run_sit,
    write_sit_plots,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    sit = commands.add_parser(
        "sit",
        help="train a class-conditional diffusion transformer (SiT) once per optimizer on offline images and "
        "print a table",
        description=(
            "Train a SiT (a class-conditional diffusion transformer with adaLN-Zero blocks, written in code; nothing "
            "downloaded) with SiT's linear interpolant and velocity prediction on scikit-learn's bundled digits and "
            "their labels (or a folder of images) once per optimizer, with the same initial weights, images, labels, "
            "noise, times and learning-rate schedule, and print memory, speed, training and held-out velocity loss "
            "and sample quality side by side. --preset xl-2 is the paper's SiT-XL/2: on a CPU it prints the optimizer "
            "state each optimizer would hold (built on the meta device); --device cuda trains it."
        ),
    )
    add_run_flags(
        sit,
        SitConfig,
        {
            "--preset": "small (default): depth 4, hidden 128, patch 2 on 8x8 digits, for CPUs; xl-2: the paper's "
            "SiT-XL/2 (675M parameters, 32x32x4 inputs, 1000 classes), memory only on a CPU, trains with --device "
            "cuda; micro: smoke tests",
            "--steps": "training steps (default: small 1500, xl-2 400000)",
            "--batch-size": "images per batch (default: small 32, xl-2 256)",
        },
    )
    add_optimizers_flag(sit, SitConfig)
    add_run_flags(
        sit,
        SitConfig,
        {
            "--recipe": "paper (default): the paper's SiT-XL/2 rows, CoapAdamW T_u 30 lambda 10 and CoapAdafactor "
            "T_u 200 lambda 5, rank 512 (xl-2) or rank ratio 2.25 (the same share of 1152, the smaller presets), "
            "GaLore at the same rank; drop-in: the library defaults (rank ratio 2, T_u 32, lambda 5); both at the "
            "preset's lr",
        },
    )
    sit.add_argument("--rank", type=positive_int, help="absolute rank of every low-rank optimizer (wins over ratios)")
    add_run_flags(
        sit,
        SitConfig,
        {
            "--rank-ratio": "rank ratio of every low-rank optimizer (rank = smaller side / ratio; default: recipe's)",
            "--update-interval": "COAP update_interval T_u of every COAP optimizer (default: recipe's)",
            "--reproject-factor": "COAP reproject_factor lambda of every COAP optimizer (default: recipe's)",
            "--scale": "update scale of projected weights, every low-rank optimizer: a number, or auto (COAP's "
            "norm-matched sqrt(n / r), the same factor per matrix for GaLore); default: recipe's (paper 1)",
            "--proj-gap": "GaLore / APOLLO update_proj_gap (default 200)",
            "--correlation-normalize": None,
            "--projection-side": None,
            "--state-dtype": "precision of the COAP optimizers' state between steps: float32 (default) or bf16",
            "--weight-decay": "weight decay of every optimizer (default 0, as SiT's AdamW)",
            "--lr": "peak learning rate of every optimizer (default: small 4e-3, xl-2 1e-4 as in SiT and the paper)",
            "--lr-sweep": None,
            "--warmup-steps": None,
            "--image-dir": "train on this folder of images instead (class labels from first-level subfolders, else "
            "k-means clusters)",
            "--samples": "class-conditional images generated per optimizer for the sample-quality figures (default: "
            "small 256)",
        },
    )
    sit.add_argument("--sampler", choices=["heun", "euler"], help="ODE solver of the samples (default heun)")
    add_run_flags(sit, SitConfig, {"--sample-steps": "ODE steps of the sampler (default: small 8, xl-2 50)"})
    sit.add_argument(
        "--cfg-scale",
        type=float_at_least(1.0),
        default=1.0,
        help="classifier-free guidance scale of the samples (default 1: plain class-conditional samples)",
    )
    add_run_flags(
        sit,
        SitConfig,
        {
            "--eval-every": None,
            "--max-images": None,
            "--heldout-repeats": None,
            "--classifier-steps": None,
            "--stop-after": None,
            "--seed": "seed of the initial weights, batches, noise and samples (default 0)",
            "--seeds": "train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean held-out "
            "loss and clf-FD, with the spread (default 1)",
            "--device": None,
            "--threads": None,
            "--in-process": None,
            "--json": None,
            "--plots": "write loss plots and a PNG grid of class-conditional samples per optimizer to this folder "
            "(needs matplotlib)",
            "--checkpoint-dir": None,
            "--checkpoint-every": None,
            "--no-progress": None,
        },
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = config_from_args(SitConfig, args, argv)
    return run_and_report(lambda: run_sit(config), args, format_sit_table, write_sit_plots)
