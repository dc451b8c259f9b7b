"""Reparameterised layers of MSR (Zhou, Knowles & Finn, ICLR 2021) and the MAML baselines.

Every layer here is a single-layer model for the synthetic problems. Each module declares which of its
parameter names are *task-specific* (``inner_names``: adapted in the inner loop, the "filter" v) and which
are *symmetry* parameters (``outer_names``: updated by the outer loop only, the "symmetry matrix" U).
Baselines adapt all of their parameters in the inner loop (``outer_names == ()``).

Convention: vec stacks a matrix **row-wise**, so ``W = (U @ v).reshape(m, n)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Structure = Literal["dense", "kron"]


def conv_symmetry_matrix(in_features: int, kernel_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacked shift permutations of Prop. 1 for a valid 1-D cross-correlation.

    Returns U of shape ``(m * n, K)`` with ``n = in_features``, ``m = n - K + 1``: block p (rows
    ``p*n .. p*n + n - 1``) maps the width-K filter v to row p of W, placing v at columns ``p .. p+K-1``,
    so ``W = (U @ v).reshape(m, n)`` computes ``y[p] = sum_j v[j] x[p + j]`` (what ``F.conv1d`` does).
    """
    if kernel_size > in_features:
        raise ValueError(f"kernel_size={kernel_size} exceeds in_features={in_features}")
    m = in_features - kernel_size + 1
    u = torch.zeros(m * in_features, kernel_size, dtype=dtype)
    for p in range(m):
        for j in range(kernel_size):
            u[p * in_features + p + j, j] = 1.0
    return u


class MSRFC(nn.Module):
    """Fully connected layer with vec(W) = U v (no bias). Input ``(B, n)`` -> output ``(B, m)``.

    ``structure="dense"`` (paper Eq. 2 / Prop. 1): ``U (m*n, k)`` outer-only, ``v (k,)`` task-specific;
    ``latent_size`` k defaults to ``n`` as in the paper's text (the reference code uses k = 3, 6, 30 for the
    rank-1, 2, 5 problems). Init as in the reference code: U ~ N(0, u_init_std^2), v ~ N(0, (1/m)^2).

    ``structure="kron"`` (paper App. A): vec(W) = (U_out (x) U_in) vec(V), i.e. ``W = U_out V U_in^T``, with
    identity-initialised square factors ``U_out (m, m)``, ``U_in (n, n)`` (outer-only) and ``V = v (m, n)``
    task-specific, initialised like ``nn.Linear``. ``latent_size`` must be None here.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        latent_size: int | None = None,
        structure: Structure = "dense",
        u_init_std: float = 0.01,
        v_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.structure = in_features, out_features, structure
        m, n = out_features, in_features
        if structure == "dense":
            k = n if latent_size is None else latent_size
            v_std = 1.0 / m if v_init_std is None else v_init_std
            self.U = nn.Parameter(torch.randn(m * n, k) * u_init_std)
            self.v = nn.Parameter(torch.randn(k) * v_std)
            self.outer_names: tuple[str, ...] = ("U",)
        elif structure == "kron":
            if latent_size is not None:
                raise ValueError("MSRFC(structure='kron') has latent V of shape (m, n); latent_size must be None")
            self.U_out = nn.Parameter(torch.eye(m))
            self.U_in = nn.Parameter(torch.eye(n))
            self.v = nn.Parameter(nn.Linear(n, m, bias=False).weight.detach().clone())
            self.outer_names = ("U_out", "U_in")
        else:
            raise ValueError(f"MSRFC: unknown structure {structure!r} (expected 'dense' or 'kron')")
        self.inner_names: tuple[str, ...] = ("v",)

    def weight(self) -> torch.Tensor:
        """The effective weight matrix W, shape ``(m, n)``."""
        if self.structure == "dense":
            return (self.U @ self.v).reshape(self.out_features, self.in_features)
        return self.U_out @ self.v @ self.U_in.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().T


class MSRConv(nn.Module):
    """2-D convolution (no bias, no padding) whose filter is reparameterised. ``(B, C_i, H, W) -> (B, C_o, H-K+1, W-K+1)``.

    ``structure="kron"`` (paper App. A.2, reference ``share_conv``): task-specific ``v (C_o, C_i, K*K)``;
    outer-only identity-initialised warps ``U_out (C_o, C_o)``, ``U_in (C_i, C_i)``, ``U_space (K*K, K*K)``;
    ``W = v x_1 U_out x_2 U_in x_3 U_space`` (mode products), i.e. vec(W) = (U_out (x) U_in (x) U_space) vec(v).
    Warning: one Kronecker product cannot rotate the spatial filter differently per output channel, so this
    form cannot express exact rotation sharing; it acts as a learned preconditioner of the inner step.

    ``structure="dense"`` (Prop. 1): ``U (C_o*C_i*K*K, k)`` outer-only, ``v (k,)`` task-specific; with U the
    stacked rotated-copy permutations this is exactly a group-lifting convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        structure: Structure = "kron",
        latent_size: int | None = None,
        u_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.structure = structure
        taps = kernel_size * kernel_size
        init = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False).weight.detach()
        if structure == "kron":
            if latent_size is not None:
                raise ValueError("MSRConv(structure='kron') has latent v of the filter's shape; latent_size must be None")
            self.v = nn.Parameter(init.reshape(out_channels, in_channels, taps).clone())
            self.U_out = nn.Parameter(torch.eye(out_channels))
            self.U_in = nn.Parameter(torch.eye(in_channels))
            self.U_space = nn.Parameter(torch.eye(taps))
            self.outer_names: tuple[str, ...] = ("U_out", "U_in", "U_space")
        elif structure == "dense":
            k = in_channels * taps if latent_size is None else latent_size
            self.U = nn.Parameter(torch.randn(out_channels * in_channels * taps, k) * u_init_std)
            self.v = nn.Parameter(torch.randn(k) / taps)
            self.outer_names = ("U",)
        else:
            raise ValueError(f"MSRConv: unknown structure {structure!r} (expected 'dense' or 'kron')")
        self.inner_names: tuple[str, ...] = ("v",)

    def weight(self) -> torch.Tensor:
        """The effective filter, shape ``(C_o, C_i, K, K)``."""
        if self.structure == "kron":
            w = torch.einsum("ab,cd,ef,bdf->ace", self.U_out, self.U_in, self.U_space, self.v)
            return w.reshape(self.shape)
        return (self.U @ self.v).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight())


class LocallyConnected1d(nn.Module):
    """1-D locally connected layer, one channel, no bias: ``(B, n) -> (B, n-K+1)``.

    ``y[p] = sum_j weight[p, j] x[p + j]`` with ``weight (n-K+1, K)`` (an unshared width-K filter per position).
    """

    def __init__(self, in_features: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        out = in_features - kernel_size + 1
        self.weight = nn.Parameter(torch.empty(out, kernel_size).uniform_(-1, 1) / kernel_size**0.5)
        self.inner_names: tuple[str, ...] = ("weight",)
        self.outer_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unfold(-1, self.kernel_size, 1) * self.weight).sum(-1)


class Conv1dFlat(nn.Module):
    """``nn.Conv1d(1, 1, K, bias=False)`` on flat inputs: ``(B, n) -> (B, n-K+1)``."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, bias=False)
        self.inner_names: tuple[str, ...] = ("conv.weight",)
        self.outer_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(-2)).squeeze(-2)


class PlainLinear(nn.Linear):
    """``nn.Linear(n, m, bias=False)`` tagged with inner/outer names (MAML-FC)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.inner_names: tuple[str, ...] = ("weight",)
        self.outer_names: tuple[str, ...] = ()


class PlainConv2d(nn.Conv2d):
    """``nn.Conv2d(C_i, C_o, K, bias=False)`` tagged with inner/outer names (2-D MAML-Conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=False)
        self.inner_names: tuple[str, ...] = ("weight",)
        self.outer_names: tuple[str, ...] = ()
