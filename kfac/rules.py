"""Per-module Kronecker factor rules (input side ``A``, output-gradient side ``B``), one block per parameter.

Notation: ``x`` is the module input recorded in the forward pass, ``G`` the output gradients of all ``D``
loss-Hessian square-root directions, ``(D, *output.shape)``. A rule applied to a module is a
:class:`FactorBuilder`: it receives ``G`` in chunks ``(D_i, *output.shape)`` while the backward runs and keeps
only sums (output and bias factors) and "any"s (used positions) over them; the input factors are formed at the
end. All factors are *raw sums over the batch* (see :mod:`kfac.curvature` for how ``1 / n_data`` is applied).

Weight-sharing layers (convolutions, linear layers on inputs with extra leading axes, rotations of group
convolutions) use KFAC-expand (Grosse & Martens 2016; Eschenhagen et al. 2023): every output position is
treated like an extra sample,

    A = sum_n mean_{t in T_n} a_{n,t} a_{n,t}^T,        B = sum_{d,n,t} g_{d,n,t} g_{d,n,t}^T,

so that ``(1/N) B (x) A`` approximates ``sum_{n,t} (a a^T) (x) (g g^T)``. Position normalisation
(``position_norm``): ``"used"`` (default) takes ``T_n`` = the positions of sample ``n`` whose output gradient
is non-zero in some direction/channel (so sites discarded downstream, e.g. by polyphase subsampling, are not
counted; a sample with no such position averages over all positions); ``"all"`` takes every output position
(identical to curvlinops' ``expand``). With a single (used) position and one sample the rule is exact.

``kfac_approx="reduce"`` (KFAC-reduce, Eschenhagen et al. 2023) instead reduces the positions before the outer
products, over every position axis the rule would expand over (all ``P`` positions; ``position_norm`` does not
apply):

    A = sum_n abar_n abar_n^T,  abar_n = mean_t a_{n,t},        B = sum_{d,n} gsum_{d,n} gsum_{d,n}^T,  gsum = sum_t g,

identical to curvlinops' ``reduce``. ``B`` is then the exact bias block (formed once for both). It is exact
where every position's output gradient is the same linear map of the loss, e.g. a deep linear network of
circular stride-1 convolutions followed by global pooling, with the MSE loss.

Biases are always exact: ``B_bias = sum_{d,n} (sum_t g_{d,n,t}) (sum_t g_{d,n,t})^T``, summing the output
gradient over every position (and group / rotation) that shares the bias before the outer product.

Symmetric products wider than ``_SYM_BLOCK`` (F-FC output and bias factors) are accumulated block-wise, lower
block triangle only, and mirrored.

Rules:

- ``nn.Linear``: ``a`` = input rows (extra leading axes are positions).
- ``nn.Conv2d`` (``groups=1``; any stride/dilation/padding, any ``padding_mode``): ``a`` = im2col patches of
  the input padded exactly as the module pads it, layout ``(C, kh, kw)`` matching ``weight (O, C, kh, kw)``.
  When the (padded) input of a stride-1 conv is periodic with the output's period (circular padding, checked
  exactly), ``A`` comes from the input's circular cross-correlations (:func:`periodic_gram`) without patches.
- ``GroupedLinear`` ``weight (O, G, I)``: ``grouped_mode="per_group"`` (default): direct sum over groups of
  ``A_g = sum_n x_{n,g} x_{n,g}^T`` and ``B_g = sum_{d,n} g_{d,n,g} g_{d,n,g}^T``;
  ``"reference"``: block-diagonal ``A = blockdiag(A_g)`` with the shared output factor ``(1/G) sum_g B_g``
  (one Kronecker product, as laplace-torch needs).
- ``StackedConv2d`` (the stride-2 child of a downsampling CONV path) on a polyphase stack: the ``nn.Conv2d``
  rule at stride 2 on the windows the stack holds (:func:`ella.layers.polyphase.stacked_windows`).
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

from abc import ABC, abstractmethod
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
KFAC_APPROXES = ("expand", "reduce")


@dataclass(frozen=True)
class RuleOptions:
    """Choices shared by all rules (see the module docstring)."""

    grouped_mode: str = "per_group"
    rotation_mode: str = "expand"
    position_norm: str = "used"
    kfac_approx: str = "expand"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.grouped_mode, GROUPED_MODES, "grouped_mode"),
            (self.rotation_mode, ROTATION_MODES, "rotation_mode"),
            (self.position_norm, POSITION_NORMS, "position_norm"),
            (self.kfac_approx, KFAC_APPROXES, "kfac_approx"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------------------------- factors


_CHUNK_ELEMENTS = 1 << 23  # bound on temporaries of the batched Gram products
_CAT_ELEMENTS = 1 << 20  # row sets up to this size are concatenated into one Gram product
_SYM_BLOCK = 256  # symmetric products wider than this are computed block-wise, lower block triangle only


def _gram(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, d) -> (d, d)``: ``rows^T rows``, added onto ``out`` in place if given."""
    return rows.T @ rows if out is None else out.addmm_(rows.T, rows)


def _block_edges(d: int) -> list[int]:
    """Boundaries of about ``_SYM_BLOCK``-wide blocks of ``range(d)``."""
    n_blocks = -(-d // _SYM_BLOCK)
    return [round(i * d / n_blocks) for i in range(n_blocks + 1)]


def _lower_gram(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add the lower block triangle of ``rows^T rows`` for ``rows (M, d)`` (any row stride) onto ``out (d, d)``
    (zeros if ``None``) in place; blocks strictly above the diagonal are left untouched (see :func:`_mirror_lower`).

    The result is symmetric, so for ``k`` blocks only ``k (k + 1) / 2`` of the ``k^2`` block products are needed
    (62.5% of the operations for ``k = 4``); every block product reads column slices of ``rows`` in place.
    """
    d = rows.shape[1]
    out = rows.new_zeros(d, d) if out is None else out
    edges = _block_edges(d)
    for i in range(len(edges) - 1):
        rows_i = rows[:, edges[i] : edges[i + 1]]
        for j in range(i + 1):
            block = out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            block.addmm_(rows_i.T, rows[:, edges[j] : edges[j + 1]])
    return out


def _mirror_lower(out: torch.Tensor) -> torch.Tensor:
    """Complete ``(..., d, d)`` matrices of which :func:`_lower_gram` filled the lower block triangle, in place."""
    edges = _block_edges(out.shape[-1])
    for i in range(len(edges) - 1):
        for j in range(i):
            lower = out[..., edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            out[..., edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = lower.transpose(-1, -2)
    return out


def _batched_gram(grads: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_n grads[n] grads[n]^T`` for ``(N, d, P)`` -> ``(d, d)``, added onto ``out`` in place if given.

    Few long rows (``d <= P``): chunked ``bmm`` + sum (no copy of the input). Many short rows: one product of
    the ``(N*P, d)`` transpose (a ``(N, d, d)`` temporary would be larger than the input).
    """
    n, d, n_pos = grads.shape
    if d > n_pos:
        return _gram(grads.transpose(1, 2).reshape(-1, d), out)
    step = max(1, _CHUNK_ELEMENTS // max(1, d * d))
    total = grads.new_zeros(d, d) if out is None else out
    for start in range(0, n, step):
        part = grads[start : start + step]
        total += torch.bmm(part, part.transpose(1, 2)).sum(0)
    return total


def _nonzero_somewhere(grads: torch.Tensor) -> torch.Tensor:
    """``(D, B, O, P) -> (B, P)`` bool: some direction or output channel is non-zero at ``(n, t)``."""
    # two reductions over the channel axis (vectorised along the positions) and no full-size temporary
    return ((grads.amax(2) != 0) | (grads.amin(2) != 0)).any(0)


class UsedPositions:
    """``(B, P)`` bool, accumulated chunk by chunk: positions where some direction or output channel of the
    output gradients ``(D, B, O, P)`` is non-zero.

    The first direction is scanned; the positions that are zero there (usually none, unless sites are discarded
    downstream) are then looked up in the later directions: gathered when they are few, scanned when they are
    many.
    """

    def __init__(self) -> None:
        self._used: torch.Tensor | None = None
        self._scan = False
        self._sample = self._site = self._found = None

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        if self._used is None:
            self._used = _nonzero_somewhere(grads[:1])
            unknown = (~self._used).nonzero()  # (U, 2): sample and position
            self._scan = 8 * unknown.shape[0] > self._used.numel()
            self._sample, self._site = unknown[:, 0], unknown[:, 1]
            self._found = torch.zeros(unknown.shape[0], dtype=torch.bool, device=grads.device)
            grads = grads[1:]
        if grads.shape[0] == 0 or self._sample.numel() == 0:
            return
        if self._scan:
            self._used |= _nonzero_somewhere(grads)
        else:
            self._found |= grads[:, self._sample, :, self._site].ne(0).any(2).any(1)  # (U, D_i, O) -> (U,)

    def result(self) -> torch.Tensor:
        """The used positions ``(B, P)`` of all directions added so far."""
        used = self._used.clone()
        if not self._scan and self._sample.numel():
            used[self._sample, self._site] = self._found
        return used


@dataclass(frozen=True, eq=False)
class SampleWeights:
    """Position weights that are constant over the counted positions of each sample:
    ``w[n, t] = scale[n]`` where ``used[n, t]``, else 0; ``scale (B,)``, ``used (B, P)`` bool."""

    scale: torch.Tensor
    used: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The weights as a ``(B, P)`` tensor."""
        return self.used.to(self.scale.dtype) * self.scale[:, None]


def sample_weights(used: torch.Tensor, dtype: torch.dtype) -> SampleWeights | None:
    """Position weights ``1/|T_n|`` on the used positions ``used (B, P)`` of each sample (a sample without used
    positions counts all of them), or ``None`` when every position is used (uniform ``1/P``)."""
    n_pos = used.shape[1]
    count = used.sum(1)
    if bool((count == n_pos).all()):
        return None
    empty = count == 0
    used = used | empty[:, None]
    count = torch.where(empty, torch.full_like(count, n_pos), count)
    return SampleWeights(1.0 / count.to(dtype), used)


@dataclass(frozen=True, eq=False)
class ConvWindows:
    """Lazy patches of an already padded input ``x (B, C, H, W)`` for a ``kernel_size``/``stride`` convolution.

    Nothing is copied until :meth:`dense` (all patches) or :meth:`gram_at` (a Gram matrix over some positions)
    is called, so a factor that only needs the positions used downstream gathers just those.
    """

    x: torch.Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]

    def _windows(self) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return self.x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)

    def dense_shape(self) -> tuple[int, int, int]:
        """``(B, C*kh*kw, L)``: the shape of :meth:`dense` (nothing is computed)."""
        batch, channels, height, width = self.x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return batch, channels * kh * kw, ((height - kh) // sh + 1) * ((width - kw) // sw + 1)

    def mean(self) -> torch.Tensor:
        """The mean patch of every sample over the output positions, ``(B, C*kh*kw)`` (no patch copy)."""
        windows = self._windows()
        return windows.mean((2, 3)).reshape(windows.shape[0], -1)

    def dense(self) -> torch.Tensor:
        """All patches ``(B, C*kh*kw, L)``, layout ``(C, kh, kw)``, stored in ``(C*kh*kw, B, L)`` memory order."""
        windows = self._windows()
        batch, channels, h_out, w_out, kh, kw = windows.shape
        cols = windows.permute(1, 4, 5, 0, 2, 3).reshape(channels * kh * kw, batch, h_out * w_out)
        return cols.transpose(0, 1)

    def gram_at(self, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_u weights[u] a_u a_u^T`` over the patches at flat positions ``index (U,)`` (into ``B * L``,
        sample-major) -> ``(C*kh*kw, C*kh*kw)`` in the ``(C, kh, kw)`` layout.

        Gathers whole channel vectors from a channels-last copy of ``x`` (one row per position and tap), i.e.
        patches in ``(kh, kw, C)`` order, and permutes the small result instead of the patches.
        """
        batch, channels, height, width = self.x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        w_out = (width - kw) // sw + 1
        n_loc = ((height - kh) // sh + 1) * w_out
        sample, site = index // n_loc, index % n_loc
        corner = (sample * height + (site // w_out) * sh) * width + (site % w_out) * sw  # top-left pixel
        taps = torch.arange(kh, device=index.device)[:, None] * width + torch.arange(kw, device=index.device)
        pixels = self.x.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*H*W, C), one copy
        rows = pixels.index_select(0, (corner[:, None] + taps.reshape(-1)).reshape(-1))
        rows = rows.reshape(index.numel(), kh * kw * channels)
        gram = (rows * weights[:, None]).T @ rows  # (kh, kw, C) layout
        gram = gram.reshape(kh, kw, channels, kh, kw, channels).permute(2, 0, 1, 5, 3, 4)
        return gram.reshape(channels * kh * kw, channels * kh * kw)

    def periodic_core(self) -> torch.Tensor | None:
        """One period ``(B, C, H', W')`` of ``x`` if this is a circular stride-1 convolution, else ``None``.

        That is the case when the stride is 1 and ``x`` is periodic along both spatial axes with the period of the
        output size ``(H', W')`` (as after circular padding by ``k // 2``); checked exactly on the ``k - 1``
        wrapped rows and columns, so any input that satisfies it, whatever produced it, is one. (The polyphase
        windows of stride-2 CONV paths are periodic too, but there the spectral route costs more than the
        patches: see :func:`periodic_gram`.)
        """
        if tuple(self.stride) != (1, 1):
            return None
        (kh, kw), (height, width) = self.kernel_size, self.x.shape[-2:]
        h_out, w_out = height - kh + 1, width - kw + 1
        if h_out < 1 or w_out < 1:
            return None
        x = self.x
        rows_wrap = torch.equal(x[..., : height - h_out, :], x[..., h_out:, :])
        if not (rows_wrap and torch.equal(x[..., : width - w_out], x[..., w_out:])):
            return None
        return x[..., :h_out, :w_out]

    def sample_gram(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_n scale[n] sum_t a_{n,t} a_{n,t}^T`` over every position, ``scale (B,) >= 0`` -> ``(Din, Din)``;
        ``scale=None`` means ``1/L`` for every sample (``L`` output positions: the uniform expand weights).

        Circular stride-1 convolutions (:meth:`periodic_core`) use :func:`periodic_gram` (no patches); others
        scale each sample's input by ``sqrt(scale[n])`` (``None``: the product by ``1/L``) before one product of
        the patches.
        """
        n_pos = self.dense_shape()[2]
        core = self.periodic_core()
        if core is not None:
            scale = core.new_full((core.shape[0],), 1.0 / n_pos) if scale is None else scale
            return periodic_gram(core, scale, self.kernel_size)
        x = self.x if scale is None else self.x * scale.sqrt().to(self.x.dtype)[:, None, None, None]
        dense = ConvWindows(x, self.kernel_size, self.stride).dense()
        cols = dense.permute(1, 0, 2).reshape(dense.shape[1], -1)
        return cols @ cols.T / n_pos if scale is None else cols @ cols.T


def _cross_correlations(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``R[c, d, i, j] = sum_n scale[n] sum_s y[n, c, s] y[n, d, s + (i, j)]`` (circular) of ``y (B, C, h, w)``,
    ``(C, C, h, w)``, from the spectra: ``R = irfft2(sum_n scale[n] conj(Y_nc) Y_nd)``, with the sum over samples
    one real matrix product per frequency (real and imaginary parts as rows; complex ``bmm`` loops on CPU)."""
    batch, channels, height, width = y.shape
    spectra = torch.fft.rfft2(y)  # (B, C, h, w//2 + 1)
    n_freq = spectra.shape[-2] * spectra.shape[-1]
    parts = torch.view_as_real(spectra).reshape(batch, channels, n_freq, 2).permute(2, 3, 1, 0)
    parts = parts.reshape(n_freq, 2 * channels, batch)  # rows (re/im, c)
    prods = torch.bmm(parts * scale.to(y.dtype), parts.transpose(1, 2)).reshape(n_freq, 2, channels, 2, channels)
    real = prods[:, 0, :, 0] + prods[:, 1, :, 1]
    imag = prods[:, 0, :, 1] - prods[:, 1, :, 0]
    cross = torch.complex(real, imag).permute(1, 2, 0).reshape(channels, channels, height, spectra.shape[-1])
    return torch.fft.irfft2(cross, s=(height, width))


def periodic_gram(core: torch.Tensor, scale: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Input factor of a circular stride-1 convolution over one period ``core (B, C, H, W)``:
    ``sum_n scale[n] sum_t a_{n,t} a_{n,t}^T`` with ``a_{n,t}[(c, u, v)] = core[n, c, (i + u) % H, (j + v) % W]``
    at every position ``t = (i, j)``, ``(C*kh*kw, C*kh*kw)`` in the ``(C, kh, kw)`` layout.

    The entry for taps ``(c, u, v), (d, u', v')`` is the circular cross-correlation ``R[c, d](u' - u, v' - v)``
    (:func:`_cross_correlations`, all shifts at once): no patch copy, and ``O(B C^2 H W)`` operations instead of
    ``O(B (C k^2)^2 H W)``. Symmetrised. (At stride 2 the same holds for the polyphase components of ``core``,
    but with ``4C`` channels on small maps the transforms cost more than the patch product saves.)
    """
    batch, channels, height, width = core.shape
    kh, kw = kernel_size
    corr = _cross_correlations(core, scale)  # (C, C, H, W)
    du = torch.arange(kh, device=core.device)
    dv = torch.arange(kw, device=core.device)
    rows = (du[None, :] - du[:, None]) % height  # [u, u'] -> u' - u
    cols = (dv[None, :] - dv[:, None]) % width
    gram = corr[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (C, C, kh, kw, kh, kw): [c, d, u, v, u', v']
    gram = gram.permute(0, 2, 3, 1, 4, 5).reshape(channels * kh * kw, channels * kh * kw)
    return (gram + gram.T) / 2


Patches = torch.Tensor | ConvWindows


def input_factor(patches: Patches, weights: torch.Tensor | SampleWeights | None) -> torch.Tensor:
    """``A = sum_{n,t} w[n,t] a_{n,t} a_{n,t}^T`` from patches ``(B, Din, P)`` and weights ``(B, P)``.

    ``weights=None`` means ``w = 1/P`` everywhere. :class:`SampleWeights` (constant per sample on the counted
    positions, as :meth:`ExpandStats.weights` gives) take :func:`_sample_factor`. General weights: one matrix
    product over the ``(Din, B*P)`` columns, which is a free view when the patches are stored ``(Din, B, P)``
    (as :meth:`ConvWindows.dense` stores them) or ``(B, P, Din)`` (linear layers); when at most half the
    positions have non-zero weight (e.g. after polyphase subsampling) only the others enter the product
    (gathered straight from the windows for convolutions).
    """
    if isinstance(weights, SampleWeights):
        return _sample_factor(patches, weights)
    if weights is None and isinstance(patches, ConvWindows):
        return patches.sample_gram()
    flat = None if weights is None else weights.reshape(-1)
    keep = None if flat is None else flat.nonzero()[:, 0]
    if keep is not None and 2 * keep.numel() <= flat.numel():
        return _gram_at(patches, keep, flat[keep])
    dense = patches.dense() if isinstance(patches, ConvWindows) else patches
    batch, d_in, n_pos = dense.shape
    cols = dense.permute(1, 0, 2).reshape(d_in, batch * n_pos)
    if flat is None:
        return (cols @ cols.T) / n_pos
    return (cols * flat) @ cols.T


def _gram_at(patches: Patches, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_u weights[u] a_u a_u^T`` over the patches at flat positions ``index (U,)`` (sample-major)."""
    if isinstance(patches, ConvWindows):
        return patches.gram_at(index, weights)
    batch, d_in, n_pos = patches.shape
    kept = patches.permute(1, 0, 2).reshape(d_in, batch * n_pos).index_select(1, index)
    return (kept * weights) @ kept.T


def _sample_factor(patches: Patches, weights: SampleWeights) -> torch.Tensor:
    """``A`` for weights ``scale[n]`` on the used positions: the used positions gathered when they are at most
    half, else every position (:meth:`ConvWindows.sample_gram`: no full-size weighting, circular convolutions
    by FFT) minus the few unused ones, gathered."""
    used = weights.used.reshape(-1)
    n_pos = weights.used.shape[1]
    unused = (~used).nonzero()[:, 0]
    if 2 * unused.numel() >= used.numel():
        keep = used.nonzero()[:, 0]
        return _gram_at(patches, keep, weights.scale[keep // n_pos])
    if isinstance(patches, ConvWindows):
        full = patches.sample_gram(weights.scale)
    else:
        batch, d_in, _ = patches.shape
        cols = patches.permute(1, 0, 2).reshape(d_in, batch * n_pos)
        full = (cols * weights.scale.repeat_interleave(n_pos)) @ cols.T
    if unused.numel():
        full = full - _gram_at(patches, unused, weights.scale[unused // n_pos])
    return full


class RowsGram:
    """``sum_i rows_i^T rows_i`` over row sets ``(M_i, d)`` added one by one: small sets are held and joined into
    one product (products of a few hundred rows are dominated by call overhead), at most ``_CAT_ELEMENTS``
    elements at a time; lower block triangle only, mirrored in :meth:`result`."""

    def __init__(self) -> None:
        self._held: list[torch.Tensor] = []
        self._size = 0
        self._total: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Take one more row set ``(M_i, d)``."""
        self._held.append(rows)
        self._size += rows.numel()
        if self._size > _CAT_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            rows = self._held[0] if len(self._held) == 1 else torch.cat(self._held)
            self._total = _lower_gram(rows, self._total)
            self._held, self._size = [], 0

    def result(self) -> torch.Tensor:
        """The ``(d, d)`` sum of all row sets added."""
        self._flush()
        return _mirror_lower(self._total)


class ExpandStats:
    """What KFAC-expand needs from the output gradients ``(D, B, O, P)``, accumulated chunk by chunk: the output
    factor ``B = sum_{d,n,t} g g^T`` and the used positions (``position_norm="used"``) for the weight, the rows
    ``sum_t g`` of the exact bias block ``sum_{d,n} (sum_t g)(sum_t g)^T``. With one position (``P = 1``) and a
    bias, the weight's output factor is the bias block (the same rows), formed once."""

    def __init__(self, weight: bool, bias: bool, position_norm: str) -> None:
        self.weight, self.bias = weight, bias
        self._used = UsedPositions() if weight and position_norm == "used" else None
        self._out: torch.Tensor | RowsGram | None = None
        self._bias_rows = RowsGram() if bias else None
        self._n_pos = 0
        self._dtype: torch.dtype | None = None

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        _, _, d_out, n_pos = grads.shape
        self._n_pos, self._dtype = n_pos, grads.dtype
        if self.weight and n_pos > 1:
            if self._used is not None:
                self._used.add(grads)
            self._out = _batched_gram(grads.reshape(-1, d_out, n_pos), self._out)
        elif self.weight and not self.bias:  # one position: the rows themselves (with a bias: its rows, below)
            self._out = RowsGram() if self._out is None else self._out
            self._out.add(grads.reshape(-1, d_out))
        if self.bias:
            self._bias_rows.add(grads.sum(3).reshape(-1, d_out))

    def weights(self) -> SampleWeights | None:
        """Position weights of the input factor (``None``: uniform ``1/P``)."""
        if self._used is None or self._n_pos == 1:
            return None
        return sample_weights(self._used.result(), self._dtype)

    def blocks(self, prefix: str, module: nn.Module, patches: Callable[[], Patches]) -> dict[str, KronBlock]:
        """Weight (KFAC-expand, input factor from ``patches() (B, Din, P)``) and exact bias blocks."""
        blocks: dict[str, KronBlock] = {}
        bias = self._bias_rows.result() if self.bias else None
        if self.weight:
            a = input_factor(patches(), self.weights())
            if self._n_pos == 1 and self.bias:
                b = bias.clone()  # one position: the bias's rows, formed once, stored apart
            else:
                b = self._out.result() if isinstance(self._out, RowsGram) else self._out
            blocks[f"{prefix}weight"] = KronBlock(f"{prefix}weight", module.weight.shape, "kron", b[None], a[None])
        if self.bias:
            blocks[f"{prefix}bias"] = KronBlock(f"{prefix}bias", module.bias.shape, "single", bias[None])
        return blocks


class ReduceStats:
    """KFAC-reduce: the output gradients ``(D, B, O, P)`` are summed and the patches averaged over the positions
    first, then :class:`ExpandStats` forms the one-position blocks (there the weight's output factor is the exact
    bias block, formed once)."""

    def __init__(self, weight: bool, bias: bool) -> None:
        self._one_position = ExpandStats(weight, bias, "all")

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        self._one_position.add(grads.sum(3, keepdim=True))

    def blocks(self, prefix: str, module: nn.Module, patches: Callable[[], Patches]) -> dict[str, KronBlock]:
        """Weight (input factor from the mean of ``patches() (B, Din, P)`` over positions) and exact bias blocks."""

        def mean_patches() -> torch.Tensor:  # (B, Din, 1)
            found = patches()
            return found.mean()[:, :, None] if isinstance(found, ConvWindows) else found.mean(2, keepdim=True)

        return self._one_position.blocks(prefix, module, mean_patches)


def position_stats(weight: bool, bias: bool, options: RuleOptions) -> ExpandStats | ReduceStats:
    """The statistics of a weight shared over positions: KFAC-expand or KFAC-reduce (``options.kfac_approx``)."""
    if options.kfac_approx == "reduce":
        return ReduceStats(weight, bias)
    return ExpandStats(weight, bias, options.position_norm)


def _trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a parameter ``name`` that requires a gradient."""
    param = getattr(module, name, None)
    return param is not None and param.requires_grad


# ----------------------------------------------------------------------------------------------- patches


def im2col(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)
) -> torch.Tensor:
    """Patches of an already padded ``(B, C, H, W)`` input: ``(B, C*kh*kw, L)``, layout ``(C, kh, kw)``.

    Without dilation this is :meth:`ConvWindows.dense` (one copy of a strided view, faster than ``F.unfold``).
    """
    if tuple(dilation) != (1, 1):
        return F.unfold(x, kernel_size, dilation=dilation, stride=stride)
    return ConvWindows(x, tuple(kernel_size), tuple(stride)).dense()


def conv_patches(x: torch.Tensor, module: nn.Conv2d) -> Patches:
    """Patches of a stock ``nn.Conv2d`` input, padded as the module pads it: ``(B, C*kh*kw, L)`` (lazy
    :class:`ConvWindows` without dilation)."""
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    if tuple(module.dilation) != (1, 1):
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return ConvWindows(x, module.kernel_size, module.stride)


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


# ----------------------------------------------------------------------------------------------- rules


class FactorBuilder(ABC):
    """A rule applied to one recorded module: :meth:`add` takes the output gradients of some directions,
    ``(D_i, *output.shape)``, as the backward produces them (any number of chunks, in any order);
    :meth:`blocks` returns the module's curvature blocks."""

    @abstractmethod
    def add(self, grads: torch.Tensor) -> None:
        """Take the output gradients of some more directions."""

    @abstractmethod
    def blocks(self) -> dict[str, KronBlock]:
        """The curvature blocks of the module's trainable parameters."""


Rule = Callable[[str, nn.Module, torch.Tensor, RuleOptions], FactorBuilder]  # (prefix, module, input, options)


class SharedWeightBuilder(FactorBuilder):
    """A weight shared over positions, KFAC-expand or -reduce (``options.kfac_approx``), with an exact bias:
    ``to_sites`` maps a gradient chunk to ``(D_i, B, O, P)`` (positions last), ``patches()`` gives the matching
    patches ``(B, Din, P)`` when the blocks are formed (lazily: after the backward)."""

    def __init__(
        self,
        prefix: str,
        module: nn.Module,
        patches: Callable[[], Patches],
        to_sites: Callable[[torch.Tensor], torch.Tensor],
        options: RuleOptions,
    ) -> None:
        self.prefix, self.module, self.patches, self.to_sites = prefix, module, patches, to_sites
        self.stats = position_stats(_trainable(module, "weight"), _trainable(module, "bias"), options)

    def add(self, grads: torch.Tensor) -> None:
        self.stats.add(self.to_sites(grads))

    def blocks(self) -> dict[str, KronBlock]:
        return self.stats.blocks(self.prefix, self.module, self.patches)


class RotationReduceBuilder(FactorBuilder):
    """p4 convolutions with ``rotation_mode="reduce"``: KFAC-expand (or -reduce, ``options.kfac_approx``) over
    sites of ``a = sum_g a_g``, ``g = mean_g g_g``, and the exact bias summed over rotations *and* sites.
    Gradient chunks ``(D_i, B, 4C', H, W)``, patches ``(B, 4, Din, L)``."""

    def __init__(
        self, prefix: str, module: nn.Module, patches: Callable[[], torch.Tensor], batch: int, options: RuleOptions
    ) -> None:
        self.prefix, self.module, self.patches, self.batch = prefix, module, patches, batch
        self.stats = position_stats(_trainable(module, "weight"), False, options)
        self._bias_rows = RowsGram() if _trainable(module, "bias") else None

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


def _sites_last(batch: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(D, B, C, *sites) -> (D, B, C, P)``."""
    return lambda t: t.reshape(t.shape[0], batch, channels, -1)


def linear_rule(prefix: str, module: nn.Linear, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``nn.Linear`` on ``(B, ..., I)``; extra leading axes are positions."""
    batch, d_out = x.shape[0], module.out_features
    patches = x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)
    to_sites = lambda t: t.reshape(t.shape[0], batch, -1, d_out).transpose(2, 3)  # noqa: E731
    return SharedWeightBuilder(prefix, module, lambda: patches, to_sites, options)


def conv2d_rule(prefix: str, module: nn.Conv2d, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """Stock ``nn.Conv2d`` (``groups=1``), KFAC-expand (or -reduce) over output sites."""
    if module.groups != 1:
        raise NotImplementedError(f"module {prefix.rstrip('.')} (Conv2d): groups={module.groups} is not supported")
    return SharedWeightBuilder(
        prefix, module, lambda: conv_patches(x, module), _sites_last(x.shape[0], module.out_channels), options
    )


def _per_group_gram(grads: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``(D, B, G, O) -> (G, O, O)``: ``sum_{d,n} g g^T`` per group, added onto ``out`` in place if given.

    Wide (``O > _SYM_BLOCK``): lower block triangle only (:func:`_lower_gram` on each group's column slice in
    place; complete it with :func:`_mirror_lower`); narrow: one batched product of a group-major copy (complete).
    """
    n_dirs, batch, groups, d_out = grads.shape
    rows = grads.reshape(n_dirs * batch, groups, d_out)
    if d_out > _SYM_BLOCK:
        out = rows.new_zeros(groups, d_out, d_out) if out is None else out
        for g in range(groups):
            _lower_gram(rows[:, g], out[g])
        return out
    gg = rows.transpose(0, 1).contiguous()  # (G, N, O): bmm copies strided batch entries one by one otherwise
    return torch.bmm(gg.transpose(1, 2), gg) if out is None else out.baddbmm_(gg.transpose(1, 2), gg)


class GroupedLinearBuilder(FactorBuilder):
    """``GroupedLinear`` ``(B, G, I) -> (B, G, O)``, weight ``(O, G, I)``: per-group or reference blocks.
    Gradient chunks ``(D_i, B, G, O)``."""

    def __init__(self, prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> None:
        self.prefix, self.module, self.x, self.mode = prefix, module, x, options.grouped_mode
        self._out: torch.Tensor | None = None
        self._bias_rows = RowsGram() if _trainable(module, "bias") else None

    def add(self, grads: torch.Tensor) -> None:
        if self.module.weight.requires_grad:
            self._out = _per_group_gram(grads, self._out)
        if self._bias_rows is not None:  # the bias is shared by the groups: sum over them first
            self._bias_rows.add(grads.sum(2).reshape(-1, grads.shape[3]))

    def blocks(self) -> dict[str, KronBlock]:
        blocks: dict[str, KronBlock] = {}
        weight, bias, name = self.module.weight, self.module.bias, self.prefix
        if weight.requires_grad:
            xg = self.x.transpose(0, 1)  # (G, B, I): one product over few rows (no block split)
            a = torch.bmm(xg.transpose(1, 2), xg)  # (G, I, I)
            b = _mirror_lower(self._out)  # (G, O, O)
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
    from ella.layers.polyphase import stacked_windows

    k = module.kernel_size
    return SharedWeightBuilder(
        prefix, module, lambda: ConvWindows(stacked_windows(x), (k, k), (2, 2)),
        _sites_last(x.shape[0], module.weight.shape[0]), options,
    )


def sparse_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``SparseConv``: conv rule on the induced filter, patches projected tap-wise onto the anchors."""
    k = module.kernel_size

    def projected() -> torch.Tensor:
        patches = _circular_patches(x, k, module.padding)
        batch, _, n_loc = patches.shape
        taps = patches.reshape(batch, module.in_channels, k * k, n_loc)
        proj = torch.einsum("bctl,mt->bcml", taps, module.basis.detach().to(taps.dtype))
        return proj.reshape(batch, -1, n_loc)

    return SharedWeightBuilder(prefix, module, projected, _sites_last(x.shape[0], module.out_channels), options)


def lifting_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``LiftingConv`` ``(B, C, H, W) -> (B, 4C', H, W)``: rotations as positions (or reduced)."""
    k = module.kernel_size

    def patches() -> torch.Tensor:
        lifted = _circular_patches(x, k)[:, None].expand(-1, N_ROTATIONS, -1, -1)
        return unrotated_patches(lifted, module.in_channels, k)

    return _rotation_builder(prefix, module, patches, x.shape[0], options)


def group_conv_rule(prefix: str, module: nn.Module, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``GroupConv`` ``(B, 4C, H, W) -> (B, 4C', H, W)``, pointwise or full."""
    k, c_in = module.kernel_size, module.in_channels

    def patches() -> torch.Tensor:
        flat = _circular_patches(x, k)  # (B, 4C*k*k, L), channels group-major
        if module.mode == "pointwise":
            return unrotated_patches(flat.reshape(flat.shape[0], N_ROTATIONS, c_in * k * k, -1), c_in, k)
        return full_group_patches(flat, c_in, k)

    return _rotation_builder(prefix, module, patches, x.shape[0], options)


def _ella_rules() -> dict[type, Rule]:
    """Rules for ella's primitives (imported lazily so that kfac works on stock models without ella)."""
    from ella.layers.conv import StackedConv2d
    from ella.layers.group import GroupConv, LiftingConv
    from ella.layers.grouped_linear import GroupedLinear
    from ella.layers.sparse import SparseConv

    return {
        StackedConv2d: stacked_conv_rule,
        GroupedLinear: GroupedLinearBuilder,
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
