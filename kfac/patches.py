"""Patches of convolution inputs: the rows ``a`` whose Gram matrices are the input factors.

For ``weight (O, C, kh, kw)`` a patch is laid out ``(C, kh, kw)`` like one output channel's filter.
:class:`ConvWindows` holds the patches of an already padded input lazily (nothing is copied until a factor
needs them); :func:`periodic_gram` forms the input factor of a circular stride-1 convolution from the input's
circular cross-correlations, without patches. :func:`conv_patches` pads a stock ``nn.Conv2d``'s input exactly
as the module pads it (any stride, dilation, padding and ``padding_mode``); :func:`circular_patches` gives
the patches of a stride-1 "same" convolution with ``k // 2`` circular (or zero) padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def circular_patches(x: torch.Tensor, kernel_size: int, padding: str = "circular") -> torch.Tensor:
    """Patches of a stride-1 'same' conv of ``x (B, C, H, W)`` with ``k // 2`` circular padding (zeros for any
    other ``padding``): ``(B, C*k*k, H*W)``."""
    pad = kernel_size // 2
    if pad:
        x = F.pad(x, (pad,) * 4, mode="circular" if padding == "circular" else "constant")
    return im2col(x, (kernel_size, kernel_size))

