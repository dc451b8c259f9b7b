"""Ground truth for the KFAC tests: exact GGN blocks from ``torch.func`` Jacobians."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev


def loss_hessians(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Per-sample loss Hessians ``(B, K, K)``: ``diag(p) - p p^T`` (cross-entropy) or ``I`` (0.5 ||y - f||^2)."""
    batch, k = logits.shape
    if likelihood == "regression":
        return torch.eye(k, dtype=logits.dtype).expand(batch, k, k)
    p = torch.softmax(logits, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def jacobians(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-parameter Jacobians ``(B, K, P)`` of ``model(x) (B, K)`` and the logits."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(ps):
        out = functional_call(model, (ps, buffers), (x,))
        return out, out

    jac, logits = jacrev(f, has_aux=True)(params)
    batch, k = logits.shape
    return {name: j.reshape(batch, k, -1) for name, j in jac.items()}, logits.detach()


def exact_ggn_blocks(model: nn.Module, x: torch.Tensor, likelihood: str = "classification") -> dict[str, torch.Tensor]:
    """Exact GGN diagonal blocks ``sum_n J_n^T H_n J_n`` per parameter tensor, ``(P, P)`` each."""
    jac, logits = jacobians(model, x)
    hess = loss_hessians(logits, likelihood)
    return {name: torch.einsum("bkp,bkl,blq->pq", j, hess, j) for name, j in jac.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def stock_models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """A stock MLP and a stock CNN (float64, fixed seed), each with 6 inputs and 3-class labels (stock modules
    only, so that a process that cannot import ``ella`` can build them)."""
    torch.manual_seed(0)
    dt = torch.float64
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(dt)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, 3)
    ).to(dt)
    y = torch.arange(6) % 3
    return {"mlp": (mlp, torch.randn(6, 5, dtype=dt), y), "cnn": (cnn, torch.randn(6, 2, 6, 6, dtype=dt), y)}
