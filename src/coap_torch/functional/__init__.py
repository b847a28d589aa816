"""The COAP math as pure functions of tensors (no optimizer, no state dicts, no globals).

Shapes use the paper's symbols: a gradient ``G`` is (m, n), a projection ``P`` is (n, r) with
orthonormal columns, the projected gradient ``G P`` and the low-rank first moment ``M`` are
(m, r). Leading batch dimensions are allowed everywhere a matrix is expected.
"""

from .correlation import (
    DEFAULT_CORRELATION_LR,
    DEFAULT_CORRELATION_MAX_NORM,
    coap_objective,
    coap_objective_grad,
    correlation_aware_step,
)
from .moments import (
    AdamDirection,
    adafactor_direction_,
    adafactor_lr,
    adam_direction_,
    adam_moments_,
    adamw_update_foreach_,
    rotate_first_moment,
    rotate_second_moment,
)
from .quantization import (
    DEFAULT_BLOCK_SIZE,
    dequantize_blockwise,
    dynamic_code_map,
    quantize_blockwise,
    quantize_blockwise_,
)
from .rounding import round_to_bfloat16, stochastic_round_to_bfloat16
from .subspace import DEFAULT_SKETCH_SEED, gaussian_sketch, low_cost_svd, orthonormalize
from .tucker import (
    conv_ranks,
    mode_matrices,
    mode_product,
    tucker2_add_restored_,
    tucker2_project,
    tucker2_restore,
    unfold,
)
from .update_scale import norm_matched_scale

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CORRELATION_LR",
    "DEFAULT_CORRELATION_MAX_NORM",
    "DEFAULT_SKETCH_SEED",
    "AdamDirection",
    "adafactor_direction_",
    "adafactor_lr",
    "adam_direction_",
    "adam_moments_",
    "adamw_update_foreach_",
    "coap_objective",
    "coap_objective_grad",
    "conv_ranks",
    "correlation_aware_step",
    "dequantize_blockwise",
    "dynamic_code_map",
    "gaussian_sketch",
    "low_cost_svd",
    "mode_matrices",
    "mode_product",
    "norm_matched_scale",
    "orthonormalize",
    "quantize_blockwise",
    "quantize_blockwise_",
    "rotate_first_moment",
    "rotate_second_moment",
    "round_to_bfloat16",
    "stochastic_round_to_bfloat16",
    "tucker2_add_restored_",
    "tucker2_project",
    "tucker2_restore",
    "unfold",
]
