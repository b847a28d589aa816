"""The ControlNet benchmark: a trainable ``diffusers`` ``ControlNetModel`` on a frozen denoising UNet, once per
optimizer, as the ControlNet recipe trains it (Zhang et al., 2023).

The frozen model is a ``UNet2DConditionModel`` built from a small config (:data:`CONTROLNET_PRESETS`;
nothing is downloaded), trained briefly on the same images first so that the ControlNet learns on a
denoiser that works (:mod:`~coap_bench.controlnet.pretrain`: done once, cached, loaded by every run; or a
user's UNet folder with ``pretrained``). The trainable model is ``ControlNetModel.from_unet(unet)``: a
copy of the UNet's encoder and middle block, a small encoder of the control map, and zero convolutions
on every residual it adds to the UNet, so that training starts from the frozen UNet's own predictions.
Every optimizer gets the same frozen UNet, the same ControlNet initialisation (from ``seed``), the same
images, noise and timesteps in the same order, and the same learning-rate schedule.

The data are scikit-learn's bundled digits (as ``coap-bench ddpm``), and each image's control map is
its Sobel edge map (:func:`~coap_bench.controlnet.data.edge_map`). The prompt is one fixed embedding,
the stand-in for an empty caption: the ControlNet recipe trains with empty prompts so that the control
alone must say what to draw. The objective is the DDPM loss of the UNet with the ControlNet's residuals.

Each run is scored on:

* the **held-out denoising loss**: the same MSE on the held-out images, each controlled by its own edge
  map, with ``heldout_repeats`` fixed ``(t, eps)`` draws per image, the same for every optimizer and seed;
* **control fidelity**: DDIM samples drawn from held-out edge maps, their own edge maps compared with
  the ones asked for, the F1 of edge pixels (:func:`~coap_bench.controlnet.data.edge_f1`); the frozen
  UNet alone, which cannot see the control, gives the floor;
* memory and time: optimizer-state bytes, peak memory, the median iteration and ``optimizer.step()``
  times, and a PNG grid of control maps beside their samples per run.

Recipes (:func:`recipe_settings`): ``paper`` is the paper's ControlNet row of its Table 1: rank ratio 2 for
matrices and 3x3 kernels, ``T_u`` 8, lambda 10, update scale 1, at the preset's lr for every optimizer,
weight decay 1e-2 (diffusers' ControlNet script); GaLore at the same rank with ``update_proj_gap`` =
``T_u`` x lambda = 80, so that it recomputes its SVD exactly when COAP does. ``drop-in``: the library
defaults (rank ratio 2, ``T_u`` 32, lambda 5; GaLore's gap 200).

The ``sdxl`` preset is the paper's ControlNet-SDXL, built on ``meta``: ``coap-bench controlnet --preset
sdxl`` prints each optimizer's state next to the paper's figures (:mod:`~coap_bench.controlnet.sdxl`).

Example, the Python side of ``coap-bench controlnet --preset micro --optimizers adamw,coap_adafactor``::

    from coap_bench.controlnet import ControlNetConfig, format_controlnet_table, run_controlnet

    run = run_controlnet(ControlNetConfig(preset="micro", optimizers=("adamw", "coap_adafactor")))
    print(format_controlnet_table(run))
    coap = run["results"][1]
    coap["state_ratio_to_adamw"], coap["heldout_loss"], coap["edge_f1"]
"""

from .data import edge_f1, edge_map
from .model import build_controlnet, build_unet, denoising_loss, evaluate_heldout, generate_samples, prompt_embedding
from .presets import (
    CONTROLNET_PRESETS,
    CONTROLNET_RECIPES,
    DEFAULT_CONTROLNET_OPTIMIZERS,
    ControlNetConfig,
    ControlNetPreset,
    recipe_settings,
)
from .pretrain import FrozenUnet, frozen_unet, load_frozen_unet
from .report import format_controlnet_table, save_control_grid, write_controlnet_plots
from .sdxl import format_sdxl_memory, sdxl_memory
from .training import run_controlnet, train_one

__all__ = [
    "CONTROLNET_PRESETS",
    "CONTROLNET_RECIPES",
    "DEFAULT_CONTROLNET_OPTIMIZERS",
    "ControlNetConfig",
    "ControlNetPreset",
    "FrozenUnet",
    "build_controlnet",
    "build_unet",
    "denoising_loss",
    "edge_f1",
    "edge_map",
    "evaluate_heldout",
    "format_controlnet_table",
    "format_sdxl_memory",
    "frozen_unet",
    "generate_samples",
    "load_frozen_unet",
    "prompt_embedding",
    "recipe_settings",
    "run_controlnet",
    "save_control_grid",
    "sdxl_memory",
    "train_one",
    "write_controlnet_plots",
]
