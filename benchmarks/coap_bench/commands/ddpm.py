"""``coap-bench ddpm``: train a diffusers UNet2DModel with DDPM once per optimizer; with ``--distributed`` on
every rank of a ``torchrun`` job."""

from __future__ import annotations

import argparse

from ..arguments import config_from_args, float_at_least, non_negative_int, optimizer_list, positive_int, update_scale
from ..ddpm import (
    DDPM_PRESETS,
    DDPM_RECIPES,
    DEFAULT_DDPM_OPTIMIZERS,
    DdpmConfig,
    format_ddpm_table,
    run_ddpm,
    write_ddpm_plots,
)
from ..frechet import CLASSIFIER_STEPS
from ..optimizers import OPTIMIZERS, PROJECTION_SIDES, STATE_DTYPES
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
    ddpm.add_argument(
        "--preset",
        choices=list(DDPM_PRESETS),
        default="small",
        help="small (default): 16x16 grayscale UNet for CPUs; cifar10: the paper's DDPM CIFAR-10 UNet "
        "(35.7M parameters) for GPUs; micro: smoke tests",
    )
    ddpm.add_argument("--steps", type=positive_int, help="training steps (default: small 500, cifar10 800000)")
    ddpm.add_argument("--batch-size", type=positive_int, help="images per batch (default: small 32, cifar10 128)")
    ddpm.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(DEFAULT_DDPM_OPTIMIZERS),
        metavar="A,B",
        help=f"comma-separated optimizers, from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_DDPM_OPTIMIZERS)})",
    )
    ddpm.add_argument(
        "--recipe",
        choices=list(DDPM_RECIPES),
        default="paper",
        help="paper (default): the paper's DDPM CIFAR-10 settings, rank ratio 1.5 for matrices and "
        "conv kernels, T_u 16, lambda 10; drop-in: the library defaults (rank ratio 2, T_u 32, "
        "lambda 5); both at the preset's lr for every optimizer",
    )
    ddpm.add_argument(
        "--rank-ratio",
        type=float_at_least(1.0),
        help="rank ratio of every low-rank optimizer (matrices and COAP's Tucker-2 kernels)",
    )
    ddpm.add_argument("--update-interval", type=positive_int, help="COAP update_interval T_u (default: recipe's)")
    ddpm.add_argument("--reproject-factor", type=positive_int, help="COAP reproject_factor lambda (default: recipe's)")
    ddpm.add_argument(
        "--scale",
        type=update_scale,
        help="update scale of projected weights, every low-rank optimizer: a number, or auto (COAP's norm-matched "
        "sqrt(n / r), the same factor per matrix for GaLore / APOLLO); default: recipe's (paper 1, drop-in the library's)",
    )
    ddpm.add_argument("--proj-gap", type=positive_int, help="GaLore / APOLLO update_proj_gap (default 200)")
    ddpm.add_argument(
        "--correlation-normalize",
        action="store_true",
        help="COAP correlation_normalize (the scale-invariant Eq. 2 step)",
    )
    ddpm.add_argument(
        "--projection-side",
        choices=list(PROJECTION_SIDES),
        help="where COAP puts P on each projected matrix (default: the library's default)",
    )
    ddpm.add_argument(
        "--state-dtype",
        choices=list(STATE_DTYPES),
        default="float32",
        help="precision of the COAP optimizers' state between steps: float32 (default, the library's) or bf16 "
        "(P and every moment not stored 8-bit in bfloat16, half the bytes); the other optimizers ignore it",
    )
    ddpm.add_argument(
        "--conv-projection",
        choices=["tucker2", "input"],
        help="how COAP projects conv kernels: tucker2 (both channel modes) or input (the input channels only: "
        "no steady-step traffic under FSDP2) (default: the library's, tucker2)",
    )
    ddpm.add_argument(
        "--weight-decay",
        type=float_at_least(0.0),
        default=0.0,
        help="weight decay of every optimizer (default 0, as DDPM's Adam)",
    )
    ddpm.add_argument(
        "--lr",
        type=float_at_least(0.0, strict=True),
        help="peak learning rate of every optimizer (default: small 6e-3, cifar10 2e-4 as in DDPM)",
    )
    ddpm.add_argument(
        "--lr-sweep",
        action="store_true",
        help="run each optimizer at its lr x 0.5, 1, 2 and keep the lowest held-out loss",
    )
    ddpm.add_argument("--warmup-steps", type=non_negative_int, help="linear warm-up steps (default steps / 10)")
    ddpm.add_argument(
        "--image-dir",
        metavar="PATH",
        help="train on this folder of images instead (class labels from first-level subfolders)",
    )
    ddpm.add_argument(
        "--cifar10",
        action="store_true",
        help="train on CIFAR-10 from the Hugging Face Hub (needs internet and `pip install datasets`)",
    )
    ddpm.add_argument(
        "--samples",
        type=positive_int,
        help="images generated per optimizer for the sample-quality figures (default: small 256)",
    )
    ddpm.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler of the generated images (default ddim)")
    ddpm.add_argument(
        "--sample-steps",
        type=positive_int,
        help="denoising steps of the sampler (default: small 50, cifar10 100; the paper: ddpm 1000)",
    )
    ddpm.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="also measure the held-out loss before training and every N steps (default: at the end)",
    )
    ddpm.add_argument(
        "--fid",
        action="store_true",
        help="also report real FID (Inception-v3; needs torch-fidelity or pytorch-fid and its weights)",
    )
    ddpm.add_argument("--max-images", type=positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument("--heldout-repeats", type=positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument("--classifier-steps", type=positive_int, default=CLASSIFIER_STEPS, help=argparse.SUPPRESS)
    ddpm.add_argument("--stop-after", type=positive_int, help=argparse.SUPPRESS)
    ddpm.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the initial weights, batches, noise and samples (default 0)",
    )
    ddpm.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="train each optimizer (and lr) with seeds SEED, SEED+1, ... and report the mean "
        "held-out loss and sample quality, with the spread (default 1)",
    )
    ddpm.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    ddpm.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads of each run (default: torch's; 1 gives steadier times on a busy machine)",
    )
    ddpm.add_argument(
        "--in-process",
        action="store_true",
        help="run every optimizer in this process (default on CPU: a fresh process each, so that "
        "peak RSS is per run and a crashing peer cannot end the comparison)",
    )
    ddpm.add_argument("--json", metavar="PATH", help="write the configuration and all results to this JSON file")
    ddpm.add_argument(
        "--plots",
        metavar="DIR",
        help="write loss plots and a PNG grid of samples per optimizer to this folder (needs matplotlib)",
    )
    ddpm.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save each run to DIR/<optimizer>.pt (-lr<LR> in a sweep, -seed<S> with --seeds; "
        "with --distributed a torch.distributed.checkpoint folder DIR/<optimizer>/) and "
        "continue from there when started again",
    )
    ddpm.add_argument(
        "--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints (default 100)"
    )
    ddpm.add_argument("--no-progress", action="store_true", help="no progress bars")
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
