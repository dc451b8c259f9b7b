"""The KFAC-Laplace log marginal likelihood with per-path prior precisions (spec sections 4.3, 5.7).

With parameters ``theta`` fixed at the current iterate, KFAC blocks eigendecomposed once, and per-tensor
precisions ``delta_t`` (taken from the prior's per-path log precisions), the objective per data point is

    -log p(D | delta) / N = ( sum_n loss_n + 1/2 sum_t delta_t ||theta_t||^2
                              + 1/2 sum_t [ logdet(GGN_t + delta_t I) - P_t log delta_t ] ) / N,

the ``2 pi`` terms cancelling. It is differentiable in the log precisions, so many cheap hyper-steps can follow
one curvature fit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ella.distributed import all_reduce_curvature
from ella.priors import Prior
from kfac import CurvatureError, KronDecomposition, fit_kfac

log = logging.getLogger(__name__)


class MarglikError(RuntimeError):
    """The marginal likelihood could not be computed (non-finite values, failed decomposition, mismatch)."""


@dataclass
class LaplaceFit:
    """A KFAC-Laplace approximation at fixed parameters.

    ``squared_norms``, ``n_params``: ``(n_tensors,)`` per parameter tensor in ``model.named_parameters()`` order.
    """

    decomposition: KronDecomposition
    loss_sum: float
    n_data: int
    squared_norms: torch.Tensor
    n_params: torch.Tensor


def fit_laplace(
    model: nn.Module,
    loader,
    prior: Prior,
    likelihood: str = "classification",
    curvature: str = "ggn",
    sharded: bool = False,
    **kfac_options,
) -> LaplaceFit:
    """Fit KFAC over ``loader`` (unaugmented data) at the current parameters and eigendecompose it once.

    With ``sharded``, ``loader`` holds this process's shard of the data and the curvature (factors, loss,
    ``n_data``) is summed over all processes before the eigendecomposition, so every process gets the fit of
    the whole data set (see :mod:`ella.distributed`).
    """
    try:
        kron = fit_kfac(model, loader, likelihood=likelihood, curvature=curvature, **kfac_options)
        if sharded:
            kron = all_reduce_curvature(kron)
        decomposition = kron.decompose()
    except CurvatureError as error:
        raise MarglikError(f"the Laplace approximation failed: {error}") from error
    if list(decomposition.block_names) != prior.param_names:
        raise MarglikError(
            "curvature blocks do not match the model's parameters: "
            f"{list(decomposition.block_names)[:4]}... vs {prior.param_names[:4]}..."
        )
    loss_sum = float(kron.loss)
    if not math.isfinite(loss_sum):
        raise MarglikError(f"the training loss at the current parameters is not finite ({loss_sum})")
    with torch.no_grad():
        norms = prior.squared_norms(model).detach()
    if not torch.isfinite(norms).all():
        raise MarglikError("the model has non-finite parameters; cannot compute a marginal likelihood")
    sizes = torch.tensor([p.numel() for p in model.parameters()], device=norms.device)
    return LaplaceFit(decomposition, loss_sum, int(kron.n_data), norms, sizes)


def neg_log_marglik(fit: LaplaceFit, prior: Prior) -> torch.Tensor:
    """``-log p(D | delta) / N`` (lower is better), differentiable in ``prior.log_precision``."""
    delta = prior.tensor_precisions()
    log_delta = prior.log_precision[prior.group_of_tensor]
    norms = fit.squared_norms.to(delta)
    logdet = fit.decomposition.logdet(delta).sum()
    sizes = fit.n_params.to(delta)
    value = fit.loss_sum + 0.5 * (delta * norms).sum() + 0.5 * (logdet - (sizes * log_delta).sum())
    return value / fit.n_data


def optimise_prior(fit: LaplaceFit, prior: Prior, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Take ``steps`` optimiser steps on the log precisions; return the final ``-log p(D|delta)/N``.

    A step that makes the objective non-finite is undone and ends the round (with a warning); a non-finite
    objective at the starting precisions raises :class:`MarglikError`.
    """
    with torch.no_grad():
        value = float(neg_log_marglik(fit, prior))
    if not math.isfinite(value):
        raise MarglikError(f"the marginal likelihood is not finite at precisions {prior.as_dict()}")
    for step in range(steps):
        good = prior.log_precision.detach().clone()
        optimizer.zero_grad()
        neg_log_marglik(fit, prior).backward()
        optimizer.step()
        with torch.no_grad():
            new = float(neg_log_marglik(fit, prior))
        if not math.isfinite(new):
            log.warning("hyper-step %d made the marginal likelihood non-finite; undone, round ended", step)
            with torch.no_grad():
                prior.log_precision.copy_(good)
            break
        value = new
    return value


def effective_parameters(fit: LaplaceFit, prior: Prior) -> torch.Tensor:
    """``(n_tensors,)`` MacKay's effective number of parameters of each tensor at the prior's precisions."""
    with torch.no_grad():
        return fit.decomposition.effective_params(prior.tensor_precisions())
