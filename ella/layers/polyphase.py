"""Adaptive polyphase downsampling by 2 (APS, Chaman & Dokmanic 2021; the paper's App. F.2).

The 4 polyphase components of ``x (B, C, H, W)`` are ``x[:, :, a::2, b::2]`` with row offset ``a`` and
column offset ``b``; component index ``2*a + b``. Per sample, the component with the largest norm over
``(C, H/2, W/2)`` is kept (ties -> lowest index), so a circular shift of one input sample by ``(s, t)``
shifts that sample's output by ``(floor((a+s)/2), floor((b+t)/2))`` and leaves other samples untouched.
Gradients flow through the selected component only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CRITERIA = ("l2", "linf", "batch_signed_max")


def _check_even(x: torch.Tensor) -> None:
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"polyphase downsampling needs even H and W, got H={x.shape[-2]}, W={x.shape[-1]}")


def _phase_view(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, H/2, 2, W/2, 2)``: row offset ``a`` at dim 3, column offset ``b`` at dim 5."""
    if x.dim() != 4:
        raise ValueError(f"polyphase downsampling expects (B, C, H, W), got {tuple(x.shape)}")
    _check_even(x)
    batch, channels, height, width = x.shape
    return x.reshape(batch, channels, height // 2, 2, width // 2, 2)


def polyphase_components(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 4, C, H/2, W/2)``; component ``2*a + b`` is ``x[:, :, a::2, b::2]``."""
    view = _phase_view(x)
    return view.permute(0, 3, 5, 1, 2, 4).reshape(x.shape[0], 4, *view.shape[1:3], view.shape[4])


def component_scores(components: torch.Tensor, criterion: str) -> torch.Tensor:
    """Selection scores ``(B, 4)`` from components ``(B, 4, C, h, w)``.

    ``"l2"``: squared l2 norm per sample; ``"linf"``: max absolute value per sample;
    ``"batch_signed_max"``: the reference's signed max over the whole batch, broadcast to every sample.
    """
    flat = components.flatten(2)  # (B, 4, C*h*w)
    if criterion == "l2":
        return flat.pow(2).sum(-1)
    if criterion == "linf":
        return flat.abs().amax(-1)
    if criterion == "batch_signed_max":
        return flat.amax(-1).amax(0, keepdim=True).expand(flat.shape[0], -1)
    raise ValueError(f"unknown polyphase criterion {criterion!r}; expected one of {CRITERIA}")


class _SelectPhase(torch.autograd.Function):
    """Per-sample component selection ``(B, C, H, W), index (B,) -> (B, C, H/2, W/2)``.

    The backward zero-fills a ``(B, C, H/2, 2, W/2, 2)`` gradient and writes the incoming gradient into the
    chosen phase of every sample with one indexed assignment on a permuted view (several times faster than
    scattering through the advanced-indexing backward or masking with ``where``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _phase_view(x)[torch.arange(x.shape[0], device=x.device), :, :, index // 2, :, index % 2]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        batch, channels, height, width = grad.shape
        # zeros_like keeps a vmapped (batched) gradient batched, so the in-place write below stays legal
        full = torch.zeros_like(grad[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2)).contiguous()
        phases = full.permute(0, 3, 5, 1, 2, 4)  # (B, 2, 2, C, h, w) view
        phases[torch.arange(batch, device=grad.device), index // 2, index % 2] = grad
        return full.reshape(batch, channels, 2 * height, 2 * width), None


def phase_index(x: torch.Tensor, criterion: str = "l2") -> torch.Tensor:
    """Index ``(B,)`` of the component each sample of ``x (B, C, H, W)`` keeps (first maximum on ties)."""
    with torch.no_grad():
        return torch.argmax(component_scores(polyphase_components(x), criterion), dim=1)


def take_phase(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Component ``index[n]`` of every sample: ``(B, C, H, W), (B,) -> (B, C, H/2, W/2)``."""
    return _SelectPhase.apply(x, index)


def polyphase_select(x: torch.Tensor, criterion: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample ``(B, C, H, W) -> (B, C, H/2, W/2)``; also return the chosen component index ``(B,)``."""
    index = phase_index(x, criterion)
    return take_phase(x, index), index


def _circular_rows(size: int, count: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """``(2, count)``: row (or column) ``(r + a - k // 2) % size`` of ``x`` at window row ``r`` for offset ``a``."""
    offsets = torch.arange(2, device=device)[:, None] - kernel_size // 2
    return (offsets + torch.arange(count, device=device)) % size


def _gather_component(x: torch.Tensor, index: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)``, component ``index (B,)``, flat positions ``picks (4, L)`` per component ->
    ``(B, C, L)``. One gather; its backward is one scatter-add."""
    batch, channels, height, width = x.shape
    chosen = picks[index]  # (B, L)
    return x.reshape(batch, channels, height * width).gather(2, chosen[:, None, :].expand(-1, channels, -1))


def phase_windows(x: torch.Tensor, index: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample circular windows for computing one polyphase component of a convolution at stride 2.

    ``(B, C, H, W), (B,) -> (B, C, H + k - 2, W + k - 2)`` with ``window[n, :, r, s] =
    x[n, :, (r + a - k // 2) % H, (s + b - k // 2) % W]``, ``(a, b)`` the offsets of component ``index[n]``.
    A ``k x k`` 'valid' convolution of the windows at stride 2 equals component ``index[n]`` of the stride-1
    circular 'same' convolution of ``x``, at a quarter of its cost. This is the stock form of a stride-2 CONV
    path (:func:`~ella.layers.conv.with_stock_strided_convs`); ella's own form is :func:`phase_stack`.
    """
    _check_even(x)
    batch, channels, height, width = x.shape
    rows = _circular_rows(height, height + kernel_size - 2, kernel_size, x.device)  # (2, Hw): row offset a
    cols = _circular_rows(width, width + kernel_size - 2, kernel_size, x.device)  # (2, Ww): column offset b
    flat = rows[:, None, :, None] * width + cols[None, :, None, :]  # (2, 2, Hw, Ww)
    window = _gather_component(x, index, flat.reshape(4, -1))
    return window.reshape(batch, channels, rows.shape[1], cols.shape[1])


def phase_stack(x: torch.Tensor, index: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The windows of :func:`phase_windows` in space-to-depth form: ``(B, C, H, W), (B,) -> (B, 4C, h, w)``,
    ``h = (H + k - 1) // 2``, ``w = (W + k - 1) // 2``.

    Channel ``4c + 2p + q`` at ``(i, j)`` holds ``window[n, c, 2i + p, 2j + q]`` (the row and column past the
    window's ``H + k - 2`` continue circularly; they only meet the zero taps of :func:`stacked_filter`). A
    stride-1 convolution of this stack with :func:`stacked_filter` of a ``k x k`` filter equals the stride-2
    convolution of the windows, and its input gradient is a plain stride-1 convolution (the strided one is
    several times slower on CPU). One gather; its backward is one scatter-add.
    """
    _check_even(x)
    batch, channels, height, width = x.shape
    n_rows, n_cols = (height + kernel_size - 1) // 2, (width + kernel_size - 1) // 2
    rows = _circular_rows(height, 2 * n_rows, kernel_size, x.device).reshape(2, n_rows, 2).transpose(1, 2)  # [a, p, i]
    cols = _circular_rows(width, 2 * n_cols, kernel_size, x.device).reshape(2, n_cols, 2).transpose(1, 2)  # [b, q, j]
    flat = rows[:, None, :, None, :, None] * width + cols[None, :, None, :, None, :]  # [a, b, p, q, i, j]
    picks = flat.reshape(4, -1)  # component 2a + b
    stack = _gather_component(x, index, picks)
    return stack.reshape(batch, 4 * channels, n_rows, n_cols)


def stacked_filter(weight: torch.Tensor) -> torch.Tensor:
    """``(C', C, k, k) -> (C', 4C, (k+1)/2, (k+1)/2)`` for odd ``k``: the filter zero-padded to ``k + 1`` and split
    by tap parity, so that it acts on :func:`phase_stack` as the ``k x k`` filter acts at stride 2 on the windows."""
    c_out, c_in, k, _ = weight.shape
    half = (k + 1) // 2
    padded = F.pad(weight, (0, 1, 0, 1))  # tap u = 2 * a + p
    return padded.reshape(c_out, c_in, half, 2, half, 2).permute(0, 1, 3, 5, 2, 4).reshape(c_out, 4 * c_in, half, half)


def stacked_windows(stack: torch.Tensor) -> torch.Tensor:
    """The windows of a :func:`phase_stack` (odd ``k``): ``(B, 4C, h, w) -> (B, C, 2h - 1, 2w - 1)``, i.e.
    ``(H + k - 2, W + k - 2)``, on which a ``k x k`` stride-2 'valid' convolution gives the same component."""
    return F.pixel_shuffle(stack, 2)[:, :, : 2 * stack.shape[2] - 1, : 2 * stack.shape[3] - 1]


class PolyphaseDownsample(nn.Module):
    """``(B, C, H, W) -> (B, C, H/2, W/2)`` keeping, per sample, the polyphase component with the largest norm.

    ``criterion``: ``"l2"`` (default, APS), ``"linf"`` (max |value|, the paper's wording) or
    ``"batch_signed_max"`` (reference compatibility only: one choice for the whole batch by signed max,
    which makes a sample's output depend on the rest of the batch). Odd ``H`` or ``W`` raise ValueError.
    """

    def __init__(self, criterion: str = "l2") -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"PolyphaseDownsample: unknown criterion {criterion!r}; expected one of {CRITERIA}")
        self.criterion = criterion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H/2, W/2)``."""
        return polyphase_select(x, self.criterion)[0]

    def extra_repr(self) -> str:
        return f"criterion={self.criterion!r}"
