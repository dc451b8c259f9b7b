"""Marginal-likelihood layer selection on MSR's synthetic translation tasks, and MSR's learned symmetry.

**The model.** A 1-D relaxed layer ``x (B, n) -> y (B, m)`` with ``m = n - K + 1`` and two paths whose
outputs are summed, no bias, no nonlinearity:

- FC path ``nn.Linear(n, m, bias=False)``: weight ``W (m, n)``;
- CONV path: a valid width-K cross-correlation written as ``nn.Conv2d(1, 1, (1, K), bias=False)`` on the
  input viewed as ``(B, 1, 1, n)``: weight ``w (1, 1, 1, K)``.

Each path has one prior precision (``ella.priors.Prior``: groups ``layer.fc`` and ``layer.conv``).

**Meta-training by the marginal likelihood.** Tasks ``t = 1..T`` share the precisions ``delta`` but own
their parameters ``theta_t``. The objective is the Laplace negative log marginal likelihood summed over tasks,

    L(delta) = sum_t N_t * neg_log_marglik(fit_t, prior)        (ella.marglik, per-datapoint value times N_t)
             = sum_t [ r_t + 1/2 sum_l delta_l ||theta_tl||^2 + 1/2 sum_l ( logdet(H_tl + delta_l I) - P_l log delta_l ) ],

with ``r_t = ||y_t - f(x_t)||^2 / (2 sigma^2)`` and ``H_tl`` the KFAC-GGN block of path ``l`` fitted on task
t's data at its MAP ``theta_t``. Rounds alternate (1) the per-task MAP under the current prior, solved in
closed form (the model is linear in its parameters: a ridge regression, see :func:`map_fit`), (2) a KFAC fit per
task (``kfac.fit_kfac`` via ``ella.marglik.fit_laplace``, ``likelihood="regression"``), and (3) Adam steps
on ``log delta`` with every task's curvature and MAP fixed.

**Observation noise.** Fixed, ``sigma^2 = noise_var``. The generator of :mod:`ella.msr.tasks` is noiseless,
so a learned sigma^2 would run to 0 on the rank-1 problem (a convolution explains the data exactly); the
fixed value encodes "nearly deterministic outputs" and sets the scale of the data fit against the prior.
``kfac`` fits the regression likelihood with unit variance (loss ``0.5 ||y - f||^2``); because the model is
linear in its input and has no bias, fitting it on ``(x / sigma, y / sigma)`` gives exactly the loss and GGN
of variance ``sigma^2``. The Gaussian normaliser ``N m / 2 log(2 pi sigma^2)`` is a constant and left out.

For this linear-Gaussian model both KFAC blocks are exact (the FC block is ``I_m (x) X^T X / sigma^2``, the
CONV block ``sum_{n,p} a_{n,p} a_{n,p}^T / sigma^2`` over width-K patches); only the FC-CONV cross term is
dropped (block-diagonal Laplace).

**Effective parameters.** ``n_eff`` of a path is MacKay's ``sum_i lambda_i / (lambda_i + delta_l)``,
averaged over the meta-training tasks; normalised and relative values follow :mod:`ella.report`
(``relative_fc = (n_eff_fc / P_fc) / (n_eff_fc / P_fc + n_eff_conv / P_conv)``). Note that with ``N_t``
examples the FC block has rank at most ``N_t * m``, so even at ``delta_fc = delta_conv`` the FC path's
normalised value is at most ``N_t m / (m n) = N_t / n``.

**Distance of an MSR symmetry matrix to convolution.** ``U (m*n, k)`` (row-wise vec) against the Prop. 1
matrix ``U0 (m*n, K)`` (:func:`ella.msr.conv_symmetry_matrix`) with orthonormal basis ``Q0``:

- ``conv_residual(U) = ||U - Q0 Q0^T U||_F / ||U||_F`` in [0, 1]: 0 iff every column of U lies in the span
  of the convolutions (every weight ``W = U v`` is a convolution); about ``sqrt(1 - K / (m n))`` for a
  Gaussian random U.
- ``conv_coverage_gap(U) = 1 - ||Q_U^T Q0||_F^2 / K`` in [0, 1]: the mean squared sine of the K principal
  angles between span(U0) and span(U); 0 iff every convolution is expressible as ``U v``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ella.layers import RelaxedLayer
from ella.marglik import LaplaceFit, effective_parameters, fit_laplace, optimise_prior
from ella.priors import Prior
from ella.report import PathReport, path_reports

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- model
class FCPath(nn.Module):
    """Dense path: child ``linear: nn.Linear(n, m, bias=False)``; ``(B, 1, 1, n) -> (B, m)``."""

    equivariant = False
    kind = "FC"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class ConvPath(nn.Module):
    """Valid 1-D cross-correlation: child ``conv: nn.Conv2d(1, 1, (1, K), bias=False)``; ``(B, 1, 1, n) -> (B, n-K+1)``."""

    equivariant = True
    kind = "CONV"

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, kernel_size), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


class RelaxedFCConv1d(RelaxedLayer):
    """Linear FC+CONV relaxed layer ``(B, n) -> (B, m)``: the paths' outputs summed (no ReLU, no downsampling).

    A :class:`~ella.layers.RelaxedLayer` (so that :mod:`ella.priors` and :mod:`ella.report` see ``fc`` and
    ``conv`` as two paths of one layer) whose forward is replaced by the plain sum of valid-size outputs.
    """

    def __init__(self, in_features: int = 70, kernel_size: int = 3) -> None:
        if kernel_size > in_features:
            raise ValueError(f"kernel_size={kernel_size} exceeds in_features={in_features}")
        out_features = in_features - kernel_size + 1
        super().__init__({"fc": FCPath(in_features, out_features), "conv": ConvPath(kernel_size)},
                         downsample=False, combine="sum")
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"RelaxedFCConv1d expects (B, {self.in_features}), got {tuple(x.shape)}")
        x = x.view(x.shape[0], 1, 1, self.in_features)
        return self.paths["fc"](x) + self.paths["conv"](x)


class FCConvModel(nn.Module):
    """Single-layer model around :class:`RelaxedFCConv1d` (child ``layer``), ``(B, n) -> (B, m)``."""

    def __init__(self, in_features: int = 70, kernel_size: int = 3) -> None:
        super().__init__()
        self.layer = RelaxedFCConv1d(in_features, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    @property
    def fc_weight(self) -> nn.Parameter:
        return self.layer.paths["fc"].linear.weight

    @property
    def conv_weight(self) -> nn.Parameter:
        return self.layer.paths["conv"].conv.weight

    def set_parameters(self, fc: torch.Tensor, conv: torch.Tensor) -> None:
        """Copy ``fc (m, n)`` and ``conv (K,)`` into the paths."""
        with torch.no_grad():
            self.fc_weight.copy_(fc)
            self.conv_weight.copy_(conv.reshape(self.conv_weight.shape))


def _check_prior(prior: Prior) -> None:
    if [g.path for g in prior.groups] != ["fc", "conv"]:
        raise ValueError(f"expected the prior groups of FCConvModel (fc, conv), got {prior.group_names}")


# ----------------------------------------------------------------------------------------------- MAP
def predict(x: torch.Tensor, fc: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """Batched model output: ``x (T, N, n)``, ``fc (T, m, n)``, ``conv (T, K)`` -> ``(T, N, m)``."""
    patches = x.unfold(-1, conv.shape[-1], 1)  # (T, N, m, K)
    return torch.einsum("tni,toi->tno", x, fc) + torch.einsum("tnok,tk->tno", patches, conv)


def map_fit(
    x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, noise_var: float, kernel_size: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task MAP of the FC+CONV layer, in closed form (computed in float64, returned in ``x.dtype``).

    Minimises ``||Y - X W^T - C(w)||^2 / (2 sigma^2) + delta_fc/2 ||W||^2 + delta_conv/2 ||w||^2`` for every
    task independently, with ``C(w)[n, o] = sum_j P[n, o, j] w_j`` (``P`` the width-K patches). Eliminating W
    (ridge regression, ``lam = sigma^2 delta_fc``, ``G = X X^T + lam I`` of size ``(N, N)``) leaves
    ``lam tr(R^T G^{-1} R) + sigma^2 delta_conv ||w||^2`` with ``R = Y - C(w)``, a K-dimensional quadratic;
    then ``W = R^T G^{-1} X``. Cost ``O(N^3 + N^2 m K)`` per task.
    ``x (T, N, n)``, ``y (T, N, m)``, ``delta (2,)`` = (fc, conv) precisions -> ``fc (T, m, n)``, ``conv (T, K)``.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"map_fit expects x (T, N, n) and y (T, N, m), got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.shape[-1] != x.shape[-1] - kernel_size + 1:
        raise ValueError(f"y has {y.shape[-1]} outputs; a valid width-{kernel_size} conv of {x.shape[-1]} gives "
                         f"{x.shape[-1] - kernel_size + 1}")
    dtype = x.dtype
    x, y = x.double(), y.double()
    delta = delta.detach().double().to(x.device)
    lam = noise_var * delta[0]
    n_ex = x.shape[1]
    gram = x @ x.transpose(1, 2) + lam * torch.eye(n_ex, dtype=x.dtype, device=x.device)  # G (T, N, N)
    patches = x.unfold(-1, kernel_size, 1)  # (T, N, m, K)
    flat = patches.reshape(x.shape[0], n_ex, -1)  # (T, N, m*K)
    g_p = torch.linalg.solve(gram, flat).reshape(patches.shape)  # G^{-1} P_o
    g_y = torch.linalg.solve(gram, y)  # G^{-1} Y
    eye_k = torch.eye(kernel_size, dtype=x.dtype, device=x.device)
    lhs = lam * torch.einsum("tnoj,tnok->tjk", patches, g_p) + noise_var * delta[1] * eye_k
    rhs = lam * torch.einsum("tnoj,tno->tj", patches, g_y)
    conv = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)  # (T, K)
    residual = y - torch.einsum("tnok,tk->tno", patches, conv)
    fc = torch.linalg.solve(gram, residual).transpose(1, 2) @ x  # R^T G^{-1} X, (T, m, n)
    return fc.to(dtype), conv.to(dtype)


def query_mse(
    x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
    delta: torch.Tensor, noise_var: float, kernel_size: int = 3,
) -> torch.Tensor:
    """Meta-test: MAP on the support set (precisions fixed), mean squared query error per task, ``(T,)``."""
    fc, conv = map_fit(x_support, y_support, delta, noise_var, kernel_size)
    return (predict(x_query, fc, conv) - y_query).pow(2).mean(dim=(1, 2))


# ----------------------------------------------------------------------------------------------- Laplace
def task_laplace(model: FCConvModel, prior: Prior, x: torch.Tensor, y: torch.Tensor, noise_var: float) -> LaplaceFit:
    """KFAC-Laplace of one task at the model's current parameters: ``x (N, n)``, ``y (N, m)``, variance ``sigma^2``."""
    scale = 1.0 / math.sqrt(noise_var)
    return fit_laplace(model, [(x * scale, y * scale)], prior, likelihood="regression", curvature="ggn")


def fit_tasks(
    model: FCConvModel, prior: Prior, x: torch.Tensor, y: torch.Tensor, noise_var: float, progress=None
) -> list[LaplaceFit]:
    """MAP (closed form) and KFAC-Laplace of every task ``x (T, N, n)``, ``y (T, N, m)`` under the current prior
    (the fits' summed objective is :func:`ella.marglik.neg_log_marglik` of the list).

    ``progress``: optional callable invoked once per task (e.g. a tqdm ``update``).
    """
    _check_prior(prior)
    fc, conv = map_fit(x, y, prior.precisions(), noise_var, model.layer.kernel_size)
    fits = []
    for t in range(x.shape[0]):
        model.set_parameters(fc[t], conv[t])
        fits.append(task_laplace(model, prior, x[t], y[t], noise_var))
        if progress is not None:
            progress()
    return fits


# ----------------------------------------------------------------------------------------------- meta-training
@dataclass
class MarglikConfig:
    """Meta-training of the path precisions: ``rounds`` x (MAP + KFAC for all tasks, ``hyper_steps`` Adam steps)."""

    rounds: int = 10
    hyper_steps: int = 20
    hyper_lr: float = 0.1
    noise_var: float = 0.01
    init_precision: float = 1.0


@dataclass
class MarglikResult:
    """Learned precisions, effective-parameter report (task-averaged) and the objective per round."""

    precisions: dict[str, float]
    reports: list[PathReport]
    objective: list[float] = field(default_factory=list)

    def relative(self, path: str) -> float:
        return next(r.relative for r in self.reports if r.path == path)


def learn_precisions(
    model: FCConvModel, x: torch.Tensor, y: torch.Tensor, config: MarglikConfig, prior: Prior | None = None,
    progress=None,
) -> tuple[Prior, MarglikResult]:
    """Maximise the summed Laplace marginal likelihood of the meta-training tasks over the path precisions.

    ``x (T, N, n)``, ``y (T, N, m)``. Returns the prior (learned ``log_precision``) and a summary whose
    effective parameters are evaluated at fresh MAPs and curvature under the final precisions.
    ``progress``: optional callable invoked once per task fit.
    """
    prior = Prior(model, init_precision=config.init_precision) if prior is None else prior
    optimizer = torch.optim.Adam([prior.log_precision], lr=config.hyper_lr)
    history = []
    for round_ in range(config.rounds):
        fits = fit_tasks(model, prior, x, y, config.noise_var, progress)
        history.append(optimise_prior(fits, prior, optimizer, config.hyper_steps))
        log.info("round %d: objective %.5f, precisions %s", round_, history[-1], prior.as_dict())
    final = fit_tasks(model, prior, x, y, config.noise_var, progress)
    n_eff = torch.stack([effective_parameters(f, prior) for f in final]).mean(0)
    reports = path_reports(prior, n_eff, final[0].n_params)
    return prior, MarglikResult(prior.as_dict(), reports, history)


# ----------------------------------------------------------------------------------------------- MSR distances
def _orthonormal_basis(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(P, r)`` of the column span of ``u (P, k)`` (rank by a relative SVD tolerance)."""
    left, sing, _ = torch.linalg.svd(u.double(), full_matrices=False)
    tol = sing.max() * max(u.shape) * torch.finfo(torch.float64).eps if sing.numel() else 0.0
    return left[:, sing > tol]


def conv_residual(u: torch.Tensor, u_conv: torch.Tensor) -> float:
    """``||U - Q0 Q0^T U||_F / ||U||_F``: share of U outside the span of the Prop. 1 conv matrix ``u_conv``.

    ``u (P, k)``, ``u_conv (P, K)`` with ``P = m * n``.
    """
    if u.shape[0] != u_conv.shape[0]:
        raise ValueError(f"U has {u.shape[0]} rows, the conv matrix {u_conv.shape[0]}")
    u = u.detach().double()
    q0 = _orthonormal_basis(u_conv)
    residual = u - q0 @ (q0.T @ u)
    return float(residual.norm() / u.norm())


def conv_coverage_gap(u: torch.Tensor, u_conv: torch.Tensor) -> float:
    """``1 - ||Q_U^T Q0||_F^2 / K``: mean squared sine of the principal angles between span(u_conv) and span(U)."""
    if u.shape[0] != u_conv.shape[0]:
        raise ValueError(f"U has {u.shape[0]} rows, the conv matrix {u_conv.shape[0]}")
    q0, qu = _orthonormal_basis(u_conv), _orthonormal_basis(u.detach())
    return float(1.0 - (qu.T @ q0).pow(2).sum() / q0.shape[1])


def generator_symmetry_matrix(connectivity: torch.Tensor, in_features: int, kernel_size: int = 3) -> torch.Tensor:
    """Symmetry matrix of the rank-k translation generator: ``(m * n, k * K)``.

    Column ``(r, j)`` is the row-wise vec of the weight with ``W[p, p + j] = connectivity[p, r]``, so every
    task weight of :class:`ella.msr.TranslationProblem` is ``U_true @ vec(basis filters)``.
    ``connectivity (m, k)``.
    """
    m, rank = connectivity.shape
    if m != in_features - kernel_size + 1:
        raise ValueError(f"connectivity has {m} rows; expected {in_features - kernel_size + 1}")
    u = torch.zeros(m, in_features, rank, kernel_size, dtype=connectivity.dtype)
    rows = torch.arange(m)
    for j in range(kernel_size):
        u[rows, rows + j, :, j] = connectivity
    return u.reshape(m * in_features, rank * kernel_size)


__all__ = [
    "ConvPath",
    "FCConvModel",
    "FCPath",
    "MarglikConfig",
    "MarglikResult",
    "RelaxedFCConv1d",
    "conv_coverage_gap",
    "conv_residual",
    "fit_tasks",
    "generator_symmetry_matrix",
    "learn_precisions",
    "map_fit",
    "predict",
    "query_mse",
    "task_laplace",
]
