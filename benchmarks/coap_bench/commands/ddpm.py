"""``coap-bench ddpm``: train a diffusers UNet2DModel with DDPM once per optimizer; with ``--distributed`` on
every rank of a ``torchrun`` job."""

from __future__ import annotations

import argparse

from ..arguments import DISTRIBUTED_CHECKPOINT_HELP, add_optimizers_flag, add_run_flags, config_from_args
from ..ddpm import (
    DdpmConfig,
    format_ddpm_table,
    run_ddpm,
    write_ddpm_plots,
)
from ..outputs import run_and_report

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    ddpm = commands.add_parser(
        "ddpm",
        help="train a diffusers UNet2DModel with DDPM once per optimizer on offline images and print a table",
        description=(
            "Train a DDPM (diffusers' UNet2DModel built from a config, DDPMScheduler; nothing downloaded) on "
            "scikit-learn's bundled digits (or a folder of images, or CIFAR-10) once per optimizer, with the same "
            "initial weights, images, noise, timesteps and learning-rate schedule, and print memory, speed, "
            "training and held-out denoising loss and sample quality side by side."
        ),
    )
    add_run_flags(
        ddpm,
        DdpmConfig,
        {
            "--preset": "small (default): 16x16 grayscale UNet for CPUs; cifar10: the paper's DDPM CIFAR-10 UNet "
            "(35.7M parameters) for GPUs; micro: smoke tests",
            "--steps": "training steps (default: small 500, cifar10 800000)",
            "--batch-size": "images per batch (default: small 32, cifar10 128)",
        },
    )
    add_optimizers_flag(ddpm, DdpmConfig)
    add_run_flags(
        ddpm,
        DdpmConfig,
        {
            "--recipe": "paper (default): the paper's DDPM CIFAR-10 settings, rank ratio 1.5 for matrices and "
            "conv kernels, T_u 16, lambda 10; drop-in: the library defaults (rank ratio 2, T_u 32, "
            "lambda 5); both at the preset's lr for every optimizer",
            "--rank-ratio": "rank ratio of every low-rank optimizer (matrices and COAP's Tucker-2 kernels)",
            "--update-interval": None,
            "--reproject-factor": None,
            "--scale": "update scale of projected weights, every low-rank optimizer: a number, or auto (COAP's "
            "norm-matched sqrt(n / r), the same factor per matrix for GaLore / APOLLO); default: recipe's "
            "(paper 1, drop-in the library's)",
            "--proj-gap": "GaLore / APOLLO update_proj_gap (default 200)",
            "--correlation-normalize": None,
            "--projection-side": None,
            "--state-dtype": None,
        },
    )
    ddpm.add_argument(
        "--conv-projection",
        choices=["tucker2", "input"],
        help="how COAP projects conv kernels: tucker2 (both channel modes) or input (the input channels only: "
        "no steady-step traffic under FSDP2) (default: the library's, tucker2)",
    )
    add_run_flags(
        ddpm,
        DdpmConfig,
        {
            "--weight-decay": "weight decay of every optimizer (default 0, as DDPM's Adam)",
            "--lr": "peak learning rate of every optimizer (default: small 6e-3, cifar10 2e-4 as in DDPM)",
            "--lr-sweep": None,
            "--warmup-steps": None,
            "--image-dir": "train on this folder of images instead (class labels from first-level subfolders)",
        },
    )
    ddpm.add_argument(
        "--cifar10",
        action="store_true",
        help="train on CIFAR-10 from the Hugging Face Hub (needs internet and `pip install datasets`)",
    )
    add_run_flags(
        ddpm,
        DdpmConfig,
        {"--samples": "images generated per optimizer for the sample-quality figures (default: small 256)"},
    )
    ddpm.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler of the generated images (default ddim)")
    add_run_flags(
        ddpm,
        DdpmConfig,
        {
            "--sample-steps": "denoising steps of the sampler (default: small 50, cifar10 100; the paper: ddpm 1000)",
            "--eval-every": None,
        },
    )
    ddpm.add_argument(
        "--fid",
        action="store_true",
        help="also report real FID (Inception-v3; needs torch-fidelity or pytorch-fid and its weights)",
    )
    add_run_flags(
        ddpm,
        DdpmConfig,
        {
            "--max-images": None,
            "--heldout-repeats": None,
            "--classifier-steps": None,
            "--stop-after": None,
            "--seed": "seed of the initial weights, batches, noise and samples (default 0)",
            "--seeds": "train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
            "held-out loss and sample quality, with the spread (default 1)",
            "--device": None,
            "--threads": None,
            "--in-process": None,
            "--json": None,
            "--plots": "write loss plots and a PNG grid of samples per optimizer to this folder (needs matplotlib)",
            "--checkpoint-dir": DISTRIBUTED_CHECKPOINT_HELP,
            "--checkpoint-every": None,
            "--no-progress": None,
        },
    )
    ddpm.add_argument(
        "--distributed",
        choices=["ddp", "fsdp2"],
        help="train on every rank of a torchrun job (gloo on CPU, NCCL on GPU; fsdp2 shards each UNet block "
        "and the root) and report per-rank optimizer state and communication: torchrun --nproc-per-node 2 "
        "-m coap_bench.cli ddpm --distributed fsdp2 ...",
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = config_from_args(DdpmConfig, args, argv)
    if config.distributed:
        return _run_distributed(config, args)
    return run_and_report(lambda: run_ddpm(config), args, format_ddpm_table, write_ddpm_plots)


def _run_distributed(config: DdpmConfig, args: argparse.Namespace) -> int:
    """``coap-bench ddpm --distributed``: every rank trains; rank 0 prints the tables and writes the files."""
    from ..distributed import launch_environment

    if config.seeds > 1:
        raise ValueError(
            f"--seeds {config.seeds} is for single-process runs; run --distributed once per --seed instead"
        )
    rank, _, _ = launch_environment("ddpm")
    from ..ddpm.distributed import format_ddpm_distributed_table, run_ddpm_distributed

    if rank != 0:
        run_ddpm_distributed(config)
        return 0
    return run_and_report(lambda: run_ddpm_distributed(config), args, format_ddpm_distributed_table, write_ddpm_plots)
