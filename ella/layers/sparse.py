"""Sparse (anchor-interpolated) layers: S-CONV and S-FC, the paper's sparsified CONV and F-FC paths.

A weight defined on a spatial grid of ``T`` sites is parameterised by its values at ``M`` anchors ``Z``
through the kernel-interpolation basis ``Psi = (K_ZZ + sigma^2 I)^{-1} K_ZT`` of shape ``(M, T)``:
``w(t) = sum_m u_m Psi[m, t]``. Anchors are drawn uniformly in the grid's square from the global torch RNG
(CPU generator, so ``torch.manual_seed`` makes them reproducible), are shared by all channel pairs of a
module side and are stored as buffers together with ``Psi``. Anchor values start as the least-squares
projection of a dense initialisation onto the basis.

Deliberate differences from the reference: anchors are drawn *before* any weights are initialised (so a
module built on the ``meta`` device has the same basis as one built on a real device for the same seed),
and S-CONV pads circularly by default (``padding="zeros"`` reproduces the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ella.layers.conv import check_channels, check_kernel_size, circular_pad
from ella.layers.factored import factored_init_variances
from ella.layers.fc import check_map_input
from ella.layers.grouped_linear import GroupedLinear

KERNEL_SCALE = 1.0 + 1e-6
"""Amplitude of the squared-exponential kernel (the reference's ``1 + 1e-6``)."""

ANCHOR_RULES = ("ceil", "round")
PADDINGS = ("circular", "zeros")


def grid_coordinates(
    side: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Pixel-centred coordinates of a ``side x side`` grid in ``[-s, s]^2``, ``s = (side - 1) / 2``.

    Returns ``(side*side, 2)``, row-major (site ``t = i*side + j`` has coordinates ``(i - s, j - s)``), which
    matches flattening a ``(side, side)`` filter or feature map.
    """
    if side < 1:
        raise ValueError(f"grid_coordinates: side must be >= 1, got {side}")
    axis = torch.arange(side, device=device, dtype=dtype) - (side - 1) / 2
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def anchor_count(n_sites: int, rule: str = "ceil", factor: float = 0.5) -> int:
    """Number of anchors ``M`` for a grid of ``T = n_sites`` sites.

    ``rule="ceil"``: ``ceil(factor * T)`` (the paper's "half, rounded up" for ``factor = 0.5``);
    ``rule="round"``: Python's round-half-to-even of ``factor * T`` (the reference code). Both at least 1.
    """
    if n_sites < 1:
        raise ValueError(f"anchor_count: n_sites must be >= 1, got {n_sites}")
    if factor <= 0:
        raise ValueError(f"anchor_count: factor must be positive, got {factor}")
    if rule == "ceil":
        count = math.ceil(factor * n_sites)
    elif rule == "round":
        count = round(factor * n_sites)
    else:
        raise ValueError(f"anchor_count: unknown rule {rule!r}; expected one of {ANCHOR_RULES}")
    return max(int(count), 1)


def sample_anchors(n_anchors: int, side: int) -> torch.Tensor:
    """Draw ``(M, 2)`` anchor locations uniformly in ``[-s, s]^2`` from the global CPU RNG (float64).

    For a ``1x1`` grid (``s = 0``) every anchor sits at the origin.
    """
    if n_anchors < 1:
        raise ValueError(f"sample_anchors: n_anchors must be >= 1, got {n_anchors}")
    half = (side - 1) / 2
    return torch.rand(n_anchors, 2, dtype=torch.float64, device="cpu") * (2 * half) - half


def squared_exponential(a: torch.Tensor, b: torch.Tensor, omega: float = 1.0) -> torch.Tensor:
    """Kernel matrix ``(P, 2), (Q, 2) -> (P, Q)``: ``KERNEL_SCALE * exp(-omega^2 |a_i - b_j|^2 / 2)``."""
    sq_dist = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return KERNEL_SCALE * torch.exp(-0.5 * omega**2 * sq_dist)


def interpolation_basis(
    anchors: torch.Tensor, grid: torch.Tensor, omega: float = 1.0, sigma: float = 0.01
) -> torch.Tensor:
    """Kernel-interpolation basis ``Psi = (K_ZZ + sigma^2 I)^{-1} K_ZT``.

    anchors ``(M, 2)``, grid ``(T, 2)`` -> ``(M, T)``.
    """
    if anchors.dim() != 2 or anchors.shape[1] != 2 or grid.dim() != 2 or grid.shape[1] != 2:
        raise ValueError(
            f"interpolation_basis expects anchors (M, 2) and grid (T, 2), got {tuple(anchors.shape)}, "
            f"{tuple(grid.shape)}"
        )
    k_zz = squared_exponential(anchors, anchors, omega)
    k_zt = squared_exponential(anchors, grid, omega)
    eye = torch.eye(anchors.shape[0], dtype=anchors.dtype, device=anchors.device)
    return torch.linalg.solve(k_zz + sigma**2 * eye, k_zt)


def project_onto_basis(dense: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Least-squares anchor values: ``(..., T), (M, T) -> (..., M)`` minimising ``|u @ basis - dense|^2``.

    Each row of ``dense`` is fitted independently (one channel pair per row).
    """
    n_sites = basis.shape[1]
    if dense.shape[-1] != n_sites:
        raise ValueError(f"project_onto_basis: dense weights end in {dense.shape[-1]} sites, basis has {n_sites}")
    rows = dense.reshape(-1, n_sites).T  # (T, N)
    values = torch.linalg.lstsq(basis.T, rows).solution  # (M, N)
    return values.T.reshape(*dense.shape[:-1], basis.shape[0])


def init_from_dense(dense: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Anchor values ``(..., M)`` for a dense init ``(..., T)`` of i.i.d. entries.

    The least-squares projection keeps only ``M / T`` of the entries' variance (an ``M``-dim subspace of
    ``R^T``), so it is rescaled by ``sqrt(T / M)``: the induced weights keep the dense init's variance, and a
    sparse path keeps the activation scale of its dense counterpart.
    """
    n_anchors, n_sites = basis.shape
    return project_onto_basis(dense, basis) * math.sqrt(n_sites / n_anchors)


def _basis_for_side(
    side: int, n_anchors: int, omega: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors ``(M, 2)`` and basis ``(M, side^2)`` in float64 on the CPU."""
    anchors = sample_anchors(n_anchors, side)
    return anchors, interpolation_basis(anchors, grid_coordinates(side), omega, sigma)


def _uniform_cpu(shape: tuple[int, ...], variance: float) -> torch.Tensor:
    """float64 CPU tensor ``~ Uniform(+-sqrt(3 variance))`` from the global RNG."""
    bound = math.sqrt(3.0 * variance)
    return torch.empty(shape, dtype=torch.float64, device="cpu").uniform_(-bound, bound)


class SparseConv(nn.Module):
    """S-CONV path ``(B, C, H, W) -> (B, C', H, W)``: a ``k x k`` conv whose filters live on ``M`` anchors.

    Parameters ``weight (C', C, M)`` (anchor values) and ``bias (C')``; buffers ``anchors (M, 2)`` and
    ``basis (M, k*k)``. Induced filter ``einsum('dcm,mt->dct', weight, basis)`` reshaped to ``(C', C, k, k)``.
    Parameters ``C C' M + C'``; default ``M = anchor_count(k*k, anchor_rule, anchor_factor)`` (5 for 3x3).
    Init: :func:`init_from_dense` of a Kaiming-uniform (ReLU gain) dense filter, bias 0.
    ``padding="circular"`` (default) is translation-equivariant; ``"zeros"`` reproduces the reference only.
    """

    equivariant = True
    kind = "S-CONV"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        n_anchors: int | None = None,
        padding: str = "circular",
        anchor_rule: str = "ceil",
        anchor_factor: float = 0.5,
        omega: float = 1.0,
        sigma: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "SparseConv")
        if padding not in PADDINGS:
            raise ValueError(f"SparseConv: unknown padding {padding!r}; expected one of {PADDINGS}")
        n_taps = kernel_size * kernel_size
        n_anchors = anchor_count(n_taps, anchor_rule, anchor_factor) if n_anchors is None else n_anchors
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.n_anchors = n_anchors
        self.padding = padding
        anchors, basis = _basis_for_side(kernel_size, n_anchors, omega, sigma)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, n_anchors, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        self.register_buffer("anchors", anchors.to(device=self.weight.device, dtype=self.weight.dtype))
        self.register_buffer("basis", basis.to(device=self.weight.device, dtype=self.weight.dtype))
        self._init_from_dense(basis)

    @torch.no_grad()
    def _init_from_dense(self, basis: torch.Tensor) -> None:
        """Fit the anchor values to a Kaiming-uniform (ReLU gain) dense filter; skipped on ``meta``."""
        if self.weight.is_meta:
            return
        fan_in = self.in_channels * self.kernel_size**2
        dense = _uniform_cpu((self.out_channels, self.in_channels, self.kernel_size**2), 2.0 / fan_in)
        self.weight.copy_(init_from_dense(dense, basis))

    def induced_weight(self) -> torch.Tensor:
        """Dense filter ``(C', C, k, k)`` induced by the anchor values."""
        filt = torch.einsum("dcm,mt->dct", self.weight, self.basis)
        return filt.reshape(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H, W)``."""
        check_channels(x, self.in_channels, "SparseConv")
        if self.padding == "circular":
            padded = circular_pad(x, self.kernel_size)
        else:
            pad = self.kernel_size // 2
            padded = F.pad(x, (pad, pad, pad, pad))
        return F.conv2d(padded, self.induced_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"n_anchors={self.n_anchors}, padding={self.padding!r}"
        )


class SparseFC(nn.Module):
    """S-FC path: a :class:`~ella.layers.factored.FactoredFC` whose spatial factors live on anchors.

    Induced factors ``U[d,c,x] = sum_m stage_u.weight[d,c,m] basis_in[m,x]`` and
    ``V[y,d,c] = sum_m stage_v.weight[m,d,c] basis_out[m,y]``.

    - ``stage_u = GroupedLinear(C, M_X, C')``: weight ``(C', C, M_X)``, bias ``(C')``.
    - ``stage_v = GroupedLinear(C', C, M_Y, bias=False)``: weight ``(M_Y, C', C)``.
    - buffers ``anchors_in (M_X, 2)``, ``basis_in (M_X, X)``, ``anchors_out (M_Y, 2)``, ``basis_out (M_Y, Y)``.

    Forward: ``x (B,C,X) @ basis_in.T -> stage_u (B,C,C') -> transpose -> stage_v (B,C',M_Y) @ basis_out``.
    Parameters ``C C' (M_X + M_Y) + C'``. Init: F-FC's dense init
    (:func:`~ella.layers.factored.factored_init_variances`) projected onto the bases by
    :func:`init_from_dense`; bias 0.
    """

    equivariant = False
    kind = "S-FC"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: int,
        out_size: int,
        n_anchors_in: int | None = None,
        n_anchors_out: int | None = None,
        anchor_rule: str = "ceil",
        anchor_factor: float = 0.5,
        omega: float = 1.0,
        sigma: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n_in, n_out = in_size * in_size, out_size * out_size
        m_in = anchor_count(n_in, anchor_rule, anchor_factor) if n_anchors_in is None else n_anchors_in
        m_out = anchor_count(n_out, anchor_rule, anchor_factor) if n_anchors_out is None else n_anchors_out
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_size = in_size
        self.out_size = out_size
        anchors_in, basis_in = _basis_for_side(in_size, m_in, omega, sigma)
        anchors_out, basis_out = _basis_for_side(out_size, m_out, omega, sigma)
        factory = {"device": device, "dtype": dtype}
        self.stage_u = GroupedLinear(in_channels, m_in, out_channels, **factory)
        self.stage_v = GroupedLinear(out_channels, in_channels, m_out, bias=False, **factory)
        target = {"device": self.stage_u.weight.device, "dtype": self.stage_u.weight.dtype}
        self.register_buffer("anchors_in", anchors_in.to(**target))
        self.register_buffer("basis_in", basis_in.to(**target))
        self.register_buffer("anchors_out", anchors_out.to(**target))
        self.register_buffer("basis_out", basis_out.to(**target))
        self._init_from_dense(basis_in, basis_out)

    @torch.no_grad()
    def _init_from_dense(self, basis_in: torch.Tensor, basis_out: torch.Tensor) -> None:
        """Fit anchor values to F-FC's dense init (:func:`factored_init_variances`); skipped on ``meta``."""
        if self.stage_u.weight.is_meta:
            return
        n_in, n_out = basis_in.shape[1], basis_out.shape[1]
        var_u, var_v = factored_init_variances(self.in_channels, n_in, n_out)
        dense_u = _uniform_cpu((self.out_channels, self.in_channels, n_in), var_u)  # (C', C, X)
        dense_v = _uniform_cpu((n_out, self.out_channels, self.in_channels), var_v)  # (Y, C', C)
        self.stage_u.weight.copy_(init_from_dense(dense_u, basis_in))
        values_v = init_from_dense(dense_v.permute(1, 2, 0), basis_out)  # (C', C, M_Y)
        self.stage_v.weight.copy_(values_v.permute(2, 0, 1))
        nn.init.zeros_(self.stage_u.bias)

    def induced_u(self) -> torch.Tensor:
        """Dense input-side factor ``U (C', C, X)``."""
        return torch.einsum("dcm,mx->dcx", self.stage_u.weight, self.basis_in)

    def induced_v(self) -> torch.Tensor:
        """Dense output-side factor ``V (Y, C', C)``."""
        return torch.einsum("mdc,my->ydc", self.stage_v.weight, self.basis_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H_in, W_in) -> (B, C', H_out, W_out)``."""
        check_map_input(x, self.in_channels, self.in_size, "SparseFC")
        z = self.stage_u(x.flatten(2) @ self.basis_in.T)  # (B, C, C')
        out = self.stage_v(z.transpose(1, 2)) @ self.basis_out  # (B, C', Y)
        return out.view(x.shape[0], self.out_channels, self.out_size, self.out_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}x{self.in_size}^2 -> {self.out_channels}x{self.out_size}^2, "
            f"n_anchors=({self.basis_in.shape[0]}, {self.basis_out.shape[0]})"
        )
