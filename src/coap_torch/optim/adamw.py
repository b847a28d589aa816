"""CoapAdamW: AdamW with correlation-aware low-rank projection of its moments."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..functional.moments import AdamDirection, adam_moments_, adamw_update_foreach_
from . import _validation as check
from ._base import LowRankOptimizer
from ._options import CoapOptions, with_options
from ._rule import MomentRule, Update
from ._storage import INT8_BLOCKWISE, Int8Options

__all__ = ["AdamRule", "CoapAdamW", "CoapAdamW8bit"]


class AdamRule(MomentRule):
    """Adam's moments and bias-corrected direction (:func:`~coap_torch.functional.adam_moments_`),
    with torch.optim.AdamW's decoupled weight decay."""

    rotations: ClassVar[dict[str, str]] = {"exp_avg": "linear", "exp_avg_sq": "squared", "max_exp_avg_sq": "squared"}
    defaults: ClassVar[dict[str, Any]] = {"amsgrad": False, "maximize": False}
    bulk = True
    elementwise = True

    def check(self, group: dict[str, Any]) -> None:
        check.non_negative("lr", group["lr"])
        check.betas(group["betas"])
        check.non_negative("eps", group["eps"])
        check.non_negative("weight_decay", group["weight_decay"])
        check.boolean("amsgrad", group["amsgrad"])
        check.boolean("maximize", group["maximize"])

    def init(self, shape: tuple[int, ...], group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        return {key: torch.zeros(shape, dtype=like.dtype, device=like.device) for key in keys}

    def update(
        self,
        moments: dict[str, Any],
        grad: Tensor,
        group: dict[str, Any],
        step: int,
        weight: Tensor,
        rows: Any = None,
        *,
        rms_fraction: float | None = None,
    ) -> Update:
        # Element-wise: a row shard needs no sums over other rows.
        beta1, beta2 = group["betas"]
        parts = adam_moments_(
            moments["exp_avg"],
            moments["exp_avg_sq"],
            grad,
            step=step,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            max_exp_avg_sq=moments.get("max_exp_avg_sq") if group["amsgrad"] else None,
        )
        lr = group["lr"]
        return Update(AdamDirection(*parts), 1 - lr * group["weight_decay"], -lr)

    def bulk_state_ok(self, moments: set[str], group: dict[str, Any]) -> bool:
        return moments == (
            {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"} if group["amsgrad"] else {"exp_avg", "exp_avg_sq"}
        )

    def bulk_step(self, params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any], step: int) -> None:
        beta1, beta2 = group["betas"]
        adamw_update_foreach_(
            params,
            [param.grad for param in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            step=step,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            max_exp_avg_sqs=[state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else None,
        )


ADAM = AdamRule()


class CoapAdamW(LowRankOptimizer):
    r"""AdamW whose moments live in a correlation-aware low-rank subspace (COAP).

    For a projected matrix with gradient ``G`` (m, n), m >= n (``G^T`` otherwise):

    .. math::
        \begin{aligned}
        &\textbf{if } t = 1: && P \leftarrow \mathrm{low\_cost\_svd}(G_1, r)\ \text{(seeded sketch)} \\
        &\textbf{elif } t \bmod \lambda T_u = 0: && P \leftarrow \mathrm{low\_cost\_svd}(G_t, r, \text{sketch}=P) \\
        &\textbf{elif } t \bmod T_u = 0: && P \leftarrow P - \eta\,\nabla_P\,
            \mathrm{MSE}(G_t P P^\top, G_t)\,(1 - \mathrm{CosSim}(M P^\top, G_t)) \\
        &\text{(after a change of } P\text{)} && M \leftarrow M R,\ V \leftarrow V (R\circ R),\ R = P_{old}^\top P \\
        &R_t = G_t P && M \leftarrow \beta_1 M + (1-\beta_1) R_t,\ V \leftarrow \beta_2 V + (1-\beta_2) R_t^2 \\
        &W \leftarrow W (1 - \gamma\lambda_{wd}) - \gamma\, s\,
            \Bigl(\tfrac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)} + \epsilon}\Bigr) P^\top
        \end{aligned}

    Conv kernels (O, I, K1, K2) use Tucker-2 (Algorithm 2): ``P_O`` and ``P_I`` refreshed the same
    way on the mode-1 / mode-2 unfoldings, the moments of shape (r_O, r_I, K1, K2). Every other
    parameter is updated exactly as by :class:`torch.optim.AdamW`.

    Args:
        params: iterable of parameters or of param groups (dicts). Every option below can be
            overridden per group; the groups are kept exactly as given.
        lr: learning rate ``gamma``: a float, or a one-element tensor of any shape (as a
            scheduler or a compiled loop may keep it), read once per group and step as the
            number it holds, so it trains bitwise as that float; on CUDA that read is one host
            sync per group and step, fewer than torch's for-loop AdamW makes (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        amsgrad: use the running maximum of the second moment (default False).
        maximize: maximize the objective instead of minimizing it (default False).
        foreach, capturable, differentiable, fused: accepted for signature compatibility with
            :class:`torch.optim.AdamW`; only their defaults are supported (anything else raises).
        rank: rank ``r`` of projected matrices (default None: ``min(m, n) // 2``).
        rank_ratio_matrix: ``r = min(m, n) // rank_ratio_matrix``; overrides ``rank`` (default None).
        rank_ratio_cnn: conv kernels get ``r_O = floor(O / sqrt(a))``, ``r_I = floor(I / sqrt(a))``,
            so the moments are ``a`` times smaller; 1x1 kernels are (O, I) matrices with
            ``r = min(O, I) // a`` (default None: 2).
        update_interval: ``T_u``, steps between two refreshes of ``P`` (default 32).
        reproject_factor: ``lambda``; every ``lambda * T_u`` steps the refresh is the warm-started
            low-cost SVD instead of the Eq. 2 step (default 5).
        correlation_lr: ``eta`` of the Eq. 2 step (default 0.1).
        correlation_normalize: make the Eq. 2 step scale-invariant (objective divided by
            ``mean(G**2)``, result re-orthonormalized); not in the paper (default False).
        correlation_max_norm: the gradient of the Eq. 2 objective is clipped to this Frobenius
            norm before the step, and a clipped step is followed by re-orthonormalization, as in
            the paper's release (not in its text); below the bound the step is bitwise the
            paper's. ``None`` turns it off (default 1.0; see the note).
        scale: multiplies the restored update of projected parameters: ``"auto"`` (the
            default), per parameter ``sqrt(numel(W) / numel(U))`` with ``U`` the projected update
            (``sqrt(n / r)`` for a matrix whose moments are (m, r); Tucker-2 kernels
            ``sqrt(O I / (r_O r_I))``), or a number (``1.0`` is the paper's). ``"auto"`` gives the
            restored update the RMS of the projected one, which the moment rule normalized like a
            full-rank step, so the lr tuned for AdamW carries over (see ``docs/algorithm.md``).
            At load it comes from the checkpoint, like ``lr``.
        min_conv_numel: kernels (more than one tap) with fewer entries stay dense (default 4096).
        seed: seed of the first sketch; each parameter draws from its own stream derived from
            ``(seed, parameter index)``, never from the global RNG (default 0).
        coap: set ``False`` in a group to train it densely, e.g. embeddings and output heads
            (default True).
        projection_side: where ``P`` sits on a matrix, the same in one process, under DDP and under
            FSDP2: ``None`` (default) or ``"smaller"`` the smaller side (the paper, and the best of the
            three in our measurements: README, "Where P sits"); ``"input"`` dim 1,
            the side FSDP2 does not shard, so that its steady steps send nothing; ``"larger"`` the
            larger side, with the moments on the smaller one (``max*r + 2*min*r`` floats of state
            instead of ``2*max*r + min*r``). Under FSDP2, ``P`` on dim 0 costs an all-reduce of the
            projected gradient at every step (see ``docs/distributed.md``).
        conv_projection: how conv kernels with more than one tap are projected: ``"tucker2"``
            (default) on both channel modes (Algorithm 2); ``"input"`` on the input-channel mode
            only, the moments (O, *k, r_I): more state than Tucker-2, but no steady-step
            communication under FSDP2, which shards the output channels.
        state_dtype: precision of the state between steps: ``torch.float32`` (default; float64
            for float64 parameters) or ``torch.bfloat16`` (also ``"bfloat16"`` / ``"bf16"``):
            ``P`` and every moment not stored 8-bit kept in bfloat16, half the bytes. Each step
            widens the state to float32 and rounds it back: ``P`` and first moments to nearest,
            second moments stochastically (round-to-nearest would stall them), from a generator
            seeded with ``(seed, parameter index, step, key)``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> opt = CoapAdamW(params=model.parameters(), lr=1e-3, rank_ratio_matrix=2,
        ...                 rank_ratio_cnn=2, update_interval=32, reproject_factor=5)
        >>> model(torch.randn(256, 64)).square().mean().backward()
        >>> opt.step()
        >>> tuple(opt.state[model[0].weight]["proj"].shape)  # P on the smaller side (64) of (128, 64)
        (64, 32)

    Note:
        Departures from the paper's text, each chosen for being mathematically right:

        * The Eq. 2 step follows the gradient of the objective, which has ``-`` before the
          CosSim term where Eq. 3 / Eq. 7 print ``+``.
        * The Eq. 2 gradient is clipped to ``correlation_max_norm`` (the paper's release does
          it; the text does not say). The objective scales like ``|G|^2``, so without the clip a
          sum-reduced loss (gradient RMS of 30 or more) moves ``P`` far from orthonormal in one
          step and training diverges; AdamW itself does not care about the gradient's scale.
          Realistic mean-reduced gradients stay far below the bound, where the step is exactly
          the paper's.
        * A refresh never builds ``P`` from non-finite values: a non-finite gradient at the
          first step defers initialisation (the parameter is left unchanged, with a warning),
          and a refresh that meets one keeps the previous ``P`` (with a warning). On other
          steps a NaN gradient flows into that parameter only, as in ``torch.optim.AdamW``.
        * Unprojected parameters are updated with ``torch.optim.AdamW``'s own operations, so
          ``coap=False`` (or a vector, or a small kernel) gives bitwise its results for float32
          and float64 parameters.
        * When ``P`` changes, the moments are expressed in the new basis (see
          :func:`~coap_torch.functional.rotate_first_moment`,
          :func:`~coap_torch.functional.rotate_second_moment`) instead of being reused as if the
          basis had not changed.
        * ``eps`` is added outside the square root, as in torch (Algorithm 2 prints it inside).
        * Rank-deficient gradients get a deterministic subspace, see
          :func:`~coap_torch.functional.low_cost_svd`.

        State is float32 (float64 for float64 parameters) whatever the parameter dtype, unless
        ``state_dtype=torch.bfloat16``; bf16 and fp16 parameters are updated in float32 and
        rounded back once per step. ``step`` is an
        exact int64 counter on the CPU. Complex parameters are refused at construction: their
        real view would put the real and imaginary parts on an axis of their own, which a real
        projection would mix; optimize them with ``torch.optim.AdamW``.
    """

    rule = ADAM

    @with_options(CoapOptions)
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **options: Any,
    ) -> None:
        flags = {"foreach": foreach, "capturable": capturable, "differentiable": differentiable, "fused": fused}
        for name, value in flags.items():
            check.unsupported_flag(name, value, type(self).__name__)
        hyper = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        super().__init__(params, hyper, options)


class CoapAdamW8bit(CoapAdamW):
    r""":class:`CoapAdamW` with its moments stored block-wise quantized to 8 bits.

    Same arguments and defaults as :class:`CoapAdamW`, plus:

    Args:
        block_size: entries per quantization block, each with one float32 absmax (default 256).
        min_8bit_size: moments with fewer entries stay float32 (default 4096).

    The low-rank moments of projected parameters, and the moments of unprojected parameters with
    at least ``min_8bit_size`` entries, are kept as ``exp_avg_codes`` / ``exp_avg_sq_codes``
    (uint8) with ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (float32 per block): a signed dynamic
    code map for the first moment, an unsigned one for the second. ``P`` stays float32 (bfloat16
    with ``state_dtype=torch.bfloat16``, as the moments too small for 8 bits). Each step
    dequantizes, runs the float32 update of :class:`CoapAdamW` (refreshes and the change of basis
    included) and re-quantizes.

    Example:
        >>> model = torch.nn.Linear(256, 512)
        >>> opt = CoapAdamW8bit(model.parameters(), lr=1e-3, rank_ratio_matrix=2)
        >>> model(torch.randn(512, 256)).square().mean().backward()
        >>> opt.step()
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].dtype, tuple(state["exp_avg_codes"].shape), state["proj"].dtype
        (torch.uint8, (512, 128), torch.float32)
    """

    storage = INT8_BLOCKWISE

    @with_options(Int8Options, like=CoapAdamW.__init__)
    def __init__(self, params: ParamsT, *args: Any, **options: Any) -> None:
        super().__init__(params, *args, **options)
