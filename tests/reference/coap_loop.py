"""A slow, literal float64 transcription of COAP: the oracle the optimizers are tested against.

Algorithm 2 (COAP-AdamW, for matrices and, by Tucker-2, for conv kernels) and our reading of
Algorithm 1 (COAP-Adafactor, whose printed listing is garbled), one parameter at a time, written
from the paper and the library's documented departures alone. Nothing here comes from
``coap_torch.functional``: the Eq. 2 gradient is autograd on the objective as printed (Eq. 1/2),
the range finder's small SVD is a full ``torch.linalg.svd``, Tucker-2 products are ``einsum``\\ s.
Only two conventions are shared, because a reference run must see the same inputs: the first
sketch is drawn from the generator seeded with ``sketch_seed(seed, index)`` (documented), and
the defaults of the safeguards (the Eq. 2 gradient clipped to norm 1, re-orthonormalisation
above a defect of 1e-3).

The documented departures from the printed paper that this transcription follows:

* the Eq. 2 step descends the objective's gradient (the printed Eq. 3/7 flip a sign);
* the gradient of Eq. 2 is clipped to ``max_norm`` and a step that was clipped or left
  ``max |P^T P - I| > tol`` is re-orthonormalised (QR with a non-negative diagonal);
* after a change of ``P`` the moments are expressed in the new basis (``M R``, ``V (R∘R)``,
  ``R = P_old^T P_new``);
* ``eps`` outside the square root; Tucker-2 ranks ``floor(O / sqrt(a))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from coap_torch.optim._refresh import sketch_seed

F64 = torch.float64


# -- the subspace ------------------------------------------------------------------------------
def objective(P: Tensor, G: Tensor, M: Tensor) -> Tensor:
    """Eq. 2: ``MSE(G P P^T, G) * (1 - CosSim(M P^T, G))``, the cosine row by row, averaged
    (a row of zero norm has cosine 0)."""
    G_hat, M_hat = G @ P @ P.T, M @ P.T
    mse = ((G_hat - G) ** 2).mean()
    cosines = []
    for m_row, g_row in zip(M_hat, G):
        norms = m_row.norm() * g_row.norm()
        cosines.append(m_row @ g_row / norms if norms > 0 else torch.zeros((), dtype=F64))
    return mse * (1 - torch.stack(cosines).mean())


def _qr_positive(A: Tensor) -> Tensor:
    Q, R = torch.linalg.qr(A)
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


def eq2_step(P: Tensor, G: Tensor, M: Tensor, *, lr: float = 0.1, max_norm: float = 1.0, tol: float = 1e-3) -> Tensor:
    """One gradient-descent step on Eq. 2, by autograd, with the clip and the retraction."""
    P_var = P.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(P_var, G, M), P_var)
    clipped = grad.norm() > max_norm
    if clipped:
        grad = grad * (max_norm / grad.norm())
    P_new = P - lr * grad
    defect = (P_new.T @ P_new - torch.eye(P.shape[1], dtype=F64)).abs().max()
    return _qr_positive(P_new) if clipped or defect > tol else P_new


def low_cost_svd(G: Tensor, rank: int, sketch: Tensor) -> Tensor:
    """The randomized range finder with test matrix ``sketch``: ``Y = G Omega``, ``Q R = Y``,
    ``U S V^T = Q^T G``, ``P = V[:, :rank]`` (signs as the SVD gives them: the weights do not
    depend on them, as the moments move with ``P``)."""
    Q, _ = torch.linalg.qr(G @ sketch)
    _, _, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
    return Vh[:rank].T


def first_sketch(shape: tuple[int, int], seed: int, index: int) -> Tensor:
    generator = torch.Generator().manual_seed(sketch_seed(seed, index))
    return torch.randn(shape, generator=generator, dtype=F64)


# -- Tucker-2 ----------------------------------------------------------------------------------
def project(G: Tensor, P_O: Tensor, P_I: Tensor) -> Tensor:
    return torch.einsum("oikl,or,is->rskl", G, P_O, P_I)


def restore(C: Tensor, P_O: Tensor, P_I: Tensor) -> Tensor:
    return torch.einsum("rskl,or,is->oikl", C, P_O, P_I)


def unfold(X: Tensor, mode: int) -> Tensor:
    return X.movedim(mode, 0).reshape(X.shape[mode], -1)


def coordinates(full: Tensor, P: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` fibres of ``full`` in the basis ``P`` (least squares, no orthonormality assumed)."""
    return unfold(full, mode).T @ P @ torch.linalg.inv(P.T @ P)


# -- one parameter -----------------------------------------------------------------------------
@dataclass
class Schedule:
    update_interval: int
    reproject_factor: int
    seed: int = 0
    index: int = 0  # the parameter's index in the optimizer: it seeds the first sketch

    def refresh(self, t: int) -> str | None:
        if t > 1 and t % self.update_interval == 0:
            return "svd" if t % (self.update_interval * self.reproject_factor) == 0 else "eq2"
        return None


@dataclass
class AdamW:
    """Algorithm 2 on one matrix (P on its smaller side) or one conv kernel (Tucker-2)."""

    weight: Tensor
    schedule: Schedule
    rank: int | tuple[int, int]
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    t: int = 0
    factors: list[Tensor] = field(default_factory=list)
    M: Tensor | None = None
    V: Tensor | None = None

    def step(self, G: Tensor) -> None:
        self.t += 1
        conv = G.dim() == 4
        wide = not conv and G.shape[0] < G.shape[1]
        G = G.T if wide else G
        kind = self.schedule.refresh(self.t)
        if self.t == 1:
            self.factors = _first_factors(G, self.rank, self.schedule)
            shape = project(G, *self.factors).shape if conv else (G.shape[0], self.rank)
            self.M, self.V = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
        elif kind is not None:
            new = _refreshed(G, self.M, self.factors, kind, self.rank)
            self.M, self.V = _rotated(self.M, self.V, self.factors, new, conv)
            self.factors = new
        R_t = project(G, *self.factors) if conv else G @ self.factors[0]
        beta1, beta2 = self.betas
        self.M = beta1 * self.M + (1 - beta1) * R_t
        self.V = beta2 * self.V + (1 - beta2) * R_t**2
        direction = (self.M / (1 - beta1**self.t)) / ((self.V / (1 - beta2**self.t)).sqrt() + self.eps)
        update = restore(direction, *self.factors) if conv else direction @ self.factors[0].T
        self.weight = self.weight * (1 - self.lr * self.weight_decay) - self.lr * (update.T if wide else update)


@dataclass
class Adafactor:
    """Our reading of Algorithm 1 on one matrix: Adafactor's factored second moment, update
    clipping on the restored update's RMS, a manual lr (times the weight's RMS with
    ``scale_parameter``), and a first moment when ``beta1`` is set, all in the projected space."""

    weight: Tensor
    schedule: Schedule
    rank: int
    lr: float = 1e-2
    beta1: float | None = 0.9
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    weight_decay: float = 0.0
    scale_parameter: bool = False
    t: int = 0
    factors: list[Tensor] = field(default_factory=list)
    M: Tensor | None = None
    row: Tensor | None = None
    col: Tensor | None = None

    def step(self, G: Tensor) -> None:
        self.t += 1
        wide = G.shape[0] < G.shape[1]
        G = G.T if wide else G
        m, n = G.shape
        kind = self.schedule.refresh(self.t)
        if self.t == 1:
            self.factors = _first_factors(G, self.rank, self.schedule)
            self.M = torch.zeros(m, self.rank, dtype=F64)
            self.row, self.col = torch.zeros(m, dtype=F64), torch.zeros(self.rank, dtype=F64)
        elif kind is not None:
            # Without a first moment, Eq. 2 correlates with the gradient in the old basis.
            moment = self.M if self.beta1 is not None else G @ self.factors[0]
            new = _refreshed(G, moment, self.factors, kind, self.rank)
            R = self.factors[0].T @ new[0]
            self.M, self.col = self.M @ R, self.col @ R**2  # the row accumulator is indexed by m: kept
            self.factors = new
        P = self.factors[0]
        Gp = G @ P
        beta2t = 1 - self.t**self.decay_rate
        U = Gp**2 + self.eps[0]
        self.row = beta2t * self.row + (1 - beta2t) * U.mean(dim=1)
        self.col = beta2t * self.col + (1 - beta2t) * U.mean(dim=0)
        delta = Gp / torch.outer(self.row / self.row.mean(), self.col).sqrt()
        delta = delta / max(1.0, (delta.norm() / math.sqrt(m * n) / self.clip_threshold).item())
        rho = self.lr * (
            max(self.eps[1], (self.weight.norm() / math.sqrt(m * n)).item()) if self.scale_parameter else 1.0
        )
        delta = rho * delta
        if self.beta1 is not None:
            self.M = self.beta1 * self.M + (1 - self.beta1) * delta
            delta = self.M
        self.weight = self.weight - self.weight_decay * rho * self.weight
        update = delta @ P.T
        self.weight = self.weight - (update.T if wide else update)


def _first_factors(G: Tensor, rank: int | tuple[int, int], schedule: Schedule) -> list[Tensor]:
    if G.dim() == 4:
        # One generator for both modes, in order: P_O then P_I.
        generator = torch.Generator().manual_seed(sketch_seed(schedule.seed, schedule.index))
        factors = []
        for mode, r in zip((0, 1), rank):
            matrix = unfold(G, mode).T
            sketch = torch.randn((matrix.shape[1], r), generator=generator, dtype=F64)
            factors.append(low_cost_svd(matrix, r, sketch))
        return factors
    return [low_cost_svd(G, rank, first_sketch((G.shape[1], rank), schedule.seed, schedule.index))]


def _refreshed(G: Tensor, M: Tensor, factors: list[Tensor], kind: str, rank: int | tuple[int, int]) -> list[Tensor]:
    if G.dim() == 4:
        P_O, P_I = factors
        full = restore(M, P_O, P_I)
        pairs = [(unfold(G, 0).T, coordinates(full, P_O, 0)), (unfold(G, 1).T, coordinates(full, P_I, 1))]
        return [
            low_cost_svd(matrix, P.shape[1], P) if kind == "svd" else eq2_step(P, matrix, moment)
            for (matrix, moment), P in zip(pairs, factors)
        ]
    P = factors[0]
    return [low_cost_svd(G, rank, P) if kind == "svd" else eq2_step(P, G, M)]


def _rotated(M: Tensor, V: Tensor, old: list[Tensor], new: list[Tensor], conv: bool) -> tuple[Tensor, Tensor]:
    rotations = [P_old.T @ P_new for P_old, P_new in zip(old, new)]
    if conv:
        R_O, R_I = rotations
        return (
            torch.einsum("rskl,ra,sb->abkl", M, R_O, R_I),
            torch.einsum("rskl,ra,sb->abkl", V, R_O**2, R_I**2),
        )
    (R,) = rotations
    return M @ R, V @ R**2
