"""What a moment rule tells the low-rank optimizer: its moments, how they move with ``P``, and
how they turn a (projected or dense) gradient into an update.

A rule is a stateless object; the optimizer keeps the moments in its state and hands them in.
The same rule serves projected parameters (the gradient is ``G P``, the moments low-rank) and
dense ones (full-size). :class:`~coap_torch.CoapAdamW` uses :class:`~coap_torch.optim.adamw.AdamRule`,
:class:`~coap_torch.CoapAdafactor` :class:`~coap_torch.optim.adafactor.AdafactorRule`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from ..functional.reduction import Rows, Task

__all__ = ["MomentRule", "Update"]


class Update(NamedTuple):
    """What a rule's step gives: the parameter becomes ``decay(p) + alpha * restore(direction)``.

    ``direction`` is a tensor, or an unformed quotient that a dense parameter applies with
    torch's own operation (:class:`~coap_torch.functional.AdamDirection`); ``decay`` is a factor
    (a float, or a tensor when it depends on the weight) or a function that changes the weight
    in place before the update; ``alpha`` is multiplied by the group's ``scale`` for projected
    parameters.
    """

    direction: Any
    decay: float | Tensor | Callable[[Tensor], Any]
    alpha: float


class MomentRule:
    """The interface; :class:`~coap_torch.optim.adamw.AdamRule` and
    :class:`~coap_torch.optim.adafactor.AdafactorRule` implement it."""

    #: For each moment that lives in the projected space, how it moves to a new basis when ``P``
    #: changes (see :meth:`Layout.rotate`): ``"linear"`` for first moments, ``"squared"`` for
    #: second moments, ``"row"`` / ``"col"`` for Adafactor's factored accumulators.
    rotations: ClassVar[dict[str, str]] = {}
    #: Hyper-parameters an earlier version's checkpoint may lack, with their defaults.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Whether :meth:`update` needs sums over the rows of the gradient (then it is a generator that
    #: takes them from a :class:`~coap_torch.functional.reduction.Rows`: the identity in one
    #: process, all-reduces under FSDP2).
    collective: ClassVar[bool] = False
    #: Whether :meth:`update` of a dense parameter is element-wise (each entry's new moments and
    #: update depend on that entry alone), so that a large dense parameter can be stepped a chunk
    #: of entries at a time (see ``LowRankOptimizer._chunked_dense_step``).
    elementwise: ClassVar[bool] = False

    def check(self, group: dict[str, Any]) -> None:
        """Refuse out-of-range hyper-parameters, naming the argument and the value."""

    def init(self, shape: tuple[int, ...], group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
        """The moments of a (projected or dense) gradient of ``shape``: zeros like ``like``."""
        raise NotImplementedError

    def update(
        self,
        moments: dict[str, Any],
        grad: Tensor,
        group: dict[str, Any],
        step: int,
        weight: Tensor,
        rows: Rows | None = None,
        *,
        rms_fraction: float | None = None,
    ) -> Update | Task[Update]:
        """Update ``moments`` in place from ``grad`` and return the :class:`Update`.

        ``weight`` is the parameter, to read only (in the compute dtype, or for a row shard in
        its own dtype). A :attr:`collective` rule is a generator that takes its sums from
        ``rows``; any other returns the update directly (and is not given ``rows``).
        ``rms_fraction`` is the fraction of the weight's entries a rule that bounds its update's
        RMS takes it over (``None``: all of them; see :meth:`Layout.rms_fraction`).
        """
        raise NotImplementedError

    def refresh_moment(self, moments: dict[str, Any]) -> Tensor | None:
        """The low-rank first moment ``M`` that the Eq. 2 step correlates with; ``None`` when the
        rule keeps none (the optimizer then uses the gradient projected on the previous basis)."""
        return moments.get("exp_avg")

    #: Plain dense tensors stepped together (``torch._foreach_*``): rules that can set this to
    #: ``True`` implement :meth:`bulk_state_ok` and :meth:`bulk_step`.
    bulk: ClassVar[bool] = False

    def bulk_state_ok(self, moments: set[str], group: dict[str, Any]) -> bool:
        """Whether a dense state that holds ``moments`` (their names, however stored) is the
        state :meth:`bulk_step` expects."""
        return False

    def bulk_step(self, params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any], step: int) -> None:
        """Step plain dense ``params`` (their gradients in ``.grad``) that share a step count."""
        raise NotImplementedError
