"""FC path: a dense affine map between whole feature maps."""

from __future__ import annotations

import torch
from torch import nn

from ella.layers.conv import kaiming_relu_uniform_


def check_map_input(x: torch.Tensor, channels: int, size: int, owner: str) -> None:
    """Raise a ValueError unless ``x`` has shape ``(B, channels, size, size)``."""
    if x.dim() != 4 or x.shape[1:] != (channels, size, size):
        raise ValueError(f"{owner} expects input (B, {channels}, {size}, {size}), got {tuple(x.shape)}")


class FC(nn.Module):
    """Dense path ``(B, C, H_in, W_in) -> (B, C', H_out, W_out)``.

    Child ``linear: nn.Linear(C*X, C'*Y)`` acting on the channel-major flattened input (``X = H_in*W_in``,
    ``Y = H_out*W_out``); the output is reshaped channel-major. Parameters: ``C*X*C'*Y`` weights and ``C'*Y``
    biases. Init: Kaiming-uniform with ReLU gain (variance ``2 / (C X)``, as CONV), bias 0.
    """

    equivariant = False
    kind = "FC"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: int,
        out_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_size = in_size
        self.out_size = out_size
        self.linear = nn.Linear(
            in_channels * in_size * in_size, out_channels * out_size * out_size, device=device, dtype=dtype
        )
        kaiming_relu_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H_in, W_in) -> (B, C', H_out, W_out)``."""
        check_map_input(x, self.in_channels, self.in_size, "FC")
        out = self.linear(x.flatten(1))
        return out.view(x.shape[0], self.out_channels, self.out_size, self.out_size)

    def extra_repr(self) -> str:
        return f"{self.in_channels}x{self.in_size}^2 -> {self.out_channels}x{self.out_size}^2"
