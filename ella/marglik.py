"""The KFAC-Laplace log marginal likelihood with per-path prior precisions.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ella.distributed import all_reduce_curvature
from ella.options import OPTIONAL_COUNT
from ella.priors import Prior
from kfac import CurvatureError, EigenvalueMemo, KronDecomposition, fit_kfac, segment_sum

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
    memo: EigenvalueMemo | None = None,
    **kfac_options,
) -> LaplaceFit:
    """Fit KFAC over ``loader`` (unaugmented data) at the current parameters and eigendecompose it once.

    With ``sharded``, ``loader`` holds this process's shard of the data and the curvature (factors, loss,
    ``n_data``) is summed over all processes before the eigendecomposition, so every process gets the fit of
    the whole data set (see :mod:`ella.distributed`). ``memo`` (kept by the caller from round to round) gives
    the eigenvalues of the wide factors that did not change since an earlier fit, e.g. the first layer's input
    factors (:class:`kfac.EigenvalueMemo`).
    """
    try:
        kron = fit_kfac(model, loader, likelihood=likelihood, curvature=curvature, **kfac_options)
        if sharded:
            kron = all_reduce_curvature(kron)
        decomposition = kron.decompose(memo=memo)
    except CurvatureError as error:
        raise MarglikError(f"the Laplace approximation failed: {error}") from error
    if list(decomposition.block_names) != prior.param_names:
        raise MarglikError(_mismatch(list(decomposition.block_names), prior.param_names))
    loss_sum = float(kron.loss)
    if not math.isfinite(loss_sum):
        raise MarglikError(f"the training loss at the current parameters is not finite ({loss_sum})")
    with torch.no_grad():
        norms = prior.squared_norms(model).detach()
    if not torch.isfinite(norms).all():
        raise MarglikError("the model has non-finite parameters; cannot compute a marginal likelihood")
    params = dict(model.named_parameters())
    sizes = torch.tensor([params[name].numel() for name in prior.param_names], device=norms.device)
    return LaplaceFit(decomposition, loss_sum, int(kron.n_data), norms, sizes)


def _mismatch(curved: list[str], priored: list[str]) -> str:
    """Why the curvature's parameter tensors ``curved`` are not the prior's ``priored`` (both in model order)."""
    extra, missing = [n for n in curved if n not in priored], [n for n in priored if n not in curved]
    if not extra and not missing:
        return "the curvature's parameter tensors are the prior's, but in another order"
    return ("the curvature's parameter tensors are not the prior's: trainable now but without a prior: "
            f"{extra or 'none'}; with a prior but not trainable now: {missing or 'none'} (the prior covers the "
            "parameters trainable when it was built: freeze or unfreeze parameters before training starts)")


Fits = Union[LaplaceFit, Sequence[LaplaceFit]]


class _LogdetSum(torch.autograd.Function):
    """``sum_i log(lambda_i + delta[segment(i)])`` over all eigenvalues, and its gradient in ``delta``.

    Forward computes the value and the per-segment sums ``sum_i 1 / (lambda_i + delta_s)`` (the gradient) in
    one pass over the eigenvalues, so backward is a multiplication; nothing of size ``P`` is kept for it.
    ``delta (S,)``, ``eigenvalues (P,)``, ``lengths (S,)`` (non-negative, summing to ``P``: not checked, so that
    an evaluation never waits for the device; see :func:`kfac.segment_sum`); float64 throughout.
    """

    @staticmethod
    def forward(ctx, delta: torch.Tensor, eigenvalues: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        shifted = eigenvalues + delta.repeat_interleave(lengths, output_size=eigenvalues.numel())
        ctx.save_for_backward(segment_sum(shifted.reciprocal(), lengths))
        return shifted.log_().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse_sums,) = ctx.saved_tensors
        return grad * inverse_sums, None, None


@dataclass
class MarglikObjective:
    """``-log p(D | delta) / N`` of one or several Laplace fits, as a few fused tensor operations.

    The fits' eigenvalues are concatenated once (``eigenvalues (P,)``, fit after fit, tensor after tensor;
    ``lengths (n_fits * n_tensors,)``), so an evaluation costs one pass over them whatever the number of
    tensors. For fits ``t`` with data ``D_t`` the objective is the summed evidence per data point,

        sum_t [ loss_t + 1/2 sum_l delta_l ||theta_tl||^2 + 1/2 sum_l (logdet(H_tl + delta_l I) - P_l log delta_l) ]
        / sum_t N_t,

    which for one fit is the module docstring's formula (the ``2 pi`` terms cancel).
    ``squared_norms (n_tensors,)``: summed over fits; ``n_params (n_tensors,)``: per fit.
    """

    eigenvalues: torch.Tensor
    lengths: torch.Tensor
    loss_sum: float
    squared_norms: torch.Tensor
    n_params: torch.Tensor
    n_fits: int
    n_data: int

    @classmethod
    def from_fits(cls, fits: Fits) -> MarglikObjective:
        fits = [fits] if isinstance(fits, LaplaceFit) else list(fits)
        if not fits:
            raise ValueError("the marginal likelihood needs at least one Laplace fit")
        if len({len(f.n_params) for f in fits}) > 1:
            raise ValueError(f"the Laplace fits are of different models: {[len(f.n_params) for f in fits]} parameter "
                             "tensors")
        decompositions = [f.decomposition for f in fits]
        eigenvalues = (decompositions[0].eigenvalues() if len(fits) == 1
                       else torch.cat([d.eigenvalues() for d in decompositions]))
        lengths = torch.cat([d.segment_lengths() for d in decompositions])
        norms = torch.stack([f.squared_norms for f in fits]).sum(0)
        return cls(eigenvalues, lengths, sum(f.loss_sum for f in fits), norms, fits[0].n_params, len(fits),
                   sum(f.n_data for f in fits))

    def __call__(self, prior: Prior) -> torch.Tensor:
        """``-log p(D | delta) / N`` (lower is better), differentiable in ``prior.log_precision``.

        Evaluated in the eigenvalues' precision (float64) whatever the prior's dtype: the gradient in a log
        precision is a difference of terms of the size of the tensor's parameter count (``P_t / 2`` against
        ``sum_i delta / (lambda_i + delta) / 2``), which float32 would get wrong in the fifth digit.
        """
        return self.value(self.log_precisions(prior))

    def log_precisions(self, prior: Prior) -> torch.Tensor:
        """``(n_tensors,)`` every tensor's log precision in the eigenvalues' dtype: one conversion, so that the
        gradients of all terms built on it add in that precision before they reach the prior."""
        if prior.group_of_tensor.shape != self.n_params.shape:
            raise ValueError(f"the prior covers {prior.group_of_tensor.numel()} parameter tensors but the Laplace fit "
                             f"{self.n_params.numel()}: build the prior for the model that was fitted")
        return prior.log_precision.to(self.eigenvalues)[prior.group_of_tensor]

    def value(self, log_delta: torch.Tensor) -> torch.Tensor:
        """The objective at per-tensor log precisions ``log_delta (n_tensors,)`` (see :meth:`log_precisions`)."""
        delta = log_delta.exp()
        logdet = _LogdetSum.apply(delta.repeat(self.n_fits), self.eigenvalues, self.lengths)
        occam = logdet - self.n_fits * (self.n_params.to(delta) * log_delta).sum()
        return (self.loss_sum + 0.5 * (delta * self.squared_norms.to(delta)).sum() + 0.5 * occam) / self.n_data

    def value_and_grad(self, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective (detached) and its gradient in ``prior.log_precision``, with no host synchronisation."""
        value = self(prior)
        (grad,) = torch.autograd.grad(value, prior.log_precision)
        return value.detach(), grad


def neg_log_marglik(fits: Fits, prior: Prior) -> torch.Tensor:
    """``-log p(D | delta) / N`` of one fit, or of several summed (see :class:`MarglikObjective`); lower is
    better, differentiable in ``prior.log_precision``."""
    return MarglikObjective.from_fits(fits)(prior)


def optimise_prior(fits: Fits, prior: Prior, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Take ``steps`` optimiser steps on the log precisions; return the final ``-log p(D|delta)/N``.

    The objective is built once (:class:`MarglikObjective`) and each step evaluates it and its gradient once
    (the value after a step is the one the next step starts from). Nothing inside the loop waits for the
    device: a step that makes the objective non-finite is undone on the device and every later step of the
    round is then undone too (with zero gradients; the optimiser's moments and step count still advance), and
    a warning says so after the loop. A non-finite objective at the starting precisions raises
    :class:`MarglikError`.
    """
    OPTIONAL_COUNT.check(steps, "steps")
    log_precision = prior.log_precision
    if not any(p is log_precision for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer does not hold the prior's log precisions: build it over prior.parameters(), "
                         "e.g. torch.optim.Adam(prior.parameters(), lr=0.1)")
    objective = MarglikObjective.from_fits(fits)
    value, grad = objective.value_and_grad(prior)
    if not math.isfinite(float(value)):
        raise MarglikError(f"the marginal likelihood is not finite at precisions {prior.as_dict()}")
    stopped = torch.zeros((), dtype=torch.bool, device=value.device)
    for _ in range(steps):
        good = log_precision.detach().clone()
        log_precision.grad = grad
        optimizer.step()
        new_value, new_grad = objective.value_and_grad(prior)
        stopped = stopped | ~torch.isfinite(new_value)
        with torch.no_grad():
            log_precision.copy_(torch.where(stopped, good, log_precision))
        value = torch.where(stopped, value, new_value)
        grad = torch.where(stopped, torch.zeros_like(new_grad), new_grad)
    log_precision.grad = None
    if bool(stopped):
        log.warning("a hyper-step made the marginal likelihood non-finite; undone, and the round's later steps skipped")
    return float(value)


def effective_parameters(fit: LaplaceFit, prior: Prior) -> torch.Tensor:
    """``(n_tensors,)`` MacKay's effective number of parameters of each tensor at the prior's precisions."""
    with torch.no_grad():
        return fit.decomposition.effective_params(prior.tensor_precisions())
