"""The DDPM benchmark: a ``diffusers`` ``UNet2DModel`` trained to denoise, once per optimizer.

The model is built from a config (:data:`DDPM_PRESETS`; no weights are downloaded) and trained
with the DDPM objective (Ho et al., 2020): for a clean image ``x0``, a timestep ``t`` and noise
``eps``, the UNet predicts ``eps`` from ``DDPMScheduler.add_noise(x0, eps, t)`` under a mean squared
error. Every optimizer gets the same initial weights, the same images, noise and timesteps in the
same order (:class:`ImageBatches`, seeded from ``seed``) and the same learning-rate schedule
(linear warm-up, then cosine decay to 10% of the peak, :func:`~coap_bench.training.lr_lambda`).

Each run is scored on:

* the **held-out denoising loss**: the same MSE on the held-out images, each with ``repeats``
  fixed ``(t, eps)`` draws (timesteps stratified over ``[0, T)``), drawn once from a fixed seed,
  so it is the same set for every optimizer and every ``--seed`` (:func:`heldout_set`);
* **sample quality**: ``samples`` images generated with DDIM (or DDPM) from seeded noise, scored
  by the Frechet distance of their features in a small classifier trained on the training images
  (:mod:`coap_bench.frechet`; *not* FID: comparable between the optimizers of one run only)
  and, with ``fid``, by real FID on Inception-v3 features against the training images;
* memory and time: optimizer-state bytes (:func:`~coap_torch.utils.optimizer_state_nbytes`),
  the median iteration and ``optimizer.step()`` times, the time of projection refreshes.

Recipes (:func:`recipe_settings`), every parameter handed to the optimizer as ``projected`` (COAP
routes by shape: Tucker-2 for 3x3 kernels of at least ``min_conv_numel`` entries, matrices for
linear / attention / 1x1 weights, dense for the rest; GaLore and APOLLO project 2-D weights only):

* ``paper``: the paper's DDPM CIFAR-10 settings: rank ratio 1.5 for matrices and kernels
  (supplementary Table 2), ``T_u`` 16 and lambda 10 (Table 1, its diffusion rows), update scale 1,
  no weight decay; GaLore's ``update_proj_gap`` is its default 200. The lr is the preset's, the
  same for every optimizer: DDPM's CIFAR-10 lr 2e-4 (Ho et al., 2020, appendix B) for ``cifar10``;
  the CPU presets train a few hundred steps instead of 800K, at 6e-3 (``small``) and 1e-3
  (``micro``). ``small``'s lr is the middle of AdamW's stable range: over seeds 0-2, AdamW's mean
  held-out loss is 0.0318 at 6e-3 and 0.0313 at 8e-3, and it diverged at 1.1e-2 and 1.6e-2 (seed 0), so a
  ``--lr-sweep`` (3e-3, 6e-3, 1.2e-2) brackets its best lr instead of ending at it.
* ``drop-in``: the library defaults (rank ratio 2, ``T_u`` 32, lambda 5) at the same lr.

As in ``coap-bench llama``, each run has a process of its own on the CPU (a crash is a failed
row), and with ``checkpoint_dir`` a run saves everything every ``checkpoint_every`` steps and
continues from there when started again, ending with the numbers of a run that never stopped.
Under ``torchrun``, ``distributed="ddp"`` or ``"fsdp2"`` trains on every rank and reports each
rank's optimizer state and communication (:mod:`coap_bench.ddpm.distributed`).

Example, the Python side of ``coap-bench ddpm --preset micro --steps 20 --optimizers adamw,coap_adamw``
(half a minute on a CPU)::

    from coap_bench.ddpm import DdpmConfig, format_ddpm_table, run_ddpm

    run = run_ddpm(DdpmConfig(preset="micro", steps=20, optimizers=("adamw", "coap_adamw")))
    print(format_ddpm_table(run))
    coap = run["results"][1]
    coap["state_ratio_to_adamw"], coap["heldout_loss"], coap["classifier_frechet_distance"]
"""

from .data import HeldoutSet, ImageBatches, heldout_set
from .model import build_unet, evaluate_heldout, generate_samples, projection_summary
from .presets import DDPM_PRESETS, DDPM_RECIPES, DEFAULT_DDPM_OPTIMIZERS, DdpmConfig, DdpmPreset, recipe_settings
from .report import format_ddpm_table, save_sample_grid, write_ddpm_plots
from .training import run_ddpm, train_one

__all__ = [
    "DDPM_PRESETS",
    "DDPM_RECIPES",
    "DEFAULT_DDPM_OPTIMIZERS",
    "DdpmConfig",
    "DdpmPreset",
    "HeldoutSet",
    "ImageBatches",
    "build_unet",
    "evaluate_heldout",
    "format_ddpm_table",
    "generate_samples",
    "heldout_set",
    "projection_summary",
    "recipe_settings",
    "run_ddpm",
    "save_sample_grid",
    "train_one",
    "write_ddpm_plots",
]
