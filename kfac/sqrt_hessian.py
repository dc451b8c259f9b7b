"""Per-sample square roots of the loss Hessian w.r.t. the network output (and the summed loss).

Every curvature type is written as ``sum_n J_n^T S_n S_n^T J_n`` with ``S_n`` a ``(K, D)`` matrix
(``K`` outputs, ``D`` "directions"); the KFAC engine back-propagates the ``D`` columns of all samples at once.

Loss conventions (per sample, summed over the batch):

- ``"classification"``: cross-entropy ``-log softmax(f)[y]``; Hessian ``diag(p) - p p^T``.
- ``"regression"``: Gaussian likelihood with ``sigma = 1`` *without* its constant, i.e.
  ``0.5 * ||y - f||^2``; Hessian ``I``. (This is laplace-torch's ``factor * MSELoss(sum)`` with factor 0.5.)

Curvature types:

- ``"ggn"``: exact GGN. Classification uses a rank ``K-1`` factor ``S = diag(sqrt p) Q`` where ``Q`` holds
  ``K-1`` orthonormal columns spanning the complement of ``sqrt p`` (from a Householder reflection), so
  ``S S^T = diag(p) - p p^T`` with one backward direction fewer than the textbook ``sqrt(p_k)(e_k - p)``
  columns (``rank_reduced=False`` gives those). Regression: ``S = I`` (``K`` directions).
- ``"mc"``: Monte-Carlo Fisher: ``mc_samples`` columns ``(p - onehot(y~)) / sqrt(M)`` with ``y~ ~ Cat(p)``
  (regression: ``eps / sqrt(M)``, ``eps ~ N(0, I)``).
- ``"ef"``: empirical Fisher: one column, the loss gradient at the true label (``p - onehot(y)`` or ``f - y``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kfac.options import check_choice

LIKELIHOODS = ("classification", "regression")
CURVATURES = ("ggn", "mc", "ef")


def check_batch(logits: torch.Tensor, y: torch.Tensor, likelihood: str) -> None:
    """Raise a ValueError saying what is wrong unless the targets ``y`` fit ``logits (B, K)``: class indices
    ``(B,)`` of any integer dtype (not bool) in ``[0, K)`` (classification) or ``B * K`` values, ``(B, K)`` or
    ``(B,)`` for ``K = 1`` (regression)."""
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    if logits.dim() != 2:
        raise ValueError(f"the model output must be (B, K), got {tuple(logits.shape)}")
    batch, k = logits.shape
    if likelihood == "classification":
        if y.shape != (batch,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"classification targets must be {batch} class indices (integers), got {y.dtype} "
                             f"{tuple(y.shape)}")
        if batch and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(f"classification targets must lie in [0, {k}), got {int(y.min())}..{int(y.max())}")
    elif y.numel() != logits.numel() or y.shape[:1] != (batch,):
        raise ValueError(f"regression targets must have the model output's shape {tuple(logits.shape)}, got "
                         f"{tuple(y.shape)}")


def summed_loss(logits: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Summed negative log likelihood (without Gaussian constants) of ``logits (B, K)`` at targets ``y``."""
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    if likelihood == "classification":
        return F.cross_entropy(logits, y.long(), reduction="sum")  # cross_entropy takes int64 (or uint8) only
    return 0.5 * (logits - y.reshape(logits.shape)).square().sum()


def _softmax_sqrt_reduced(p: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` probabilities -> ``(B, K, K-1)`` factors ``S`` with ``S S^T = diag(p) - p p^T``.

    Householder reflection ``R = I - 2 w w^T / w^T w`` with ``w = sqrt(p) - e_j`` swaps ``e_j`` and the unit
    vector ``sqrt(p)``; its columns other than ``j`` are an orthonormal basis of ``sqrt(p)``'s complement.
    The pivot ``j = argmin p`` keeps ``||w||^2 = 2 - 2 sqrt(p_j) >= 2 - 2/sqrt(K)`` away from 0.
    """
    batch, k = p.shape
    q = p.sqrt()
    pivot = p.argmin(dim=1)
    w = q - F.one_hot(pivot, k).to(p.dtype)
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    refl = eye - 2.0 * w[:, :, None] * w[:, None, :] / w.square().sum(1)[:, None, None]
    keep = torch.arange(k - 1, device=p.device).expand(batch, k - 1)
    keep = keep + (keep >= pivot[:, None]).long()
    basis = torch.gather(refl, 2, keep[:, None, :].expand(batch, k, k - 1))
    return q[:, :, None] * basis


def _softmax_sqrt_full(p: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` -> ``(B, K, K)`` factors with columns ``sqrt(p_k) (e_k - p)``."""
    k = p.shape[1]
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    return (eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]


def _one_hot(y: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y.long(), k).to(dtype)


def hessian_sqrt(
    logits: torch.Tensor,
    y: torch.Tensor,
    likelihood: str,
    curvature: str = "ggn",
    mc_samples: int = 1,
    rank_reduced: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss-Hessian square roots as back-propagation seeds ``(D, B, K)`` for ``logits (B, K)``.

    ``sum_d S[d, n] S[d, n]^T`` is the (exact, sampled or empirical) loss Hessian of sample ``n``.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(curvature, CURVATURES, "curvature")
    if logits.dim() != 2:
        raise ValueError(f"the model output must be (B, K), got {tuple(logits.shape)}")
    f = logits.detach()
    batch, k = f.shape
    classification = likelihood == "classification"
    p = torch.softmax(f, dim=1) if classification else None
    if curvature == "ggn":
        if not classification:
            return torch.eye(k, dtype=f.dtype, device=f.device)[:, None, :].expand(k, batch, k)
        sqrt = _softmax_sqrt_reduced(p) if rank_reduced and k > 1 else _softmax_sqrt_full(p)
        return sqrt.permute(2, 0, 1)
    if curvature == "ef":
        grad = p - _one_hot(y, k, f.dtype) if classification else f - y.reshape(f.shape).to(f.dtype)
        return grad[None]
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if classification:
        # one categorical draw per sample and MC sample, in the same order as curvlinops (seed parity)
        draws = torch.stack([torch.multinomial(p, 1, generator=generator)[:, 0] for _ in range(mc_samples)])
        cols = p[None] - _one_hot(draws, k, f.dtype)  # (M, B, K)
    else:
        cols = torch.randn(mc_samples, batch, k, dtype=f.dtype, device=f.device, generator=generator)
    return cols / mc_samples**0.5
