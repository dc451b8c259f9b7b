"""Hyper-steps that profile the evidence of bilinear (F-FC, S-FC) paths along their scaling ray (issue 22).

The paper's online alternation (spec 4.2) takes its hyper-steps on ``-log p(D | delta) / N`` at fixed
parameters. For a bilinear path ``out = V (U x + b_U) + b_V`` that objective has spurious fixed points: the
curvature of ``U`` scales with ``|V|^2`` and that of ``V`` with ``|U|^2``, so a larger precision would shrink
the factors *and* the log-determinant, a gain the fixed-parameter objective never sees (``docs/design.md``,
"Known symmetry"). This module profiles that dependence along one direction per path, the *ray*: the path's
factor tensors ``F = (U, b_U, V)`` scaled by ``s``, which scales the path's output (less ``b_V``) by
``t = s^2``. Along the ray the evidence is *modelled* from the one KFAC fit of the round; what is exact and
what is a model:

- every KFAC eigenvalue of a factor tensor is taken to scale by ``t`` (``U``'s output-side factor is built
  from gradients that pass through ``V``, ``V``'s input-side factor from ``U x + b_U``). That is exact only
  where the path's output feeds a Gaussian likelihood directly (the path in the last layer of a regression,
  with or beside other paths: the backpropagated factors then do not depend on the weights; tested to float64
  round-off). With a nonlinearity, later layers or a softmax after the path, the KFAC factors refitted at the
  scaled weights also change through the backpropagated gradients, by an amount of the order of ``|t - 1|``
  itself (a tanh and a softmax after an F-FC path: 1-2% at ``s = 0.99``, 60-190% at ``s = 0.5`` and ``1.7``;
  tested as a bound): there the ray is a first-order model, trustworthy for small moves only;
- the data fit is modelled to second order in ``t``: its slope at ``t = 1`` is ``a = -1/2 sum_f delta0_f q_f``
  (the parameters are taken as the MAP at the precisions ``delta0`` they were trained with, as the Laplace
  approximation does; ``q_f = ||theta_f||^2``: exact after a converged MAP fit, a model after a few epochs of
  online training), its curvature ``b = vec(V)^T GGN_V vec(V)``, the GGN quadratic form of the path's output,
  from ``V``'s KFAC block (``V`` enters linearly, so moving along ``V`` moves the output exactly as ``t``
  does; the fit is exactly quadratic in ``t`` only in the Gaussian last-layer case above);
- the MAP is followed along the ray only: the refitted MAP at new precisions also moves off the ray (the path's
  channel pairs shrink unevenly, other paths compensate), so the ray objective is the Laplace evidence at the
  best point of one line, not at the refitted MAP;
- so the MAP along the ray at precisions ``delta`` is ``1 - sum_f (delta_f - delta0_f) q_f / (2 b)``, taken
  within ``[min_scale, 1]``: ``t*`` stays 1 where the precisions fall below ``delta0``, and one round moves a
  path at most to ``t* = min_scale`` (a trust region, :data:`RAY_MIN_SCALE` by default; ``min_scale = 0`` lets a
  round switch a path off outright). The ray profiles only what the fixed-parameter objective misses, the gain
  of *shrinking* a path; growing one is left to training. (Unclamped, the slope taken from the MAP condition
  predicts unbounded growth wherever ``b`` is small and the parameters are not near a MAP, e.g. a few epochs
  after a round that raised ``delta0``: on the multi-group CPU preset ``t*`` reached 193 and the objective
  ``-1982``.)

The hyper-steps then minimise (by L-BFGS on the log precisions, see :func:`optimise_prior_ray`) the
*ray-profiled* objective

    -log p(D | delta) / N  +  (1/N) sum_paths [ a (t* - 1) + b (t* - 1)^2 / 2 + 1/2 sum_f (t* - 1) delta_f q_f
                                                + 1/2 sum_f sum_i ( log(t* lambda_fi + delta_f) - log(lambda_fi + delta_f) ) ],

which equals the fixed-parameter objective at ``t* = 1`` and otherwise models the Laplace evidence at the ray's
MAP (exactly so in the Gaussian last-layer case).
Only the precisions change; the parameters are left to the next training epochs (or MAP fit), as in the
alternation. Other paths, biases ``b_V`` and head layers are treated as in the alternation, where the
fixed-parameter optimum is also a stationary point of the evidence.

Cost: one KFAC fit per round, as the alternation, plus a few eigenvalue sums per objective evaluation. Every rank of a
data-parallel run computes the same rays from the all-reduced fit and the same parameters, so the precisions
stay in sync without communication.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ella.layers import FactoredFC, SparseFC
from ella.marglik import LaplaceFit, MarglikError, MarglikObjective, optimise_prior
from ella.priors import Prior
from kfac.decomposition import BlockEigen

log = logging.getLogger(__name__)

RAY_MIN_SCALE = 0.5
"""Default trust region of a round: the least ``t*`` a round may move a path to (see :meth:`Ray.scale`)."""
MARGLIK_METHODS = ("alternation", "ray")
"""``alternation``: the paper's fixed-parameter hyper-steps; ``ray``: this module's ray-profiled steps."""
METHOD_CAPTIONS = {
    "alternation": "precisions learned by the paper's alternation (Adam steps at fixed parameters)",
    "ray": "precisions learned on the evidence profiled along each F-FC / S-FC path's scaling ray (ella.bilinear_ray)",
}
"""One line per method for reports."""

BILINEAR_PATHS = (FactoredFC, SparseFC)
"""Path types whose output (less ``stage_v.bias``) is bilinear in ``(stage_u, stage_v.weight)``."""
FACTOR_TENSORS = ("stage_u.weight", "stage_u.bias", "stage_v.weight")
"""Tensors scaled by ``s`` along a bilinear path's ray (``U``, ``b_U``, ``V``; anchor values for S-FC)."""
OUTPUT_FACTOR = "stage_v.weight"
"""The factor the path's output is linear in; its KFAC quadratic form is the ray's curvature ``b``."""


@dataclass(frozen=True)
class Ray:
    """One bilinear path's ray at the start of a round.

    ``tensors``: ``(F,)`` indices of the factor tensors in ``model.named_parameters()`` order;
    ``squared_norms``, ``start_precisions``: ``(F,)`` float64 ``q_f`` and ``delta0_f``; ``curvature``: ``b``;
    ``min_scale``: the round's trust region, the least ``t*`` (0: none).
    """

    path: str
    tensors: tuple[int, ...]
    squared_norms: torch.Tensor
    start_precisions: torch.Tensor
    curvature: float
    min_scale: float

    def scale(self, delta: torch.Tensor) -> torch.Tensor:
        """``t*`` at per-tensor precisions ``delta (n_tensors,)`` (float64, in ``[min_scale, 1]``). Differentiable;
        at ``delta0`` itself, where every round starts, the derivative is the ray's (shrinking) side.

        The trust region keeps the modelled point where the model is close: behind a nonlinearity the
        eigenvalue scaling is first order in ``t - 1``, and in online training the next epochs start from
        parameters that a far move leaves far from the MAP the slope assumes. Beyond it the objective is the
        evidence at the point ``t = min_scale`` of the ray, a path can still be switched off over rounds
        (``min_scale ** rounds``)."""
        shift = ((delta[list(self.tensors)] - self.start_precisions) * self.squared_norms).sum()
        t = 1.0 - shift / (2.0 * self.curvature)
        return torch.where(t > 1.0, torch.ones_like(t), t).clamp_min(self.min_scale)


def kron_quadratic_form(eigen: BlockEigen, weight: torch.Tensor) -> float:
    """``vec(W)^T GGN vec(W)`` of a tensor in its own KFAC block (summed over the data, factor eigenvalues
    clamped at 0 as in the log-determinant).

    ``weight`` in the block's layout: ``(o,)`` for a one-factor block, ``(O, K, I)`` (any shape that flattens
    to it) for ``K`` groups of ``O x I`` blocks ``B_k (x) A_k`` (``K = 1``: ``(O, I)``, a plain Kronecker block).
    """
    beta = eigen.out_vals.clamp_min(0.0)
    w = weight.detach().to(eigen.out_vecs)
    if eigen.in_vals is None:
        rotated = eigen.out_vecs[0].T @ w.reshape(-1)
        return float((beta[0] * rotated**2).sum())
    groups, inputs = eigen.in_vals.shape
    outputs = beta.shape[1]
    blocks = w.reshape(outputs, groups, inputs).transpose(0, 1)  # (K, O, I)
    rotated = eigen.out_vecs.transpose(-1, -2) @ blocks @ eigen.in_vecs  # broadcast over a shared output factor
    lam = beta[:, :, None] * eigen.in_vals.clamp_min(0.0)[:, None, :]
    return float((lam * rotated**2).sum())


def bilinear_rays(model: nn.Module, prior: Prior, fit: LaplaceFit, min_scale: float = RAY_MIN_SCALE) -> list[Ray]:
    """The ray of every bilinear path of ``model`` with a nonzero output, from the round's fit, with the trust
    region ``min_scale`` (:meth:`Ray.scale`).

    A path whose output is numerically zero (``b`` not positive, or ``q / b`` not finite) has no ray: it is
    already switched off, and its precision is left to the fixed-parameter terms.
    """
    position = {name: i for i, name in enumerate(prior.param_names)}
    params = dict(model.named_parameters())
    delta0 = prior.tensor_precisions(torch.float64).detach()
    rays = []
    for prefix, module in model.named_modules():
        if not isinstance(module, BILINEAR_PATHS):
            continue
        index = tuple(position[f"{prefix}.{t}"] for t in FACTOR_TENSORS)
        outer = f"{prefix}.{OUTPUT_FACTOR}"
        norms = fit.squared_norms[list(index)].double()
        curvature = kron_quadratic_form(fit.decomposition.eigen[position[outer]], params[outer])
        if not (curvature > 0 and torch.isfinite(norms / curvature).all()):
            continue
        rays.append(Ray(prefix, index, norms.to(delta0.device), delta0[list(index)], curvature, min_scale))
    return rays


def _ray_terms(fit: LaplaceFit, ray: Ray, delta: torch.Tensor) -> torch.Tensor:
    """The path's change of ``-log p(D | delta)`` (not divided by ``N``) when moving from ``t = 1`` to ``t*``."""
    t = ray.scale(delta)
    d = delta[list(ray.tensors)]
    slope = -0.5 * (ray.start_precisions * ray.squared_norms).sum()
    value = slope * (t - 1) + 0.5 * ray.curvature * (t - 1) ** 2 + 0.5 * ((t - 1) * d * ray.squared_norms).sum()
    for k, l in enumerate(ray.tensors):
        lam = fit.decomposition.block_eigenvalues(l).to(d)  # cached: not formed again at every evaluation
        value = value + 0.5 * (torch.log(t * lam + d[k]) - torch.log(lam + d[k])).sum()
    return value


def ray_neg_log_marglik(fit: LaplaceFit, prior: Prior, rays: list[Ray]) -> torch.Tensor:
    """``-log p(D | delta) / N`` with every ray's path at its MAP along the ray (see the module docstring);
    differentiable in ``prior.log_precision``; equals :func:`~ella.marglik.neg_log_marglik` without rays."""
    objective = MarglikObjective.from_fits(fit)
    log_delta = objective.log_precisions(prior)  # one float64 conversion for all terms (see MarglikObjective)
    value = objective.value(log_delta)
    if not rays:
        return value
    change = sum(_ray_terms(fit, ray, log_delta.exp()) for ray in rays)
    return value + change / fit.n_data


def optimise_prior_ray(fit: LaplaceFit, prior: Prior, model: nn.Module, steps: int,
                       on_step: Callable[[], None] | None = None, min_scale: float = RAY_MIN_SCALE) -> float:
    """Minimise :func:`ray_neg_log_marglik` over the log precisions by L-BFGS (``steps`` iterations, strong-Wolfe
    line search), with the rays of ``model``'s bilinear paths at the round's ``fit`` and the trust region
    ``min_scale`` (:meth:`Ray.scale`); returns the final objective.
    ``on_step``: called once per iteration, ``steps`` times in all (a progress bar; the iterations L-BFGS did not
    need, having converged, are reported at its end).

    The objective of a round is deterministic and cheap, so it is minimised afresh every round; Adam steps with
    a state carried over rounds (the alternation's) move slowly after a round with large gradients, which the
    ray's switch-off threshold produces. The parameters are not changed: the next training epochs (or MAP fit)
    refit them at the new precisions. A non-finite objective at the starting precisions raises
    :class:`MarglikError`; a minimisation that ends non-finite is undone (with a warning).
    """
    rays = bilinear_rays(model, prior, fit, min_scale)
    with torch.no_grad():
        start_value = float(ray_neg_log_marglik(fit, prior, rays))
    if not math.isfinite(start_value):
        raise MarglikError(f"the marginal likelihood is not finite at precisions {prior.as_dict()}")
    start = prior.log_precision.detach().clone()
    optimizer = torch.optim.LBFGS([prior.log_precision], max_iter=steps, line_search_fn="strong_wolfe")
    reported = 0

    def report_iterations(done: int) -> None:
        nonlocal reported
        while on_step is not None and reported < done:
            reported += 1
            on_step()

    def closure() -> torch.Tensor:
        report_iterations(optimizer.state[prior.log_precision].get("n_iter", 1) - 1)  # iterations completed
        optimizer.zero_grad()
        value = ray_neg_log_marglik(fit, prior, rays)
        value.backward()
        return value

    optimizer.step(closure)
    report_iterations(steps)  # the rest at once where L-BFGS converged early
    with torch.no_grad():
        value = float(ray_neg_log_marglik(fit, prior, rays))
        if not (math.isfinite(value) and torch.isfinite(prior.log_precision).all()):
            log.warning("the ray-profiled hyper-steps ended non-finite; undone, precisions kept")
            prior.log_precision.copy_(start)
            return start_value
        delta = prior.tensor_precisions(torch.float64)
        scales = [float(ray.scale(delta)) for ray in rays]
    log.info("MAP along the rays at the new precisions, t*: %s", {r.path: round(t, 4) for r, t in zip(rays, scales)})
    return value


def optimise_precisions(method: str, fit: LaplaceFit, prior: Prior, model: nn.Module,
                        optimizer: torch.optim.Optimizer, steps: int, min_scale: float = RAY_MIN_SCALE) -> float:
    """One round's hyper-steps by ``method`` (:data:`MARGLIK_METHODS`) on the round's ``fit`` of ``model``;
    returns the final objective, ``-log p(D | delta) / N`` (for ``ray``: at the MAP along the rays).

    ``alternation``: ``steps`` steps of ``optimizer`` (the paper's Adam, its state kept across rounds);
    ``ray``: ``steps`` L-BFGS iterations (:func:`optimise_prior_ray` with the trust region ``min_scale``;
    ``optimizer`` takes no step, but the step hooks registered on it, e.g. a progress bar's, run after every
    iteration).
    """
    if method == "alternation":
        return optimise_prior(fit, prior, optimizer, steps)
    if method == "ray":
        def on_step() -> None:
            for hook in list(optimizer._optimizer_step_post_hooks.values()):  # torch keeps them in this dict
                hook(optimizer, (), {})

        return optimise_prior_ray(fit, prior, model, steps, on_step, min_scale)
    raise ValueError(f"marglik_method must be one of {MARGLIK_METHODS}, got {method!r}")
