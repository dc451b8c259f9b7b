"""KFAC rules for ella's layers, registered with :mod:`kfac` when ``ella.layers`` is imported.

Notation as in :mod:`kfac.statistics`: patches ``a`` (input rows), output gradients ``g``; every weight below
is shared over positions and gets KFAC-expand (or -reduce, ``kfac_approx``) with an exact bias, through
:class:`kfac.SharedWeightBuilder`, unless stated otherwise. Two options exist for these rules only (registered
here, so that :func:`kfac.fit_kfac` accepts them):

- ``grouped_mode`` (:data:`GROUPED_MODES`) for ``GroupedLinear`` ``weight (O, G, I)``: ``"per_group"``
  (default): direct sum over groups of ``A_g = sum_n x_{n,g} x_{n,g}^T`` and
  ``B_g = sum_{d,n} g_{d,n,g} g_{d,n,g}^T``; ``"reference"``: block-diagonal ``A = blockdiag(A_g)`` with the
  shared output factor ``(1/G) sum_g B_g`` (one Kronecker product, as laplace-torch needs, so the
  ``kfac.laplace_backend`` backends use it). The bias, shared by the groups, sums its gradient over them.
- ``rotation_mode`` (:data:`ROTATION_MODES`) for the p4 convolutions: ``"expand"`` (default) treats the 4
  rotations as extra positions; ``"reduce"`` uses ``a = sum_g a_g`` and ``g = mean_g g_g`` per site (then
  expands, or reduces, over sites); the bias sums its gradient over rotations and sites.

Rules:

- ``StackedConv2d`` (the stride-2 child of a downsampling CONV path) on a polyphase stack: the ``nn.Conv2d``
  rule at stride 2 on the windows the stack holds (:func:`ella.layers.polyphase.stacked_windows`).
- ``SparseConv`` ``weight (C', C, M)``: the conv rule on the induced filter with the patches projected tap-wise
  onto the anchors, ``a[c, m] = sum_t basis[m, t] patch[c, t]``, i.e. ``A_u = (I_C (x) Psi) A_conv (I_C (x) Psi)^T``.
- ``LiftingConv`` / ``GroupConv(mode="pointwise")`` ``weight (C', C, k, k)``: output slice ``g`` uses the
  filter rotated ``g`` times, so its patches are un-rotated (``rot90(patch, -g)``) into the canonical filter's
  tap order, then ``rotation_mode`` applies.
- ``GroupConv(mode="full")`` ``weight (C', C, 4, k, k)``: output rotation ``g`` reads input rotation
  ``(h + g) mod 4`` through filter slice ``h`` rotated ``g`` times, so the patch for ``(g, site)`` is
  ``[c, h] -> rot90(patch of input slice (h + g) mod 4, -g)``, laid out ``(C, 4, k, k)`` like the weight;
  then ``rotation_mode`` applies.
- ``GroupedLinear``: see ``grouped_mode`` above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ella.layers.conv import StackedConv2d
from ella.layers.group import N_ROTATIONS, GroupConv, LiftingConv
from ella.layers.grouped_linear import GroupedLinear
from ella.layers.polyphase import stacked_windows
from ella.layers.sparse import SparseConv
from kfac import (
    ConvWindows,
    FactorBuilder,
    KronBlock,
    RowsGram,
    RuleOption,
    RuleOptions,
    SharedWeightBuilder,
    circular_patches,
    position_stats,
    register_option,
    register_rule,
    sites_last,
    trainable,
)

GROUPED_MODES = ("per_group", "reference")
ROTATION_MODES = ("expand", "reduce")


def unrotated_patches(patches: torch.Tensor, channels: int, k: int) -> torch.Tensor:
    """Lifting/pointwise patches ``(B, 4, C*k*k, L)`` (slice ``g`` = patches seen by output rotation ``g``)
    -> the same patches in the canonical filter's tap order, ``rot90(., -g)`` per slice."""
    batch, _, _, n_loc = patches.shape
    view = patches.reshape(batch, N_ROTATIONS, channels, k, k, n_loc)
    slices = [torch.rot90(view[:, g], -g, dims=(2, 3)) for g in range(N_ROTATIONS)]
    return torch.stack(slices, dim=1).reshape(batch, N_ROTATIONS, channels * k * k, n_loc)


def full_group_patches(patches: torch.Tensor, channels: int, k: int) -> torch.Tensor:
    """Full p4 conv patches: input patches ``(B, 4C*k*k, L)`` (channels group-major ``h*C + c``) ->
    ``(B, 4, C*4*k*k, L)``: slice ``g`` holds ``[c, h] -> rot90(patch of input slice (h+g) mod 4, -g)``."""
    batch, _, n_loc = patches.shape
    view = patches.reshape(batch, N_ROTATIONS, channels, k, k, n_loc)
    slices = []
    for g in range(N_ROTATIONS):
        moved = torch.rot90(torch.roll(view, shifts=-g, dims=1), -g, dims=(3, 4))  # (B, 4h, C, k, k, L)
        slices.append(moved.transpose(1, 2).reshape(batch, channels * N_ROTATIONS * k * k, n_loc))
    return torch.stack(slices, dim=1)



class RotationReduceBuilder(FactorBuilder):
    """p4 convolutions with ``rotation_mode="reduce"``: KFAC-expand (or -reduce, ``options.kfac_approx``) over
    sites of ``a = sum_g a_g``, ``g = mean_g g_g``, and the exact bias summed over rotations *and* sites.
    Gradient chunks ``(D_i, B, 4C', H, W)``, patches ``(B, 4, Din, L)``."""

    def __init__(
        self, prefix: str, module: nn.Module, patches: Callable[[], torch.Tensor], batch: int, options: RuleOptions
    ) -> None:
        self.prefix, self.module, self.patches, self.batch = prefix, module, patches, batch
        self.stats = position_stats(trainable(module, "weight"), False, options)
        self._bias_rows = RowsGram() if trainable(module, "bias") else None

    def add(self, grads: torch.Tensor) -> None:
        c_out = self.module.out_channels
        g = grads.reshape(grads.shape[0], self.batch, N_ROTATIONS, c_out, -1)  # (D, B, 4, C', L)
        self.stats.add(g.mean(2))
        if self._bias_rows is not None:
            self._bias_rows.add(g.sum((2, 4)).reshape(-1, c_out))

    def blocks(self) -> dict[str, KronBlock]:
        blocks = self.stats.blocks(self.prefix, self.module, lambda: self.patches().sum(1))
        if self._bias_rows is not None:
            bias = self.module.bias
            factor = self._bias_rows.result()[None]
            blocks[f"{self.prefix}bias"] = KronBlock(f"{self.prefix}bias", bias.shape, "single", factor)
        return blocks


def _rotation_builder(
    prefix: str, module: nn.Module, patches: Callable[[], torch.Tensor], batch: int, options: RuleOptions
) -> FactorBuilder:
    """Builder of a p4 conv from patches ``(B, 4, Din, L)`` and grads ``(D, B, 4C', H, W)``."""
    if options.rotation_mode == "reduce":
        return RotationReduceBuilder(prefix, module, patches, batch, options)
    c_out = module.out_channels

    def to_sites(t: torch.Tensor) -> torch.Tensor:  # positions (4, L)
        rotations = t.reshape(t.shape[0], batch, N_ROTATIONS, c_out, -1)
        return rotations.transpose(2, 3).reshape(t.shape[0], batch, c_out, -1)

    def expanded() -> torch.Tensor:
        pat = patches()
        return pat.transpose(1, 2).reshape(batch, pat.shape[2], -1)

    return SharedWeightBuilder(prefix, module, expanded, to_sites, options)


class GroupedLinearBuilder(FactorBuilder):
    """``GroupedLinear`` ``(B, G, I) -> (B, G, O)``, weight ``(O, G, I)``: per-group or reference blocks.
    Gradient chunks ``(D_i, B, G, O)``."""

    def __init__(self, prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> None:
        self.prefix, self.module, self.x, self.mode = prefix, module, x, options.grouped_mode
        self._out = RowsGram() if trainable(module, "weight") else None
        self._bias_rows = RowsGram() if trainable(module, "bias") else None

    def add(self, grads: torch.Tensor) -> None:
        if self._out is not None:  # per group: (D_i B, G, O) rows, joined over chunks
            self._out.add(grads.reshape(-1, *grads.shape[2:]))
        if self._bias_rows is not None:  # the bias is shared by the groups: sum over them first
            self._bias_rows.add(grads.sum(2).reshape(-1, grads.shape[3]))

    def blocks(self) -> dict[str, KronBlock]:
        blocks: dict[str, KronBlock] = {}
        weight, bias, name = self.module.weight, self.module.bias, self.prefix
        if weight.requires_grad:
            xg = self.x.transpose(0, 1)  # (G, B, I): one product over few rows (no block split)
            a = torch.bmm(xg.transpose(1, 2), xg)  # (G, I, I)
            b = self._out.result()  # (G, O, O)
            if self.mode == "per_group":
                blocks[f"{name}weight"] = KronBlock(f"{name}weight", weight.shape, "direct_sum", b, a)
            else:
                shared = b.mean(0, keepdim=True)
                blocks[f"{name}weight"] = KronBlock(f"{name}weight", weight.shape, "shared_out", shared, a)
        if self._bias_rows is not None:
            blocks[f"{name}bias"] = KronBlock(f"{name}bias", bias.shape, "single", self._bias_rows.result()[None])
        return blocks


def stacked_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``StackedConv2d`` on a polyphase stack ``(B, 4C, h, w)``: the stride-2 conv rule on the stack's windows
    (rebuilt once, when the blocks are formed)."""
    k = module.kernel_size
    return SharedWeightBuilder(
        prefix, module, lambda: ConvWindows(stacked_windows(x), (k, k), (2, 2)),
        sites_last(x.shape[0], module.weight.shape[0]), options,
    )


def sparse_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``SparseConv``: conv rule on the induced filter, patches projected tap-wise onto the anchors."""
    k = module.kernel_size

    def projected() -> torch.Tensor:
        patches = circular_patches(x, k, module.padding)
        batch, _, n_loc = patches.shape
        taps = patches.reshape(batch, module.in_channels, k * k, n_loc)
        proj = torch.einsum("bctl,mt->bcml", taps, module.basis.detach().to(taps.dtype))
        return proj.reshape(batch, -1, n_loc)

    return SharedWeightBuilder(prefix, module, projected, sites_last(x.shape[0], module.out_channels), options)


def lifting_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``LiftingConv`` ``(B, C, H, W) -> (B, 4C', H, W)``: rotations as positions (or reduced)."""
    k = module.kernel_size

    def patches() -> torch.Tensor:
        lifted = circular_patches(x, k)[:, None].expand(-1, N_ROTATIONS, -1, -1)
        return unrotated_patches(lifted, module.in_channels, k)

    return _rotation_builder(prefix, module, patches, x.shape[0], options)


def group_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``GroupConv`` ``(B, 4C, H, W) -> (B, 4C', H, W)``, pointwise or full."""
    k, c_in = module.kernel_size, module.in_channels

    def patches() -> torch.Tensor:
        flat = circular_patches(x, k)  # (B, 4C*k*k, L), channels group-major
        if module.mode == "pointwise":
            return unrotated_patches(flat.reshape(flat.shape[0], N_ROTATIONS, c_in * k * k, -1), c_in, k)
        return full_group_patches(flat, c_in, k)

    return _rotation_builder(prefix, module, patches, x.shape[0], options)



register_option(RuleOption("grouped_mode", GROUPED_MODES, "per_group", kron_value="reference"))
register_option(RuleOption("rotation_mode", ROTATION_MODES, "expand"))
register_rule(StackedConv2d, stacked_conv_rule)
register_rule(GroupedLinear, GroupedLinearBuilder)
register_rule(SparseConv, sparse_conv_rule)
register_rule(LiftingConv, lifting_conv_rule)
register_rule(GroupConv, group_conv_rule)
