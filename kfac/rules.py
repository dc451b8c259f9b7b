"""Per-module Kronecker factor rules (input side ``A``, output-gradient side ``B``), one block per parameter.

Notation: ``x`` is the module input recorded in the forward pass, ``G`` the output gradients of all ``D``
loss-Hessian square-root directions, ``(D, *output.shape)``. All factors are *raw sums over the batch*
(see :mod:`kfac.curvature` for how ``1 / n_data`` is applied).

Weight-sharing layers (convolutions, linear layers on inputs with extra leading axes, rotations of group
convolutions) use KFAC-expand (Grosse & Martens 2016; Eschenhagen et al. 2023): every output position is
treated like an extra sample,

    A = sum_n mean_{t in T_n} a_{n,t} a_{n,t}^T,        B = sum_{d,n,t} g_{d,n,t} g_{d,n,t}^T,

so that ``(1/N) B (x) A`` approximates ``sum_{n,t} (a a^T) (x) (g g^T)``. Position normalisation
(``position_norm``): ``"used"`` (default) takes ``T_n`` = the positions of sample ``n`` whose output gradient
is non-zero in some direction/channel (so sites discarded downstream, e.g. by polyphase subsampling, are not
counted; a sample with no such position averages over all positions); ``"all"`` takes every output position
(identical to curvlinops' ``expand``). With a single (used) position and one sample the rule is exact.

Biases are always exact: ``B_bias = sum_{d,n} (sum_t g_{d,n,t}) (sum_t g_{d,n,t})^T``, summing the output
gradient over every position (and group / rotation) that shares the bias before the outer product.

Rules:

- ``nn.Linear``: ``a`` = input rows (extra leading axes are positions).
- ``nn.Conv2d`` (``groups=1``; any stride/dilation/padding, any ``padding_mode``): ``a`` = im2col patches of
  the input padded exactly as the module pads it, layout ``(C, kh, kw)`` matching ``weight (O, C, kh, kw)``.
- ``GroupedLinear`` ``weight (O, G, I)``: ``grouped_mode="per_group"`` (default): direct sum over groups of
  ``A_g = sum_n x_{n,g} x_{n,g}^T`` and ``B_g = sum_{d,n} g_{d,n,g} g_{d,n,g}^T``;
  ``"reference"``: block-diagonal ``A = blockdiag(A_g)`` with the shared output factor ``(1/G) sum_g B_g``
  (one Kronecker product, as laplace-torch needs).
- ``SparseConv`` ``weight (C', C, M)``: the conv rule on the induced filter with the patches projected tap-wise
  onto the anchors, ``a[c, m] = sum_t basis[m, t] patch[c, t]``, i.e. ``A_u = (I_C (x) Psi) A_conv (I_C (x) Psi)^T``.
- ``LiftingConv`` / ``GroupConv(mode="pointwise")`` ``weight (C', C, k, k)``: output slice ``g`` uses the
  filter rotated ``g`` times, so its patches are un-rotated (``rot90(patch, -g)``) into the canonical filter's
  tap order; ``rotation_mode="expand"`` (default) treats the 4 rotations as extra positions, ``"reduce"``
  uses ``a = sum_g a_g`` and ``g = mean_g g_g`` per site (then expands over sites).
- ``GroupConv(mode="full")`` ``weight (C', C, 4, k, k)``: output rotation ``g`` reads input rotation
  ``(h + g) mod 4`` through filter slice ``h`` rotated ``g`` times, so the patch for ``(g, site)`` is
  ``[c, h] -> rot90(patch of input slice (h + g) mod 4, -g)``, laid out ``(C, 4, k, k)`` like the weight;
  expand (or reduce) over rotations and sites as above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kfac.curvature import KronBlock

N_ROTATIONS = 4
GROUPED_MODES = ("per_group", "reference")
ROTATION_MODES = ("expand", "reduce")
POSITION_NORMS = ("used", "all")


@dataclass(frozen=True)
class RuleOptions:
    """Choices shared by all rules (see the module docstring)."""

    grouped_mode: str = "per_group"
    rotation_mode: str = "expand"
    position_norm: str = "used"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.grouped_mode, GROUPED_MODES, "grouped_mode"),
            (self.rotation_mode, ROTATION_MODES, "rotation_mode"),
            (self.position_norm, POSITION_NORMS, "position_norm"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------------------------- factors


_CHUNK_ELEMENTS = 1 << 23  # bound on temporaries of the batched Gram products


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``(M, d) -> (d, d)``: ``rows^T rows``."""
    return rows.T @ rows


def _batched_gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_n left[n] right[n]^T`` for ``(N, d, P)`` inputs, as chunked ``bmm`` + sum -> ``(d, d)``."""
    n, d, _ = left.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, d * d))
    total = left.new_zeros(d, d)
    for start in range(0, n, step):
        stop = start + step
        total += torch.bmm(left[start:stop], right[start:stop].transpose(1, 2)).sum(0)
    return total


def position_weights(grads: torch.Tensor, position_norm: str) -> torch.Tensor | None:
    """Per-sample position weights ``(B, P)`` from output gradients ``(D, B, O, P)``, or ``None`` if uniform.

    ``w[n, t] = 1/|T_n|`` on the positions counted for sample ``n`` (see ``position_norm``), else 0.
    """
    n_pos = grads.shape[3]
    if position_norm == "all" or n_pos == 1:
        return None
    n_dirs, batch, d_out = grads.shape[:3]
    magnitude = grads.reshape(n_dirs * batch, d_out, n_pos).abs().amax(1)  # fast: reduce a middle dim
    used = magnitude.reshape(n_dirs, batch, n_pos).amax(0) > 0  # (B, P)
    count = used.sum(1, keepdim=True)
    if bool((count == n_pos).all()):
        return None
    weights = used.to(grads.dtype) / count.clamp_min(1)
    return torch.where(count > 0, weights, torch.full_like(weights, 1.0 / n_pos))


def input_factor(patches: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``A = sum_{n,t} w[n,t] a_{n,t} a_{n,t}^T`` from patches ``(B, Din, P)`` and weights ``(B, P)``.

    ``weights=None`` means ``w = 1/P`` everywhere.
    """
    batch, d_in, n_pos = patches.shape
    if n_pos == 1:
        rows = patches[:, :, 0]
        scaled = rows if weights is None else rows * weights
        return scaled.T @ rows
    if weights is None:
        return _batched_gram(patches, patches) / n_pos
    return _batched_gram(patches * weights[:, None, :], patches)


def output_factor(grads: torch.Tensor) -> torch.Tensor:
    """``B = sum_{d,n,t} g g^T`` from output gradients ``(D, B, O, P)``."""
    n_dirs, batch, d_out, n_pos = grads.shape
    if n_pos == 1:
        return _gram(grads.reshape(-1, d_out))
    flat = grads.reshape(n_dirs * batch, d_out, n_pos)
    return _batched_gram(flat, flat)


def bias_factor(grads: torch.Tensor) -> torch.Tensor:
    """Exact bias block ``sum_{d,n} (sum_t g)(sum_t g)^T`` from ``(D, B, O, P)``."""
    summed = grads.sum(3)
    return _gram(summed.reshape(-1, summed.shape[-1]))


def expand_blocks(
    prefix: str, module: nn.Module, patches: torch.Tensor, grads: torch.Tensor, position_norm: str
) -> dict[str, KronBlock]:
    """Weight (KFAC-expand) and exact bias blocks from patches ``(B, Din, P)`` and grads ``(D, B, O, P)``."""
    blocks: dict[str, KronBlock] = {}
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.requires_grad:
        a = input_factor(patches, position_weights(grads, position_norm))
        b = output_factor(grads)
        blocks[f"{prefix}weight"] = KronBlock(f"{prefix}weight", weight.shape, "kron", b[None], a[None])
    if bias is not None and bias.requires_grad:
        blocks[f"{prefix}bias"] = KronBlock(f"{prefix}bias", bias.shape, "single", bias_factor(grads)[None])
    return blocks


# ----------------------------------------------------------------------------------------------- patches


def im2col(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)
) -> torch.Tensor:
    """Patches of an already padded ``(B, C, H, W)`` input: ``(B, C*kh*kw, L)``, layout ``(C, kh, kw)``.

    Without dilation this is a strided view made contiguous once (faster than ``F.unfold`` on CPU).
    """
    if tuple(dilation) != (1, 1):
        return F.unfold(x, kernel_size, dilation=dilation, stride=stride)
    (kh, kw), (sh, sw) = kernel_size, stride
    windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)
    batch, channels, h_out, w_out = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kh * kw, h_out * w_out)


def conv_patches(x: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """im2col of a stock ``nn.Conv2d`` input, padded as the module pads it: ``(B, C*kh*kw, L)``."""
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    return im2col(x, module.kernel_size, module.stride, module.dilation)


def _circular_patches(x: torch.Tensor, kernel_size: int, padding: str = "circular") -> torch.Tensor:
    """Patches of a stride-1 'same' conv with ``k // 2`` padding: ``(B, C*k*k, H*W)``."""
    pad = kernel_size // 2
    if pad:
        x = F.pad(x, (pad,) * 4, mode="circular" if padding == "circular" else "constant")
    return im2col(x, (kernel_size, kernel_size))


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


def _rotation_blocks(
    prefix: str, module: nn.Module, patches: torch.Tensor, grads: torch.Tensor, options: RuleOptions
) -> dict[str, KronBlock]:
    """Blocks of a p4 conv from patches ``(B, 4, Din, L)`` and grads ``(D, B, 4C', H, W)``."""
    n_dirs, batch = grads.shape[:2]
    c_out = module.out_channels
    g = grads.reshape(n_dirs, batch, N_ROTATIONS, c_out, -1)  # (D, B, 4, C', L)
    if options.rotation_mode == "expand":
        pat = patches.transpose(1, 2).reshape(batch, patches.shape[2], -1)  # positions (4, L)
        grd = g.transpose(2, 3).reshape(n_dirs, batch, c_out, -1)
        return expand_blocks(prefix, module, pat, grd, options.position_norm)
    blocks = expand_blocks(prefix, module, patches.sum(1), g.mean(2), options.position_norm)
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:  # exact bias: sum over rotations *and* sites
        full = g.transpose(2, 3).reshape(n_dirs, batch, c_out, -1)
        blocks[f"{prefix}bias"] = KronBlock(f"{prefix}bias", bias.shape, "single", bias_factor(full)[None])
    return blocks


# ----------------------------------------------------------------------------------------------- rules

Rule = Callable[[str, nn.Module, torch.Tensor, torch.Tensor, RuleOptions], dict[str, KronBlock]]


def linear_rule(prefix: str, module: nn.Linear, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """``nn.Linear`` on ``(B, ..., I)``; extra leading axes are positions."""
    batch, n_dirs = x.shape[0], grads.shape[0]
    patches = x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)
    grd = grads.reshape(n_dirs, batch, -1, grads.shape[-1]).transpose(2, 3)
    return expand_blocks(prefix, module, patches, grd, options.position_norm)


def conv2d_rule(prefix: str, module: nn.Conv2d, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """Stock ``nn.Conv2d`` (``groups=1``), KFAC-expand over output sites."""
    if module.groups != 1:
        raise NotImplementedError(f"module {prefix.rstrip('.')} (Conv2d): groups={module.groups} is not supported")
    n_dirs, batch, c_out = grads.shape[:3]
    return expand_blocks(
        prefix, module, conv_patches(x, module), grads.reshape(n_dirs, batch, c_out, -1), options.position_norm
    )


def grouped_linear_rule(prefix: str, module: nn.Module, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """``GroupedLinear`` ``(B, G, I) -> (B, G, O)``, weight ``(O, G, I)``: per-group or reference blocks."""
    blocks: dict[str, KronBlock] = {}
    weight, bias = module.weight, module.bias
    n_dirs, batch, groups, d_out = grads.shape
    if weight.requires_grad:
        xg = x.transpose(0, 1)  # (G, B, I)
        a = torch.bmm(xg.transpose(1, 2), xg)  # (G, I, I)
        gg = grads.permute(2, 0, 1, 3).reshape(groups, n_dirs * batch, d_out)
        b = torch.bmm(gg.transpose(1, 2), gg)  # (G, O, O)
        if options.grouped_mode == "per_group":
            blocks[f"{prefix}weight"] = KronBlock(f"{prefix}weight", weight.shape, "direct_sum", b, a)
        else:
            b_shared = b.mean(0, keepdim=True)
            blocks[f"{prefix}weight"] = KronBlock(f"{prefix}weight", weight.shape, "shared_out", b_shared, a)
    if bias is not None and bias.requires_grad:
        blocks[f"{prefix}bias"] = KronBlock(
            f"{prefix}bias", bias.shape, "single", bias_factor(grads.transpose(2, 3))[None]
        )
    return blocks


def sparse_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """``SparseConv``: conv rule on the induced filter, patches projected tap-wise onto the anchors."""
    k = module.kernel_size
    patches = _circular_patches(x, k, module.padding)
    batch, _, n_loc = patches.shape
    taps = patches.reshape(batch, module.in_channels, k * k, n_loc)
    projected = torch.einsum("bctl,mt->bcml", taps, module.basis.detach().to(taps.dtype))
    n_dirs, _, c_out = grads.shape[:3]
    return expand_blocks(
        prefix,
        module,
        projected.reshape(batch, -1, n_loc),
        grads.reshape(n_dirs, batch, c_out, -1),
        options.position_norm,
    )


def lifting_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """``LiftingConv`` ``(B, C, H, W) -> (B, 4C', H, W)``: rotations as positions (or reduced)."""
    k = module.kernel_size
    patches = _circular_patches(x, k)
    lifted = patches[:, None].expand(-1, N_ROTATIONS, -1, -1)
    return _rotation_blocks(prefix, module, unrotated_patches(lifted, module.in_channels, k), grads, options)


def group_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, grads: torch.Tensor, options: RuleOptions):
    """``GroupConv`` ``(B, 4C, H, W) -> (B, 4C', H, W)``, pointwise or full."""
    k, c_in = module.kernel_size, module.in_channels
    patches = _circular_patches(x, k)  # (B, 4C*k*k, L), channels group-major
    if module.mode == "pointwise":
        per_slice = patches.reshape(patches.shape[0], N_ROTATIONS, c_in * k * k, -1)
        pat = unrotated_patches(per_slice, c_in, k)
    else:
        pat = full_group_patches(patches, c_in, k)
    return _rotation_blocks(prefix, module, pat, grads, options)


def _ella_rules() -> dict[type, Rule]:
    """Rules for ella's primitives (imported lazily so that kfac works on stock models without ella)."""
    from ella.layers.group import GroupConv, LiftingConv
    from ella.layers.grouped_linear import GroupedLinear
    from ella.layers.sparse import SparseConv

    return {
        GroupedLinear: grouped_linear_rule,
        SparseConv: sparse_conv_rule,
        LiftingConv: lifting_conv_rule,
        GroupConv: group_conv_rule,
    }


STOCK_RULES: dict[type, Rule] = {nn.Linear: linear_rule, nn.Conv2d: conv2d_rule}
HANDLED_PARAMS = frozenset({"weight", "bias"})


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type (exact ella types first, then stock types incl. subclasses)."""
    rules = _ella_rules()
    if type(module) in rules:
        return rules[type(module)]
    for cls, rule in STOCK_RULES.items():
        if isinstance(module, cls):
            return rule
    return None


def curvature_modules(model: nn.Module) -> dict[str, tuple[nn.Module, Rule]]:
    """Every module owning trainable parameters, with its rule; raise for anything unsupported."""
    found = {}
    for name, module in model.named_modules():
        own = [p_name for p_name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = find_rule(module)
        label = name or "<root>"
        if rule is None:
            raise NotImplementedError(
                f"module {label} ({type(module).__name__}) owns parameters {own} but has no KFAC rule"
            )
        unknown = sorted(set(own) - HANDLED_PARAMS)
        if unknown:
            raise NotImplementedError(
                f"module {label} ({type(module).__name__}): parameters {unknown} are not covered by its KFAC rule"
            )
        found[name] = (module, rule)
    return found
