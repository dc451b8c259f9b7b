"""F-FC path: factored dense map with a rank-one spatial block per channel pair (spec 1.4)."""

from __future__ import annotations

import torch
from torch import nn

from ella.layers.fc import check_map_input
from ella.layers.grouped_linear import GroupedLinear


class FactoredFC(nn.Module):
    """Dense path ``(B, C, H_in, W_in) -> (B, C', H_out, W_out)`` with ``W[d,y,c,x] = V[y,d,c] * U[d,c,x]``.

    - ``stage_u = GroupedLinear(G=C, I=X, O=C')``: ``weight = U (C', C, X)``, ``bias = b_U (C')``.
      ``z[n, c, d] = sum_x U[d, c, x] x[n, c, x] + b_U[d]``.
    - ``stage_v = GroupedLinear(G=C', I=C, O=Y)``: ``weight = V (Y, C', C)``, ``bias = b_V (Y)``.
      ``out[n, d, y] = sum_c V[y, d, c] z[n, c, d] + b_V[y]``.

    Both stages are einsums (no block-diagonal expansion). Parameters ``C C' (X + Y) + C' + Y``.
    Init: ``U`` uniform with variance ``1/X``, ``V`` uniform with variance ``2/C`` (ReLU gain, so the path
    keeps the second moment of its input through the ReLU, as CONV's Kaiming init does), biases 0.
    """

    equivariant = False
    kind = "F-FC"

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
        n_in, n_out = in_size * in_size, out_size * out_size
        factory = {"device": device, "dtype": dtype}
        self.stage_u = GroupedLinear(in_channels, n_in, out_channels, init_variance=1.0 / n_in, **factory)
        self.stage_v = GroupedLinear(out_channels, in_channels, n_out, init_variance=2.0 / in_channels, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H_in, W_in) -> (B, C', H_out, W_out)``."""
        check_map_input(x, self.in_channels, self.in_size, "FactoredFC")
        z = self.stage_u(x.flatten(2))  # (B, C, C')
        out = self.stage_v(z.transpose(1, 2))  # (B, C', Y)
        return out.view(x.shape[0], self.out_channels, self.out_size, self.out_size)

    def extra_repr(self) -> str:
        return f"{self.in_channels}x{self.in_size}^2 -> {self.out_channels}x{self.out_size}^2"
