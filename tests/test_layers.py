"""Layer zoo: forward formulas, initialisation, parameter counts, sparse bases, meta device, relaxed layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ella.layers import (
    FC,
    Conv,
    FactoredFC,
    GroupConv,
    GroupedLinear,
    LiftingConv,
    PolyphaseDownsample,
    RelaxedLayer,
    SparseConv,
    SparseFC,
    anchor_count,
    grid_coordinates,
    interpolation_basis,
    project_onto_basis,
    with_stock_strided_convs,
)
from ella.layers.conv import StackedConv2d
from ella.layers.polyphase import phase_stack, phase_windows, polyphase_select, stacked_windows

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def circ_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Ground-truth circular cross-correlation from rolls: out[n,d,i,j] = sum w[d,c,u,v] x[n,c,i+u-p,j+v-p]."""
    k = w.shape[-1]
    p = k // 2
    out = sum(
        torch.einsum("dc,nchw->ndhw", w[:, :, u, v], torch.roll(x, shifts=(p - u, p - v), dims=(2, 3)))
        for u in range(k)
        for v in range(k)
    )
    return out if b is None else out + b[None, :, None, None]


def numpy_basis(anchors: torch.Tensor, side: int, omega: float = 1.0, sigma: float = 0.01) -> torch.Tensor:
    """Independent NumPy implementation of Psi = (K_ZZ + sigma^2 I)^{-1} K_ZT."""
    z = anchors.detach().cpu().numpy().astype(np.float64)
    axis = np.arange(side) - (side - 1) / 2
    grid = np.array([(i, j) for i in axis for j in axis], dtype=np.float64)

    def kern(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return (1 + 1e-6) * np.exp(-0.5 * omega**2 * d2)

    psi = np.linalg.solve(kern(z, z) + sigma**2 * np.eye(len(z)), kern(z, grid))
    return torch.from_numpy(psi)


# ---------------------------------------------------------------------------------------------- forwards
def test_grouped_linear_matches_loop():
    layer = GroupedLinear(3, 4, 5, dtype=DT)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 4, dtype=DT)
    expected = torch.stack(
        [torch.stack([layer.weight[:, g, :] @ x[n, g] + layer.bias for g in range(3)]) for n in range(2)]
    )
    torch.testing.assert_close(layer(x), expected)
    assert GroupedLinear(3, 4, 5, bias=False).bias is None


def test_grouped_linear_init_variance_and_validation():
    layer = GroupedLinear(50, 40, 60, init_variance=0.3)
    assert abs(layer.weight.var().item() / 0.3 - 1) < 0.05
    assert abs(GroupedLinear(50, 40, 60).weight.var().item() * 40 - 1) < 0.05
    assert torch.all(layer.bias == 0)
    with pytest.raises(ValueError, match="GroupedLinear expects"):
        layer(torch.randn(2, 50, 41))


def test_fc_channel_major_layout():
    c, d, hi, ho = 2, 3, 4, 2
    layer = FC(c, d, hi, ho, dtype=DT)
    torch.nn.init.normal_(layer.linear.bias)
    x = torch.randn(5, c, hi, hi, dtype=DT)
    w = layer.linear.weight.view(d, ho, ho, c, hi, hi)
    b = layer.linear.bias.view(d, ho, ho)
    expected = torch.einsum("dyzcij,ncij->ndyz", w, x) + b
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="FC expects"):
        layer(torch.randn(5, c, hi + 1, hi + 1, dtype=DT))


def test_fc_init():
    layer = FC(4, 4, 8, 8)
    assert torch.all(layer.linear.bias == 0)
    fan_in = 4 * 64
    assert abs(layer.linear.weight.var().item() * fan_in / 2 - 1) < 0.05  # Kaiming, ReLU gain


def test_conv_is_circular_and_pads_before_stock_module():
    layer = Conv(3, 4, dtype=DT)
    torch.nn.init.normal_(layer.conv.bias)
    x = torch.randn(2, 3, 5, 6, dtype=DT)
    torch.testing.assert_close(layer(x), circ_conv(x, layer.conv.weight, layer.conv.bias))
    assert layer.conv.padding == (0, 0)
    seen = []
    layer.conv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    layer(x)
    assert seen == [torch.Size([2, 3, 7, 8])]


def test_phase_windows_and_stack_follow_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 6, 8, dtype=DT)
    index = torch.tensor([0, 1, 2, 3])
    for k in (1, 3, 5):
        windows = phase_windows(x, index, k)
        assert windows.shape == (4, 2, 6 + k - 2, 8 + k - 2)
        stack = phase_stack(x, index, k)
        assert stack.shape == (4, 8, (6 + k - 1) // 2, (8 + k - 1) // 2)
        torch.testing.assert_close(stacked_windows(stack), windows, rtol=0, atol=0)
        for n in range(4):
            a, b = divmod(int(index[n]), 2)
            for i in range(6 + k - 2):
                for j in range(0, 8 + k - 2, 3):
                    expected = x[n, :, (i + a - k // 2) % 6, (j + b - k // 2) % 8]
                    torch.testing.assert_close(windows[n, :, i, j], expected)
                    torch.testing.assert_close(stack[n, 4 * torch.arange(2) + 2 * (i % 2) + j % 2, i // 2, j // 2], expected)
    for windows_of in (phase_windows, phase_stack):
        with pytest.raises(ValueError, match="even"):
            windows_of(torch.randn(1, 1, 5, 6), torch.zeros(1, dtype=torch.long), 3)


@pytest.mark.parametrize("kernel_size,size", [(3, 8), (3, 2), (5, 6), (1, 4)])
def test_strided_conv_computes_the_chosen_polyphase_component(kernel_size, size):
    """``Conv(stride=2)(x, phase)`` = component ``phase[n]`` of the stride-1 circular conv, values and gradients."""
    torch.manual_seed(1)
    full = Conv(3, 4, kernel_size, dtype=DT)
    torch.nn.init.normal_(full.conv.bias)
    strided = Conv(3, 4, kernel_size, stride=2, dtype=DT)
    strided.load_state_dict(full.state_dict())
    x = torch.randn(6, 3, size, size, dtype=DT, requires_grad=True)
    expected, index = polyphase_select(full(x))
    assert index.unique().numel() > 1 or size == 2  # several components chosen in one batch
    seed = torch.randn_like(expected)
    grads_expected = torch.autograd.grad(expected, [x, *full.parameters()], seed, retain_graph=True)
    stock = with_stock_strided_convs(strided)  # nn.Conv2d(stride=2) on phase windows, for curvlinops
    assert isinstance(strided.conv, StackedConv2d) and stock.conv.stride == (2, 2)
    assert [name for name, _ in stock.named_parameters()] == [name for name, _ in strided.named_parameters()]
    for form in (strided, stock):
        got = form(x, index)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(form.full_resolution(x), full(x), rtol=0, atol=1e-12)
        grads_got = torch.autograd.grad(got, [x, *form.parameters()], seed)
        for g_got, g_expected in zip(grads_got, grads_expected):
            torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


def test_strided_conv_validation():
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        Conv(2, 3, stride=3)
    with pytest.raises(ValueError, match="pass phase"):
        Conv(2, 3, stride=2)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="takes no phase"):
        Conv(2, 3)(torch.randn(1, 2, 4, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="stride 2"):
        RelaxedLayer({"conv": Conv(2, 3, stride=2)}, downsample=False)


def test_conv_init_is_kaiming_relu():
    layer = Conv(64, 64)
    assert abs(layer.conv.weight.var().item() / (2 / (9 * 64)) - 1) < 0.05
    assert torch.all(layer.conv.bias == 0)
    with pytest.raises(ValueError, match="odd"):
        Conv(2, 2, kernel_size=2)


def test_factored_fc_equals_dense_fc_with_rank_one_blocks():
    c, d, hi, ho = 3, 2, 4, 2
    x_sites, y_sites = hi * hi, ho * ho
    layer = FactoredFC(c, d, hi, ho, dtype=DT)
    torch.nn.init.normal_(layer.stage_u.bias)
    torch.nn.init.normal_(layer.stage_v.bias)
    u, b_u = layer.stage_u.weight, layer.stage_u.bias  # (d, c, X), (d)
    v, b_v = layer.stage_v.weight, layer.stage_v.bias  # (Y, d, c), (Y)
    dense = FC(c, d, hi, ho, dtype=DT)
    with torch.no_grad():
        w = torch.einsum("ydc,dcx->dycx", v, u)  # W[d,y,c,x] = V[y,d,c] U[d,c,x]
        dense.linear.weight.copy_(w.reshape(d * y_sites, c * x_sites))
        bias = b_v[None, :] + b_u[:, None] * v.sum(2).T  # b_V[y] + b_U[d] sum_c V[y,d,c]
        dense.linear.bias.copy_(bias.reshape(-1))
    x = torch.randn(5, c, hi, hi, dtype=DT)
    torch.testing.assert_close(layer(x), dense(x))


def test_factored_fc_init():
    c, x_sites, y_sites = 40, 64, 16
    layer = FactoredFC(c, 50, 8, 4)
    var_u, var_v = layer.stage_u.weight.var().item(), layer.stage_v.weight.var().item()
    assert abs(c * x_sites * var_u * var_v / 2 - 1) < 0.05  # ReLU gain of the product, as Kaiming for CONV
    assert abs(x_sites * var_u / (y_sites * var_v) - 1) < 0.05  # the two factors' norms balanced per pair
    assert torch.all(layer.stage_u.bias == 0) and torch.all(layer.stage_v.bias == 0)
    torch.manual_seed(0)
    x = torch.randn(256, c, 8, 8)
    out = torch.relu(FactoredFC(c, 50, 8, 4)(x))
    assert abs(out.pow(2).mean().item() - 1) < 0.15  # the second moment survives the ReLU


def test_group_conv_forward_formulas():
    c, d = 2, 3
    x = torch.randn(2, 4 * c, 6, 6, dtype=DT)
    pw = GroupConv(c, d, mode="pointwise", dtype=DT)
    full = GroupConv(c, d, mode="full", dtype=DT)
    lifting = LiftingConv(c, d, dtype=DT)
    for m in (pw, full, lifting):
        torch.nn.init.normal_(m.bias)
    xs = x.view(2, 4, c, 6, 6)
    expected_pw = torch.cat([circ_conv(xs[:, g], torch.rot90(pw.weight, g, (2, 3)), pw.bias) for g in range(4)], 1)
    torch.testing.assert_close(pw(x), expected_pw)
    expected_full = torch.cat(
        [
            sum(circ_conv(xs[:, h], torch.rot90(full.weight[:, :, (h - g) % 4], g, (2, 3))) for h in range(4))
            + full.bias[None, :, None, None]
            for g in range(4)
        ],
        1,
    )
    torch.testing.assert_close(full(x), expected_full)
    img = torch.randn(2, c, 6, 6, dtype=DT)
    expected_lift = torch.cat(
        [circ_conv(img, torch.rot90(lifting.weight, g, (2, 3)), lifting.bias) for g in range(4)], 1
    )
    torch.testing.assert_close(lifting(img), expected_lift)
    with pytest.raises(ValueError, match="mode"):
        GroupConv(2, 2, mode="separable")


# ---------------------------------------------------------------------------------------------- sparse
def test_anchor_count_rules():
    assert anchor_count(9) == 5
    assert anchor_count(9, "round", 0.5) == 4  # round(4.5) = 4 (half to even)
    assert anchor_count(9, "round", 0.8) == 7
    assert anchor_count(1) == 1 and anchor_count(1, "round") == 1  # round(0.5) = 0 -> min 1
    assert [anchor_count(s * s) for s in (32, 16, 8, 4, 2, 1)] == [512, 128, 32, 8, 2, 1]
    with pytest.raises(ValueError, match="rule"):
        anchor_count(9, "floor")


def test_grid_coordinates():
    g = grid_coordinates(3)
    assert g.shape == (9, 2)
    torch.testing.assert_close(g[0], torch.tensor([-1.0, -1.0], dtype=DT))
    torch.testing.assert_close(g[5], torch.tensor([0.0, 1.0], dtype=DT))  # row-major: t = i*side + j
    assert grid_coordinates(32).abs().max().item() == 15.5
    assert torch.all(grid_coordinates(1) == 0)


def test_interpolation_basis_matches_numpy_and_interpolates():
    anchors = torch.rand(5, 2, dtype=DT) * 2 - 1
    psi = interpolation_basis(anchors, grid_coordinates(3))
    torch.testing.assert_close(psi, numpy_basis(anchors, 3))
    psi_wide = interpolation_basis(anchors, grid_coordinates(3), omega=0.7, sigma=0.1)
    torch.testing.assert_close(psi_wide, numpy_basis(anchors, 3, omega=0.7, sigma=0.1))
    on_grid = interpolation_basis(grid_coordinates(3), grid_coordinates(3))  # anchors on the grid: ~identity
    torch.testing.assert_close(on_grid, torch.eye(9, dtype=DT), atol=2e-3, rtol=0)


def test_project_onto_basis_is_least_squares():
    psi = interpolation_basis(torch.rand(5, 2, dtype=DT) * 2 - 1, grid_coordinates(3))
    values = torch.randn(4, 3, 5, dtype=DT)
    torch.testing.assert_close(project_onto_basis(values @ psi, psi), values)  # exact when in the span
    dense = torch.randn(4, 3, 9, dtype=DT)
    fitted = project_onto_basis(dense, psi)
    residual = dense - fitted @ psi
    torch.testing.assert_close(residual @ psi.T, torch.zeros(4, 3, 5, dtype=DT), atol=1e-9, rtol=0)


def test_anchors_reproducible_and_inside_square():
    torch.manual_seed(3)
    a = SparseFC(2, 3, 8, 4)
    torch.manual_seed(3)
    b = SparseFC(2, 3, 8, 4)
    torch.testing.assert_close(a.anchors_in, b.anchors_in)
    torch.testing.assert_close(a.stage_u.weight, b.stage_u.weight)
    assert a.anchors_in.abs().max() <= 3.5 and a.anchors_out.abs().max() <= 1.5
    assert not torch.equal(a.anchors_in[:2], SparseFC(2, 3, 8, 4).anchors_in[:2])
    one = SparseFC(2, 3, 2, 1)
    assert one.anchors_out.shape == (1, 2) and torch.all(one.anchors_out == 0)


def test_sparse_conv_equals_conv_with_induced_filter():
    layer = SparseConv(3, 4, dtype=DT)
    assert layer.weight.shape == (4, 3, 5) and layer.basis.shape == (5, 9)
    torch.nn.init.normal_(layer.bias)
    psi = numpy_basis(layer.anchors, 3)
    torch.testing.assert_close(layer.basis, psi)
    filt = torch.einsum("dcm,mt->dct", layer.weight, psi).reshape(4, 3, 3, 3)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    torch.testing.assert_close(layer(x), circ_conv(x, filt, layer.bias))
    zero_pad = SparseConv(3, 4, padding="zeros", dtype=DT)
    expected = torch.nn.functional.conv2d(x, zero_pad.induced_weight(), zero_pad.bias, padding=1)
    torch.testing.assert_close(zero_pad(x), expected)


def test_sparse_fc_equals_factored_fc_with_induced_factors():
    c, d, hi, ho = 3, 2, 4, 2
    layer = SparseFC(c, d, hi, ho, dtype=DT)
    assert layer.stage_u.weight.shape == (d, c, 8) and layer.stage_v.weight.shape == (2, d, c)
    assert layer.stage_v.bias is None
    torch.nn.init.normal_(layer.stage_u.bias)
    psi_in, psi_out = numpy_basis(layer.anchors_in, hi), numpy_basis(layer.anchors_out, ho)
    ref = FactoredFC(c, d, hi, ho, dtype=DT)
    with torch.no_grad():
        ref.stage_u.weight.copy_(torch.einsum("dcm,mx->dcx", layer.stage_u.weight, psi_in))
        ref.stage_u.bias.copy_(layer.stage_u.bias)
        ref.stage_v.weight.copy_(torch.einsum("mdc,my->ydc", layer.stage_v.weight, psi_out))
        ref.stage_v.bias.zero_()
    x = torch.randn(5, c, hi, hi, dtype=DT)
    torch.testing.assert_close(layer(x), ref(x))


def test_sparse_init_is_projection_of_dense_init():
    # Projecting i.i.d. entries of variance v onto an M-dim subspace of R^T leaves variance (M/T) v per site;
    # the init rescales by sqrt(T/M), so the induced weights have the dense init's variance.
    conv = SparseConv(64, 64, dtype=DT)
    dense = torch.randn(64, 64, 9, dtype=DT) * (2 / (9 * 64)) ** 0.5
    assert abs(project_onto_basis(dense, conv.basis).matmul(conv.basis).var().item() / ((5 / 9) * 2 / (9 * 64)) - 1) < 0.1
    assert abs(conv.induced_weight().var().item() / (2 / (9 * 64)) - 1) < 0.1
    assert torch.all(conv.bias == 0)
    fc = SparseFC(32, 32, 4, 4, dtype=DT)
    assert abs(fc.induced_u().pow(2).mean().item() / (1 / 16) - 1) < 0.1
    assert abs(fc.induced_v().pow(2).mean().item() / (2 / 32) - 1) < 0.1
    assert torch.all(fc.stage_u.bias == 0)


# ---------------------------------------------------------------------------------------------- counts
CIFAR_BLOCKS = [(3, 10, 32, 32), (10, 20, 32, 16), (20, 20, 16, 16), (20, 40, 16, 8),
                (40, 40, 8, 8), (40, 80, 8, 4), (80, 80, 4, 2), (80, 160, 2, 1)]  # fmt: skip
SPEC_TABLE = {  # per block, from the formulas in count_params.py: FC, CONV, F-FC, S-FC, S-CONV M=7, M=4, M=5
    "FC": [31467520, 52433920, 26219520, 13109760, 6556160, 3278080, 409920, 51360],
    "CONV": [280, 1820, 3620, 7240, 14440, 28880, 57680, 115360],
    "F-FC": [62474, 256276, 205076, 256104, 204904, 256096, 128084, 64161],
    "S-FC": [30730, 128020, 102420, 128040, 102440, 128080, 64080, 38560],
    "S-CONV7": [220, 1420, 2820, 5640, 11240, 22480, 44880, 89760],
    "S-CONV4": [130, 820, 1620, 3240, 6440, 12880, 25680, 51360],
    "S-CONV5": [160, 1020, 2020, 4040, 8040, 16080, 32080, 64160],
}
HEAD = 109450


def build(kind: str, c: int, d: int, hi: int, ho: int) -> torch.nn.Module:
    makers = {
        "FC": lambda: FC(c, d, hi, ho),
        "CONV": lambda: Conv(c, d),
        "F-FC": lambda: FactoredFC(c, d, hi, ho),
        "S-FC": lambda: SparseFC(c, d, hi, ho),
        "S-CONV7": lambda: SparseConv(c, d, anchor_rule="round", anchor_factor=0.8),
        "S-CONV4": lambda: SparseConv(c, d, anchor_rule="round"),
        "S-CONV5": lambda: SparseConv(c, d),
    }
    return makers[kind]()


@pytest.mark.parametrize("kind", sorted(SPEC_TABLE))
def test_parameter_counts_match_spec_table_on_meta(kind):
    with torch.device("meta"):
        counts = [n_params(build(kind, *block)) for block in CIFAR_BLOCKS]
    assert counts == SPEC_TABLE[kind]


def test_model_totals_match_paper():
    assert sum(SPEC_TABLE["FC"]) + HEAD == 133_635_690
    assert sum(SPEC_TABLE["CONV"]) + HEAD == 338_770
    assert sum(SPEC_TABLE["F-FC"]) + HEAD == 1_542_625
    assert sum(SPEC_TABLE["S-FC"]) + HEAD == 831_820
    assert sum(SPEC_TABLE["S-CONV5"]) + HEAD == 237_050


@pytest.mark.parametrize("c,d,hi,ho", [(2, 3, 4, 2), (3, 5, 6, 6), (1, 4, 2, 1)])
def test_parameter_count_formulas(c, d, hi, ho):
    x_sites, y_sites = hi * hi, ho * ho
    m_x, m_y = math.ceil(x_sites / 2), math.ceil(y_sites / 2)
    assert n_params(FC(c, d, hi, ho)) == c * x_sites * d * y_sites + d * y_sites
    assert n_params(Conv(c, d)) == 9 * c * d + d
    assert n_params(FactoredFC(c, d, hi, ho)) == c * d * (x_sites + y_sites) + d + y_sites
    assert n_params(SparseFC(c, d, hi, ho)) == c * d * (m_x + m_y) + d
    assert n_params(SparseConv(c, d)) == c * d * 5 + d
    assert n_params(SparseConv(c, d, n_anchors=3)) == c * d * 3 + d
    assert n_params(GroupConv(c, d, mode="full")) == 36 * c * d + d
    assert n_params(GroupConv(c, d, mode="pointwise")) == 9 * c * d + d
    assert n_params(LiftingConv(c, d)) == 9 * c * d + d


def test_meta_device_construction_keeps_shapes_and_anchors():
    torch.manual_seed(7)
    real = SparseFC(2, 3, 4, 2)
    torch.manual_seed(7)
    meta = SparseFC(2, 3, 4, 2, device="meta")
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    torch.manual_seed(7)
    with torch.device("meta"):
        ctx = SparseConv(2, 3)
        others = [FC(2, 3, 4, 2), Conv(2, 3), FactoredFC(2, 3, 4, 2)]
        others += [GroupConv(2, 3, mode="full"), LiftingConv(2, 3)]
    assert ctx.weight.is_meta and ctx.basis.is_meta
    assert all(p.is_meta for m in others for p in m.parameters())


def test_meta_forward_shapes():
    with torch.device("meta"):
        layer = RelaxedLayer({"fc": FactoredFC(2, 3, 8, 4), "conv": SparseConv(2, 3)}, downsample=True)
        out = layer(torch.empty(5, 2, 8, 8))
    assert out.shape == (5, 3, 4, 4) and out.is_meta


def test_parameter_names_follow_contract():
    names = {n for n, _ in SparseFC(2, 3, 4, 2).named_parameters()}
    assert names == {"stage_u.weight", "stage_u.bias", "stage_v.weight"}
    names = {n for n, _ in FactoredFC(2, 3, 4, 2).named_parameters()}
    assert names == {"stage_u.weight", "stage_u.bias", "stage_v.weight", "stage_v.bias"}
    assert {n for n, _ in Conv(2, 3).named_parameters()} == {"conv.weight", "conv.bias"}
    assert {n for n, _ in FC(2, 3, 4, 2).named_parameters()} == {"linear.weight", "linear.bias"}
    kinds = {FC: "FC", Conv: "CONV", FactoredFC: "F-FC", SparseFC: "S-FC", SparseConv: "S-CONV"}
    kinds |= {GroupConv: "GCONV", LiftingConv: "GCONV"}
    for cls, kind in kinds.items():
        assert cls.kind == kind
        assert cls.equivariant == (kind in ("CONV", "S-CONV", "GCONV"))


# ---------------------------------------------------------------------------------------------- relaxed
def zero_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


@pytest.mark.parametrize("dense_kind", ["FC", "F-FC", "S-FC"])
@pytest.mark.parametrize("downsample", [True, False])
def test_relaxed_prior_limit(dense_kind, downsample):
    c, d, h = 2, 3, 8
    ho = h // 2 if downsample else h
    dense_cls = {"FC": FC, "F-FC": FactoredFC, "S-FC": SparseFC}[dense_kind]
    conv_cls = SparseConv if dense_kind == "S-FC" else Conv
    conv = conv_cls(c, d, dtype=DT)
    torch.nn.init.normal_(conv.bias if isinstance(conv, SparseConv) else conv.conv.bias)
    dense = zero_(dense_cls(c, d, h, ho, dtype=DT))
    x = torch.randn(4, c, h, h, dtype=DT)
    both_sum = RelaxedLayer({"fc": dense, "conv": conv}, downsample=downsample, combine="sum")
    conv_only = RelaxedLayer({"conv": conv}, downsample=downsample, combine="sum")
    torch.testing.assert_close(both_sum(x), conv_only(x), rtol=0, atol=0)
    pre = conv(x)
    if downsample:
        pre = polyphase_select(pre)[0]
    both_mean = RelaxedLayer({"fc": dense, "conv": conv}, downsample=downsample, combine="mean")
    torch.testing.assert_close(both_mean(x), torch.relu(pre / 2))
    assert not torch.allclose(both_mean(x), torch.relu(pre))  # the mean really halves the conv path
    both_sqrt = RelaxedLayer({"fc": dense, "conv": conv}, downsample=downsample)  # the default
    torch.testing.assert_close(both_sqrt(x), torch.relu(pre / 2**0.5))


def test_relaxed_layer_adds_dense_after_shared_downsampling():
    c, d = 2, 3
    conv, gconv_in = Conv(4 * c, 4 * d, dtype=DT), GroupConv(c, d, dtype=DT)
    fc = FactoredFC(4 * c, 4 * d, 8, 4, dtype=DT)
    layer = RelaxedLayer({"fc": fc, "conv": conv, "gconv": gconv_in}, downsample=True)
    x = torch.randn(3, 4 * c, 8, 8, dtype=DT)
    expected = torch.relu((PolyphaseDownsample()(conv(x) + gconv_in(x)) + fc(x)) / 3**0.5)
    torch.testing.assert_close(layer(x), expected)


def test_relaxed_layer_with_strided_paths_equals_full_resolution_paths():
    """Strided CONV paths give the layer of full-resolution paths: same choice, same values and gradients."""
    torch.manual_seed(2)
    c, d = 2, 3
    gconv = GroupConv(c, d, dtype=DT)
    torch.nn.init.normal_(gconv.bias)
    fc = FactoredFC(4 * c, 4 * d, 8, 4, dtype=DT)
    full, strided = Conv(4 * c, 4 * d, dtype=DT), Conv(4 * c, 4 * d, stride=2, dtype=DT)
    torch.nn.init.normal_(full.conv.bias)
    strided.load_state_dict(full.state_dict())
    x = torch.randn(5, 4 * c, 8, 8, dtype=DT, requires_grad=True)
    for others in ({}, {"fc": fc}, {"fc": fc, "gconv": gconv}):
        reference = RelaxedLayer({**others, "conv": full}, downsample=True)
        layer = RelaxedLayer({**others, "conv": strided}, downsample=True)
        out, expected = layer(x), reference(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(g, g_expected, rtol=0, atol=1e-12)


def test_relaxed_layer_validation():
    with pytest.raises(ValueError, match="'fc'"):
        RelaxedLayer({"fc": FC(2, 3, 8, 8), "conv": Conv(2, 3)}, downsample=True)(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="'fc' produced shape \\(1, 3, 4, 4\\), expected \\(1, 4, 4, 4\\)"):
        RelaxedLayer({"fc": FC(2, 3, 8, 4), "conv": Conv(2, 4)}, downsample=True)(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="'gconv'"):
        RelaxedLayer({"conv": Conv(8, 12), "gconv": GroupConv(2, 4)}, downsample=False)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="equivariant"):
        RelaxedLayer({"conv": torch.nn.Conv2d(2, 3, 3)}, downsample=False)
    with pytest.raises(ValueError, match="combine"):
        RelaxedLayer({"conv": Conv(2, 3)}, downsample=False, combine="max")
    with pytest.raises(ValueError, match="at least one"):
        RelaxedLayer({}, downsample=False)
    with pytest.raises(ValueError, match="even"):
        RelaxedLayer({"conv": Conv(2, 3)}, downsample=True)(torch.randn(1, 2, 7, 8))


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (6, 4)])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_circular_pad_gradient_is_the_exact_adjoint(size: tuple[int, int], kernel_size: int) -> None:
    """The hand-written backward of circular padding against autograd's numerical Jacobian."""
    from ella.layers.conv import circular_pad

    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(circular_pad(x, kernel_size), F.pad(x, (kernel_size // 2,) * 4, mode="circular"))
    assert torch.autograd.gradcheck(lambda t: circular_pad(t, kernel_size), (x,))
