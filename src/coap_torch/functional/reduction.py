"""How a computation takes sums over the rows of the matrices it reads.

The refreshes of ``P`` (the low-cost SVD, the Eq. 2 step) and Adafactor's statistics need sums
over all rows of a gradient: its Gram matrices, ``||G||^2``, the column means. In one process
the rows are all here and a sum is the tensor itself; under FSDP2 each rank holds some rows and
the sums are all-reduced. Each of these computations is written once, as a generator that asks
a :class:`Rows` for its sums (``sums = yield from rows.sum(a, b)``), so that one process and
every world size run the same code.

:data:`LOCAL` is the one-process :class:`Rows`: it never yields, and :func:`run_local` runs a
computation with it to completion. The FSDP2 one is
:class:`~coap_torch.optim._sharded.ShardComm`, whose requests are coalesced across parameters.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["LOCAL", "Rows", "Task", "run_local"]

T = TypeVar("T")

#: A computation that may wait for sums: it yields requests and is sent their results.
Task = Generator[Any, Any, T]


class Rows:
    """The rows of the matrices a computation reads are all in this process: sums are the tensors.

    A computation asks for three kinds of sums (:meth:`reduce`), because under FSDP2 they are
    split differently (:class:`~coap_torch.optim._sharded.ShardComm`):

    * ``sums``: over the rows of its matrices (a Gram matrix ``Y^T Y``, a column sum);
    * ``totals``: over every entry of a moment-shaped tensor (the RMS of an update);
    * ``weight``: over every entry of the parameter itself (its RMS, for Adafactor's scaling).

    Here every one of them is the tensor itself.
    """

    #: Whether sums are immediate (nothing waits, so nothing needs freeing before a sum).
    local: bool = True

    def reduce(
        self, sums: tuple[Tensor, ...] = (), totals: tuple[Tensor, ...] = (), weight: tuple[Tensor, ...] = ()
    ) -> Task[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """The three kinds of sums of this process's partial sums, in one round:
        ``(a,), (b,), (c,) = yield from rows.reduce((a,), (b,), (c,))``."""
        return list(sums), list(totals), list(weight)
        yield  # a generator that never waits

    def sum(self, *tensors: Tensor) -> Task[list[Tensor]]:
        """The sums over all rows of per-row-block partial sums: ``a, b = yield from rows.sum(a, b)``."""
        sums, _, _ = yield from self.reduce(sums=tensors)
        return sums

    def finite(self, *tensors: Tensor) -> Task[bool]:
        """Whether every entry of ``tensors`` is finite on every process (one host sync).

        Where the rows of a matrix are split, its sums tell (a Gram matrix of non-finite rows is
        not finite) and this answers ``True`` without waiting."""
        return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        yield

    def any_nonzero(self, values: Tensor) -> Task[bool]:
        """Whether some entry of ``values`` is non-zero on some process (one host sync).

        ``values`` are per-matrix results (singular values): computed from sums, they are the
        same on every process; where each process holds whole matrices of its own, the answer
        is counted over the processes."""
        return bool(values.ne(0).any())
        yield

    def orthonormal_basis(self, Y: Tensor) -> Task[Tensor | None]:
        """Orthonormal columns spanning those of ``Y`` (..., m, r) (Householder QR here), or ``None``
        when that cannot be computed from finite values (never here: a QR of non-finite input
        is non-finite, and the caller checks)."""
        return torch.linalg.qr(Y)[0]
        yield

    def count(self, matrix: Tensor) -> int:
        """The number of rows of the whole matrix (``matrix`` holds this process's rows)."""
        return matrix.shape[-2]

    def numel(self, tensor: Tensor) -> int:
        """The number of entries of the whole parameter (``tensor`` holds this process's part of it)."""
        return tensor.numel()


#: Sums in one process: the identity, and never a wait.
LOCAL = Rows()


def run_local(task: Task[T]) -> T:
    """Run a computation that needs no collective to its result."""
    try:
        request = next(task)
    except StopIteration as done:
        return done.value
    task.close()
    raise RuntimeError(f"a one-process computation asked for a collective ({request!r})")
