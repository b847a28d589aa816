"""CoapAdafactor: Adafactor with correlation-aware low-rank projection (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..functional.moments import adafactor_direction_task, adafactor_lr
from ..functional.reduction import LOCAL, Rows, Task
from . import _validation as check
from ._base import LowRankOptimizer
from ._options import CoapOptions, with_options
from ._rule import MomentRule, Update
from ._storage import INT8_BLOCKWISE, Int8Options

__all__ = ["AdafactorRule", "CoapAdafactor", "CoapAdafactor8bit"]


class AdafactorRule(MomentRule):
    """Adafactor's factored second moment, update clipping, relative step and parameter scaling,
    and an optional first moment, as :class:`transformers.optimization.Adafactor` (a row shard
    takes the sums over the whole parameter from collectives)."""

    rotations: ClassVar[dict[str, str]] = {
        "exp_avg": "linear",
        "exp_avg_sq": "squared",
        "exp_avg_sq_row": "row",
        "exp_avg_sq_col": "col",
    }
    collective = True

    def check(self, group: dict[str, Any]) -> None:
        if group["relative_step"] is not None:
            check.boolean("relative_step", group["relative_step"])
        if group["lr"] is not None and group["relative_step"] is True:
            raise ValueError(
                f"Cannot combine manual lr={group['lr']} and relative_step=True; pass lr=None or relative_step=False"
            )
        if group["lr"] is None and group["relative_step"] is False:
            raise ValueError("lr=None requires relative_step=True; pass a learning rate with relative_step=False")
        if group["warmup_init"] and not relative_step(group):
            raise ValueError("warmup_init=True requires relative_step=True (and lr=None)")
        if group["lr"] is not None:
            check.non_negative("lr", group["lr"])
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r} (must be a pair (eps1, eps2))")
        check.non_negative("eps[0]", eps[0])
        check.non_negative("eps[1]", eps[1])
        check.positive_or_inf("clip_threshold", group["clip_threshold"])
        check.non_positive("decay_rate", group["decay_rate"])
        if group["beta1"] is not None:
            check.unit_interval("beta1", group["beta1"])
        check.non_negative("weight_decay", group["weight_decay"])
        for flag in ("scale_parameter", "warmup_init"):
            check.boolean(flag, group[flag])

    def init(self, shape: tuple[int, ...], group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
        def zeros(size: tuple[int, ...]) -> Tensor:
            return torch.zeros(size, dtype=like.dtype, device=like.device)

        moments = {}
        if group["beta1"] is not None:
            moments["exp_avg"] = zeros(shape)
        if len(shape) >= 2:
            moments["exp_avg_sq_row"] = zeros(shape[:-1])
            moments["exp_avg_sq_col"] = zeros(shape[:-2] + shape[-1:])
        else:
            moments["exp_avg_sq"] = zeros(shape)
        return moments

    def update(
        self,
        moments: dict[str, Any],
        grad: Tensor,
        group: dict[str, Any],
        step: int,
        weight: Tensor,
        rows: Rows = LOCAL,
        *,
        rms_fraction: float | None = None,
    ) -> Task[Update]:
        eps1, eps2 = group["eps"]
        second = {key: moments.get(key) for key in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")}
        # The clipping RMS and the parameter scale are over the whole weight (all ranks' rows);
        # with scale="auto" the clip is over the projected update, the RMS the weight receives.
        numel = rows.numel(weight)
        clip_numel = numel if rms_fraction is None else numel * rms_fraction
        # Sharded, the weights' sum of squares rides along with the direction's sums.
        param_sq = weight.to(grad.dtype).square().sum() if group["scale_parameter"] and not rows.local else None
        update, param_sq = yield from adafactor_direction_task(
            grad,
            step=step,
            decay_rate=group["decay_rate"],
            eps1=eps1,
            clip_threshold=group["clip_threshold"],
            numel=clip_numel,
            param_sq=param_sq,
            rows=rows,
            **second,
        )
        if not group["scale_parameter"]:
            param_rms = 0.0
        elif rows.local:
            param_rms = torch.linalg.vector_norm(weight) / numel**0.5
        else:
            param_rms = param_sq.sqrt() / numel**0.5
        lr = adafactor_lr(
            group["lr"],
            step=step,
            param_rms=param_rms,
            relative_step=relative_step(group),
            scale_parameter=group["scale_parameter"],
            warmup_init=group["warmup_init"],
            eps2=eps2,
        )
        update = update.mul_(lr)
        if group["beta1"] is not None:
            update = moments["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        decay: float | Callable[[Tensor], Tensor] = 1.0
        if group["weight_decay"] != 0:
            # transformers' order and rounding: W <- W - (wd * rho) W, before the update.
            factor = group["weight_decay"] * lr
            decay = lambda weight: weight.sub_(weight * factor)
        return Update(update, decay, -1.0)


ADAFACTOR = AdafactorRule()


class CoapAdafactor(LowRankOptimizer):
    r"""Adafactor whose moments live in a correlation-aware low-rank subspace (COAP, Algorithm 1).

    The arguments, defaults and argument rules of :class:`transformers.optimization.Adafactor`,
    plus the COAP options of :class:`~coap_torch.CoapAdamW` (same names, defaults, per-group
    overrides and ``coap=False`` opt-out). Parameters that are not projected follow
    transformers' Adafactor step for step.

    For a projected matrix (canonical orientation, ``G`` (m, n), ``P`` (n, r)), our reading of
    Algorithm 1, whose printed listing is garbled:

    .. math::
        \begin{aligned}
        & P \text{ refreshed exactly as in CoapAdamW (init, Eq. 2 step, low-cost SVD)} \\
        & \tilde G = G P \ (m, r),\quad \beta_{2,t} = 1 - t^{\text{decay\_rate}},\quad
          U = \tilde G^2 + \epsilon_1 \\
        & R \leftarrow \beta_{2,t} R + (1-\beta_{2,t})\,\mathrm{mean}_{-1}(U)\ (m),\quad
          C \leftarrow \beta_{2,t} C + (1-\beta_{2,t})\,\mathrm{mean}_{-2}(U)\ (r) \\
        & \Delta = \tilde G \big/ \sqrt{R C^\top / \mathrm{mean}(R)},\quad
          \Delta \leftarrow \Delta / \max(1, \mathrm{RMS}(\Delta P^\top) / d),\quad
          \Delta \leftarrow \rho_t\,\Delta \\
        & \text{if } \beta_1: M \leftarrow \beta_1 M + (1-\beta_1)\Delta,\ \Delta \leftarrow M \\
        & W \leftarrow W (1 - \lambda_{wd}\rho_t) - s\,\Delta P^\top
        \end{aligned}

    Decisions where the paper is silent:

    * **Clipping** uses the RMS of the *restored* update ``Delta P^T`` over the weight's m*n
      entries (``||Delta||_F / sqrt(m n)``, exact for orthonormal ``P``): Adafactor clips the
      update of the weight, not of its coordinates. With ``scale="auto"`` the weight receives
      ``sqrt(n / r) Delta P^T``, whose RMS is ``||Delta||_F / sqrt(m r)``, and that is the RMS
      clipped: the clip still bounds what the weight receives. An explicit number multiplies
      after the clip, as ``lr`` does.
    * **scale_parameter** scales by the RMS of the full weight ``W``, and **relative_step** is
      transformers' ``min(1e-2, 1/sqrt(t))`` schedule: both are properties of the weight and of
      time, not of the subspace, so they mean what they mean for dense parameters.
    * **beta1=None** (the default) keeps no first moment, and the Eq. 2 step correlates with the
      current gradient projected on the previous basis, ``G_t P_{t-1}``, in place of ``M``. It
      costs no memory (a transient (m, r) tensor at refresh steps). Note that without a first
      moment the projected state (``P``: n*r floats, plus m + r accumulators) is *larger* than
      plain Adafactor's m + n: COAP saves memory on Adafactor through the first moment, so use
      ``beta1=0.9`` (as the paper does) for the memory savings.
    * When ``P`` changes, ``M`` is rotated like CoapAdamW's; the column accumulator ``C``
      (indexed by the projected axis) takes the squared rotation and the row accumulator ``R``
      (indexed by the unprojected axis; a mean over coordinates) is kept.

    Args:
        params: iterable of parameters or of param groups (dicts).
        lr: external learning rate (a float, or a one-element tensor, read as in
            :class:`~coap_torch.CoapAdamW`); must be ``None`` with ``relative_step=True`` (default None).
        eps: ``(eps1, eps2)``: regularizer added to the squared gradient, and the floor of the
            parameter RMS in ``scale_parameter`` (default (1e-30, 1e-3)).
        clip_threshold: ``d``, threshold of the update RMS (default 1.0).
        decay_rate: ``beta2_t = 1 - t^decay_rate``; must be <= 0 (default -0.8).
        beta1: first-moment coefficient, or ``None`` for none (default None).
        weight_decay: decoupled weight decay, scaled by the step size (default 0.0).
        scale_parameter: multiply the step size by ``max(eps2, RMS(W))`` (default True).
        relative_step: use the ``min(1e-2, 1/sqrt(t))`` step size instead of ``lr``. The default,
            ``None``, means "exactly when no lr is given": ``CoapAdafactor(params)`` takes
            transformers' relative steps, and ``CoapAdafactor(params, lr=1e-3)`` (the project
            page's usage) a manual lr. An explicit ``True`` with an lr raises, as in transformers.
        warmup_init: with ``relative_step``, warm up as ``min(1e-6 t, 1/sqrt(t))`` (default False).
        rank, rank_ratio_matrix, rank_ratio_cnn, update_interval, reproject_factor, correlation_lr,
        correlation_normalize, correlation_max_norm, scale, min_conv_numel, seed, coap,
        projection_side, conv_projection, state_dtype: the COAP options, as documented in
            :class:`~coap_torch.CoapAdamW`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> opt = CoapAdafactor(params=model.parameters(), lr=None, beta1=0.9, rank_ratio_matrix=2)
        >>> model(torch.randn(256, 64)).square().mean().backward()
        >>> opt.step()
        >>> sorted(k for k in opt.state[model[0].weight])
        ['exp_avg', 'exp_avg_sq_col', 'exp_avg_sq_row', 'proj', 'step']
    """

    rule = ADAFACTOR

    @with_options(CoapOptions)
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool | None = None,
        warmup_init: bool = False,
        **options: Any,
    ) -> None:
        hyper = {
            "lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate, "beta1": beta1,
            "weight_decay": weight_decay, "scale_parameter": scale_parameter, "relative_step": relative_step,
            "warmup_init": warmup_init,
        }  # fmt: skip
        super().__init__(params, hyper, options)


def relative_step(group: dict[str, Any]) -> bool:
    """Whether ``group`` uses relative step sizes: as set, or (``None``) exactly when it has no lr."""
    return group["lr"] is None if group["relative_step"] is None else bool(group["relative_step"])


class CoapAdafactor8bit(CoapAdafactor):
    r""":class:`CoapAdafactor` with its moments stored block-wise quantized to 8 bits.

    Same arguments and defaults as :class:`CoapAdafactor`, plus:

    Args:
        block_size: entries per quantization block, each with one float32 absmax (default 256).
        min_8bit_size: moments with fewer entries stay float32 (default 4096).

    The first moment (when ``beta1`` is set) uses the signed dynamic code map; unfactored second
    moments and factored accumulators large enough use the unsigned one (the row / column
    accumulators of a matrix are usually below ``min_8bit_size`` and stay float32). Every
    moment, 1-D ones included, is written back after every step.

    Example:
        >>> model = torch.nn.Linear(256, 512)
        >>> opt = CoapAdafactor8bit(model.parameters(), beta1=0.9, rank_ratio_matrix=2)
        >>> model(torch.randn(512, 256)).square().mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg_absmax', 'exp_avg_codes', 'exp_avg_sq_col', 'exp_avg_sq_row', 'proj', 'step']
    """

    storage = INT8_BLOCKWISE

    @with_options(Int8Options, like=CoapAdafactor.__init__)
    def __init__(self, params: ParamsT, *args: Any, **options: Any) -> None:
        super().__init__(params, *args, **options)
