"""KFAC factors against exact GGN blocks (torch.func) where KFAC is exact, plus structural identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac import cpu_linalg
from kfac.curvature import KronBlock, KronCurvature
from kfac.decomposition import MEMO_MIN_SIZE, CurvatureError, EigenvalueMemo, _symmetric
from kfac.fit import fit_kfac, kfac_batch
from ella.layers.conv import Conv, circular_pad
from ella.layers.polyphase import PolyphaseDownsample, polyphase_select
from ella.layers.factored import FactoredFC
from ella.layers.group import GroupConv, LiftingConv, lift
from ella.layers.relaxed import RelaxedLayer
from ella.layers.sparse import SparseConv, SparseFC
from kfac.patches import ConvWindows, periodic_gram
from kfac.statistics import (
    ExpandStats,
    RowsGram,
    SampleWeights,
    UsedPositions,
    input_factor,
    mirror_lower,
    per_group_gram,
    sample_weights,
)
from kfac.sqrt_hessian import hessian_sqrt
from kfac_utils import exact_ggn_blocks, loss_hessians, rel_err

DT = torch.float64
TOL = 1e-8


class SiteReadout(nn.Module):
    """``(B, C_total, H, W)`` -> channels ``[start, start + C)`` at one site -> ``Linear(C, K)``."""

    def __init__(self, channels: int, site: tuple[int, int], n_out: int = 4, start: int = 0) -> None:
        super().__init__()
        self.channels, self.site, self.start = channels, site, start
        self.head = nn.Linear(channels, n_out, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.site
        return self.head(torch.tanh(x[:, self.start : self.start + self.channels, i, j]))


class RotationSumReadout(nn.Module):
    """Sum the 4 rotation slices at one site (output gradient identical for every rotation) -> Linear."""

    def __init__(self, channels: int, site: tuple[int, int], n_out: int = 3) -> None:
        super().__init__()
        self.channels, self.site = channels, site
        self.head = nn.Linear(channels, n_out, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.site
        summed = x[:, :, i, j].reshape(x.shape[0], 4, self.channels).sum(1)
        return self.head(summed)


class FlattenHead(nn.Module):
    def __init__(self, n_in: int, n_out: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(n_in, n_out, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x.flatten(1)))


def _check_all_blocks(model, x, y, likelihood="classification", names=None, **options):
    curv = kfac_batch(model, x, y, likelihood, **options)
    exact = exact_ggn_blocks(model, x, likelihood)
    for name in names or curv.block_names:
        assert rel_err(curv.dense(name), exact[name]) < TOL, name
    return curv, exact


def _labels(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) % k


# ------------------------------------------------------------------------------------ dense layers


@pytest.mark.parametrize("bias", [True, False])
def test_linear_single_sample_is_exact(bias):
    """With a bias the weight's output factor is formed from the bias's rows; without, from its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(DT)
    curv, _ = _check_all_blocks(model, torch.randn(1, 4, dtype=DT), _labels(1, 3))
    assert len(curv.block_names) == (4 if bias else 2)


def test_deep_linear_network_with_mse_is_exact_for_many_samples():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 2, dtype=DT)
    _check_all_blocks(model, x, y, "regression")


def test_linear_with_position_axis_bias_exact_and_weight_expand():
    torch.manual_seed(2)
    lin = nn.Linear(3, 4, dtype=DT)
    model = nn.Sequential(lin, nn.Flatten(), nn.Tanh(), nn.Linear(4 * 5, 3, dtype=DT))
    x = torch.randn(6, 5, 3, dtype=DT)
    curv = kfac_batch(model, x, _labels(6, 3))
    exact = exact_ggn_blocks(model, x)
    assert rel_err(curv.dense("0.bias"), exact["0.bias"]) < TOL
    _, a = curv.scaled_factors("0.weight")
    expected_a = torch.einsum("npi,npj->ij", x, x) / 5 / 6  # per-sample mean over positions, / n_data
    assert rel_err(a[0], expected_a) < 1e-12


# ------------------------------------------------------------------------------------ convolutions


def test_ella_conv_single_used_site_is_exact():
    torch.manual_seed(3)
    model = nn.Sequential(Conv(2, 3).to(DT), SiteReadout(3, (0, 3)))
    _check_all_blocks(model, torch.randn(1, 2, 5, 5, dtype=DT), _labels(1, 4))


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=1, padding=2, dilation=2),
        dict(stride=1, padding=1, padding_mode="circular"),
    ],
)
def test_stock_conv2d_single_used_site_is_exact(conv_kwargs):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, dtype=DT, **conv_kwargs), SiteReadout(3, (1, 2)))
    _check_all_blocks(model, torch.randn(1, 2, 6, 6, dtype=DT), _labels(1, 4))


def _circular_patches_by_roll(x: torch.Tensor) -> torch.Tensor:
    """Independent im2col for a 3x3 circular conv: ``(B, C*9, H*W)`` from rolled copies."""
    rows = [torch.roll(x, shifts=(1 - u, 1 - v), dims=(2, 3)) for u in range(3) for v in range(3)]
    stacked = torch.stack(rows, dim=2)  # (B, C, 9, H, W)
    return stacked.reshape(x.shape[0], -1, x.shape[2] * x.shape[3])


def test_ella_conv_many_samples_bias_exact_and_input_factor_matches_rolled_patches():
    torch.manual_seed(5)
    model = nn.Sequential(Conv(2, 3).to(DT), FlattenHead(3 * 16))
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    curv, exact = _check_all_blocks(model, x, _labels(4, 3), names=["0.conv.bias", "1.head.bias"])
    patches = _circular_patches_by_roll(x)
    expected = torch.einsum("bip,bjp->ij", patches, patches) / 16 / 4
    assert rel_err(curv.scaled_factors("0.conv.weight")[1][0], expected) < 1e-12


def test_used_positions_skip_subsampled_sites():
    """Sites dropped downstream (stride-2 selection) are excluded from A under ``position_norm='used'``."""
    torch.manual_seed(6)

    class Subsample(nn.Module):
        def forward(self, x):
            return x[:, :, ::2, ::2]

    model = nn.Sequential(Conv(2, 3).to(DT), Subsample(), FlattenHead(3 * 4))
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    patches = _circular_patches_by_roll(x).reshape(3, 18, 4, 4)
    kept = patches[:, :, ::2, ::2].reshape(3, 18, 4)
    used = kfac_batch(model, x, _labels(3, 3)).scaled_factors("0.conv.weight")[1][0]
    assert rel_err(used, torch.einsum("bip,bjp->ij", kept, kept) / 4 / 3) < 1e-12
    all_sites = kfac_batch(model, x, _labels(3, 3), position_norm="all").scaled_factors("0.conv.weight")[1][0]
    flat = patches.reshape(3, 18, 16)
    assert rel_err(all_sites, torch.einsum("bip,bjp->ij", flat, flat) / 16 / 3) < 1e-12
    exact = exact_ggn_blocks(model, x)
    assert rel_err(kfac_batch(model, x, _labels(3, 3)).dense("0.conv.bias"), exact["0.conv.bias"]) < TOL


class GlobalMeanHead(nn.Module):
    """Mean over every axis after the channels (sites, rotations folded into channels stay apart), then Linear."""

    def __init__(self, n_in: int, n_out: int = 2, rotations: int = 1) -> None:
        super().__init__()
        self.rotations = rotations
        self.head = nn.Linear(n_in, n_out, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.reshape(x.shape[0], self.rotations, -1, x.shape[2] * x.shape[3]).mean((1, 3))
        return self.head(pooled)


def _deep_linear_circular_nets() -> dict[str, nn.Module]:
    """Linear networks of circular stride-1 (group) convolutions ending in global mean pooling: every position's
    output gradient is the same map of the loss, which makes KFAC-reduce exact for any number of samples (MSE)."""
    return {
        "conv": nn.Sequential(Conv(2, 3).to(DT), SparseConv(3, 3, dtype=DT), Conv(3, 4).to(DT), GlobalMeanHead(4)),
        "p4": nn.Sequential(
            LiftingConv(2, 2, dtype=DT), GroupConv(2, 3, mode="full", dtype=DT), GroupConv(3, 2, dtype=DT),
            GlobalMeanHead(2, rotations=4),
        ),
    }


@pytest.mark.parametrize("net", ["conv", "p4"])
@pytest.mark.parametrize("rotation_mode", ["expand", "reduce"])
def test_reduce_is_exact_for_deep_linear_circular_nets_with_global_pooling(net, rotation_mode):
    torch.manual_seed(9)
    model = _deep_linear_circular_nets()[net]
    x, y = torch.randn(5, 2, 5, 5, dtype=DT), torch.randn(5, 2, dtype=DT)
    _check_all_blocks(model, x, y, "regression", kfac_approx="reduce", rotation_mode=rotation_mode)
    # teeth: KFAC-expand is not exact here (it treats the positions as independent samples)
    expand = kfac_batch(model, x, y, "regression", position_norm="all")
    first_weight = next(name for name in expand.block_names if name.endswith("weight"))
    assert rel_err(expand.dense(first_weight), exact_ggn_blocks(model, x, "regression")[first_weight]) > 1e-2


def test_reduce_factors_are_mean_patches_and_summed_gradients():
    """``A = sum_n abar abar^T`` (mean patch over positions), ``B`` = the exact bias block, for a stride-2 layer."""
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1, dtype=DT)
    model = nn.Sequential(Conv(2, 3).to(DT), nn.ReLU(), conv, FlattenHead(2 * 9))
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    curv = kfac_batch(model, x, _labels(4, 3), kfac_approx="reduce")
    with torch.no_grad():
        patches = F.unfold(model[1](model[0](x)), 3, padding=1, stride=2)  # (B, 27, 9)
    mean = patches.mean(2)
    b, a = curv.blocks["2.weight"].out_factors[0], curv.blocks["2.weight"].in_factors[0]
    assert rel_err(a, mean.T @ mean) < 1e-12
    assert rel_err(b, curv.blocks["2.bias"].out_factors[0]) < 1e-12
    exact = exact_ggn_blocks(model, x)
    assert rel_err(curv.dense("2.bias"), exact["2.bias"]) < TOL


# ------------------------------------------------------------------------------------ grouped / factored


def _group_block(dense: torch.Tensor, shape: torch.Size, g: int) -> torch.Tensor:
    """Rows/cols of ``weight[:, g, :]`` (weight ``(O, G, I)``) in a dense ``(P, P)`` matrix."""
    o, groups, i = shape
    idx = torch.arange(o * groups * i).reshape(o, groups, i)[:, g, :].reshape(-1)
    return dense[idx][:, idx]


@pytest.mark.parametrize("layer_cls", [FactoredFC, SparseFC])
def test_grouped_linear_per_group_blocks_exact_for_one_sample(layer_cls):
    torch.manual_seed(7)
    layer = layer_cls(2, 3, 4, 2, dtype=DT)
    model = nn.Sequential(layer, FlattenHead(3 * 4))
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    curv = kfac_batch(model, x, _labels(1, 3))
    exact = exact_ggn_blocks(model, x)
    for name in ("0.stage_u.weight", "0.stage_v.weight"):
        block = curv.blocks[name]
        assert block.layout == "direct_sum"
        shape = block.param_shape
        for g in range(shape[1]):
            want = _group_block(exact[name], shape, g)
            assert rel_err(_group_block(curv.dense(name), shape, g), want) < TOL, (name, g)
            b, a = curv.scaled_factors(name)
            assert rel_err(torch.kron(b[g], a[g]), want) < TOL
    assert rel_err(curv.dense("0.stage_u.bias"), exact["0.stage_u.bias"]) < TOL


@pytest.mark.parametrize("layer_cls", [FactoredFC, SparseFC])
def test_grouped_linear_biases_exact_for_many_samples(layer_cls):
    torch.manual_seed(8)
    model = nn.Sequential(layer_cls(2, 3, 4, 2, dtype=DT), FlattenHead(3 * 4))
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    _check_all_blocks(model, x, _labels(5, 3), names=names)


def test_wide_symmetric_products_are_complete():
    """Products wider than one block are computed from the lower block triangle: the mirrored result equals
    the plain product, for row chunks (bias / linear factors) and for per-group column slices."""
    torch.manual_seed(37)
    rows = [torch.randn(70, 600, dtype=DT), torch.randn(5, 700, dtype=DT)[:, 50:650]]  # one with a row stride
    expected = sum(r.T @ r for r in rows)
    total = RowsGram()
    for part in rows:
        total.add(part)
    assert rel_err(total.result(), expected) < 1e-14
    grads = torch.randn(2, 3, 4, 530, dtype=DT)  # (D, B, G, O)
    got = mirror_lower(per_group_gram(grads[1:], per_group_gram(grads[:1], None)))
    assert rel_err(got, torch.einsum("dngo,dngp->gop", grads, grads)) < 1e-14


def test_grouped_linear_with_wide_output_is_exact_for_one_sample():
    """Per-group blocks of an F-FC path whose V stage has 289 outputs (lower-triangle products) are exact."""
    torch.manual_seed(38)
    model = nn.Sequential(FactoredFC(2, 3, 4, 17, dtype=DT), FlattenHead(3 * 289))
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    curv = kfac_batch(model, x, _labels(1, 3))
    exact = exact_ggn_blocks(model, x)
    name = "0.stage_v.weight"
    for g in range(3):
        want = _group_block(exact[name], curv.blocks[name].param_shape, g)
        assert rel_err(_group_block(curv.dense(name), curv.blocks[name].param_shape, g), want) < TOL
    assert rel_err(curv.dense("0.stage_v.bias"), exact["0.stage_v.bias"]) < TOL


def test_grouped_linear_reference_mode_shares_the_average_output_factor():
    torch.manual_seed(9)
    model = nn.Sequential(FactoredFC(2, 3, 4, 2, dtype=DT), FlattenHead(3 * 4))
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    per = kfac_batch(model, x, _labels(5, 3))
    ref = kfac_batch(model, x, _labels(5, 3), grouped_mode="reference")
    for name in ("0.stage_u.weight", "0.stage_v.weight"):
        b_per, a_per = per.scaled_factors(name)
        b_ref, a_ref = ref.scaled_factors(name)
        assert ref.blocks[name].layout == "shared_out" and b_ref.shape[0] == 1
        assert rel_err(b_ref[0], b_per.mean(0)) < 1e-12
        assert rel_err(a_ref, a_per) < 1e-12
        b_lap, a_lap = ref.blocks[name].laplace_factors(ref.n_data)
        assert rel_err(torch.kron(b_lap, a_lap), ref.dense(name)) < 1e-12


# ------------------------------------------------------------------------------------ sparse conv


def test_sparse_conv_single_used_site_is_exact():
    torch.manual_seed(10)
    model = nn.Sequential(SparseConv(2, 3, dtype=DT), SiteReadout(3, (2, 1)))
    _check_all_blocks(model, torch.randn(1, 2, 5, 5, dtype=DT), _labels(1, 4))


def test_sparse_conv_input_factor_is_projected_conv_factor_and_bias_exact():
    torch.manual_seed(11)
    sparse = SparseConv(2, 3, dtype=DT)
    conv = Conv(2, 3).to(DT)
    with torch.no_grad():
        conv.conv.weight.copy_(sparse.induced_weight())
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    y = _labels(3, 3)
    torch.manual_seed(12)
    head_s = FlattenHead(3 * 16)
    head_c = FlattenHead(3 * 16)
    head_c.load_state_dict(head_s.state_dict())
    curv_s = kfac_batch(nn.Sequential(sparse, head_s), x, y)
    curv_c = kfac_batch(nn.Sequential(conv, head_c), x, y)
    psi = torch.kron(torch.eye(2, dtype=DT), sparse.basis.contiguous())  # (C*M, C*T)
    a_conv = curv_c.scaled_factors("0.conv.weight")[1][0]
    assert rel_err(curv_s.scaled_factors("0.weight")[1][0], psi @ a_conv @ psi.T) < 1e-12
    assert rel_err(curv_s.scaled_factors("0.weight")[0], curv_c.scaled_factors("0.conv.weight")[0]) < 1e-10
    exact = exact_ggn_blocks(nn.Sequential(sparse, head_s), x)
    assert rel_err(curv_s.dense("0.bias"), exact["0.bias"]) < TOL


# ------------------------------------------------------------------------------------ group convolutions


def _group_layer(kind: str) -> tuple[nn.Module, int]:
    """Layer and its input channel count (C for lifting, 4C for group convs)."""
    if kind == "lifting":
        return LiftingConv(2, 3, dtype=DT), 2
    return GroupConv(2, 3, mode=kind, dtype=DT), 8


@pytest.mark.parametrize("kind", ["lifting", "pointwise", "full"])
@pytest.mark.parametrize("rotation", [0, 1, 2, 3])
def test_group_conv_single_rotation_and_site_is_exact(kind, rotation):
    torch.manual_seed(13 + rotation)
    layer, c_in = _group_layer(kind)
    model = nn.Sequential(layer, SiteReadout(3, (1, 3), start=3 * rotation))
    _check_all_blocks(model, torch.randn(1, c_in, 5, 5, dtype=DT), _labels(1, 4))


@pytest.mark.parametrize("kind", ["lifting", "pointwise", "full"])
def test_group_conv_reduce_is_exact_when_rotations_share_the_gradient(kind):
    torch.manual_seed(17)
    layer, c_in = _group_layer(kind)
    model = nn.Sequential(layer, RotationSumReadout(3, (2, 0)))
    _check_all_blocks(model, torch.randn(1, c_in, 5, 5, dtype=DT), _labels(1, 3), rotation_mode="reduce")


@pytest.mark.parametrize("kind", ["lifting", "pointwise", "full"])
@pytest.mark.parametrize("rotation_mode", ["expand", "reduce"])
def test_group_conv_bias_exact_for_many_samples_and_positions(kind, rotation_mode):
    torch.manual_seed(18)
    layer, c_in = _group_layer(kind)
    model = nn.Sequential(layer, FlattenHead(12 * 16))
    x = torch.randn(3, c_in, 4, 4, dtype=DT)
    _check_all_blocks(model, x, _labels(3, 3), names=["0.bias", "1.head.bias"], rotation_mode=rotation_mode)


def test_pointwise_group_conv_input_factor_on_lifted_input_matches_lifting_conv():
    """On a lifted input the pointwise group conv sees exactly the lifting conv's patches."""
    torch.manual_seed(19)
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    lifting, pointwise = LiftingConv(2, 3, dtype=DT), GroupConv(2, 3, dtype=DT)
    curv_l = kfac_batch(nn.Sequential(lifting, FlattenHead(12 * 16)), x, _labels(3, 3), position_norm="all")
    curv_p = kfac_batch(nn.Sequential(pointwise, FlattenHead(12 * 16)), lift(x), _labels(3, 3), position_norm="all")
    assert rel_err(curv_p.scaled_factors("0.weight")[1], curv_l.scaled_factors("0.weight")[1]) < 1e-12


# ------------------------------------------------------------------------------------ loss Hessian roots


@pytest.mark.parametrize("rank_reduced", [True, False])
def test_softmax_hessian_square_roots(rank_reduced):
    torch.manual_seed(20)
    logits = torch.randn(6, 5, dtype=DT) * 3
    seeds = hessian_sqrt(logits, _labels(6, 5), "classification", "ggn", rank_reduced=rank_reduced)
    assert seeds.shape[0] == (4 if rank_reduced else 5)
    product = torch.einsum("dbk,dbl->bkl", seeds, seeds)
    assert rel_err(product, loss_hessians(logits, "classification")) < 1e-12


def test_empirical_fisher_seed_is_the_loss_gradient():
    torch.manual_seed(21)
    logits = torch.randn(4, 3, dtype=DT, requires_grad=True)
    y = _labels(4, 3)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)
    assert rel_err(hessian_sqrt(logits, y, "classification", "ef")[0], grad) < 1e-12


def test_monte_carlo_seeds_average_to_the_hessian():
    torch.manual_seed(22)
    logits = torch.randn(2, 3, dtype=DT)
    gen = torch.Generator().manual_seed(0)
    seeds = hessian_sqrt(logits, _labels(2, 3), "classification", "mc", mc_samples=40000, generator=gen)
    product = torch.einsum("dbk,dbl->bkl", seeds, seeds)
    assert (product - loss_hessians(logits, "classification")).abs().max() < 0.01


def test_loop_and_batched_backward_agree():
    torch.manual_seed(23)
    model = nn.Sequential(Conv(2, 3).to(DT), FlattenHead(3 * 16))
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    a = kfac_batch(model, x, _labels(3, 3), backward="batched")
    b = kfac_batch(model, x, _labels(3, 3), backward="loop")
    for name in a.block_names:
        assert rel_err(a.dense(name), b.dense(name)) < 1e-12


@pytest.mark.parametrize(
    "options",
    [{}, {"rotation_mode": "reduce"}, {"grouped_mode": "reference"}, {"position_norm": "all"}, {"kfac_approx": "reduce"}],
)
def test_per_direction_chunks_give_the_single_vmapped_chunk_result_for_every_rule(monkeypatch, options):
    """Loop mode with one chunk per direction (merging disabled) equals one vmapped backward, on every rule."""
    torch.manual_seed(28)
    model = nn.Sequential(
        LiftingConv(2, 2, dtype=DT),
        GroupConv(2, 2, mode="full", dtype=DT),
        Conv(8, 3).to(DT),
        nn.ReLU(),
        PolyphaseDownsample(),
        SparseConv(3, 3, dtype=DT),
        FactoredFC(3, 2, 2, 2, dtype=DT),
        FlattenHead(2 * 4),
    )
    x, y = torch.randn(5, 2, 4, 4, dtype=DT), _labels(5, 3)
    vmapped = kfac_batch(model, x, y, backward="batched", **options)
    monkeypatch.setattr("kfac.capture._MERGE_ELEMENTS", 0)
    chunked = kfac_batch(model, x, y, backward="loop", **options)
    assert chunked.block_names == vmapped.block_names
    for name in vmapped.block_names:
        assert rel_err(chunked.dense(name), vmapped.dense(name)) < 1e-12, name


@pytest.mark.parametrize("zero_fraction", [0.0, 0.05, 0.75, 1.0])
def test_used_positions_find_sites_that_only_later_directions_use(zero_fraction):
    """The first-direction scan plus look-ups equals a full scan, including sites used only by direction 4."""
    torch.manual_seed(32)
    grads = torch.randn(5, 6, 3, 40, dtype=DT)
    dead = torch.rand(6, 40) < zero_fraction  # (B, P) sites zero in the first direction
    never = dead & (torch.rand(6, 40) < 0.5)  # of those, half are zero in every direction
    grads[0] *= (~dead)[:, None, :]
    grads[1:] *= (~never)[:, None, :]
    grads[4, :, 1] *= ~(dead & ~never)  # one channel of the last direction zero too: the rest still count
    expected = grads.ne(0).any(0).any(1)
    for parts in ((grads,), (grads[:2], grads[2:3], grads[3:])):
        used = UsedPositions()
        for part in parts:
            used.add(part)
        assert torch.equal(used.result(), expected)


def test_polyphase_conv_used_positions_match_the_chosen_phase_in_both_backward_modes():
    """Conv -> per-sample polyphase selection: A averages the patches of each sample's chosen phase only."""
    torch.manual_seed(25)
    model = nn.Sequential(Conv(2, 3).to(DT), PolyphaseDownsample(), FlattenHead(3 * 4))
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    _, index = polyphase_select(model[0](x))
    patches = _circular_patches_by_roll(x).reshape(5, 18, 4, 4)
    kept = torch.stack([patches[n, :, a // 2 :: 2, a % 2 :: 2].reshape(18, 4) for n, a in enumerate(index.tolist())])
    expected = torch.einsum("bip,bjp->ij", kept, kept) / 4 / 5
    exact = exact_ggn_blocks(model, x)
    for mode in ("loop", "batched"):
        curv = kfac_batch(model, x, _labels(5, 3), backward=mode)
        assert rel_err(curv.scaled_factors("0.conv.weight")[1][0], expected) < 1e-12, mode
        assert rel_err(curv.dense("0.conv.bias"), exact["0.conv.bias"]) < TOL, mode


def test_strided_conv_path_single_output_site_is_exact():
    """A downsampling relaxed layer with a stride-2 CONV path beside an F-FC path, on a 2x2 map: one site.
    (The F-FC blocks drop the couplings between input channels, so only the CONV and head blocks are exact.)"""
    torch.manual_seed(29)
    paths = {"fc": FactoredFC(2, 3, 2, 1, dtype=DT), "conv": Conv(2, 3, stride=2).to(DT)}
    model = nn.Sequential(RelaxedLayer(paths, downsample=True), FlattenHead(3))
    names = ["0.paths.conv.conv.weight", "0.paths.conv.conv.bias", "1.head.weight", "1.head.bias"]
    _check_all_blocks(model, torch.randn(1, 2, 2, 2, dtype=DT), _labels(1, 3), names=names)


def test_strided_conv_path_has_the_curvature_of_the_full_resolution_path():
    """Stride-2 CONV paths change the cost, not the curvature: every block equals the stride-1 layer's."""
    torch.manual_seed(30)

    def model(stride: int) -> nn.Module:
        torch.manual_seed(31)
        paths = {"fc": FactoredFC(2, 3, 8, 4, dtype=DT), "conv": Conv(2, 3, stride=stride).to(DT)}
        return nn.Sequential(RelaxedLayer(paths, downsample=True), FlattenHead(3 * 16))

    x, y = torch.randn(6, 2, 8, 8, dtype=DT), _labels(6, 3)
    full, strided = kfac_batch(model(1), x, y), kfac_batch(model(2), x, y)
    assert strided.block_names == full.block_names
    for name in full.block_names:
        assert rel_err(strided.dense(name), full.dense(name)) < 1e-12, name


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("density", [0.2, 0.9])
def test_conv_input_factor_from_windows_matches_unfold(stride, density):
    """Lazy windows (gathered or dense) give ``sum w a a^T`` over F.unfold patches, for sparse and dense weights."""
    torch.manual_seed(26)
    x = torch.randn(3, 2, 7, 7, dtype=DT)
    patches = F.unfold(x, 3, stride=stride)  # (B, 18, L)
    weights = torch.rand(3, patches.shape[2], dtype=DT) * (torch.rand(3, patches.shape[2]) < density)
    expected = torch.einsum("bp,bip,bjp->ij", weights, patches, patches)
    windows = ConvWindows(x, (3, 3), (stride, stride))
    assert rel_err(input_factor(windows, weights), expected) < 1e-12
    assert rel_err(input_factor(patches, weights), expected) < 1e-12
    uniform = torch.einsum("bip,bjp->ij", patches, patches) / patches.shape[2]
    assert rel_err(input_factor(windows, None), uniform) < 1e-12


def _rolled_patches(core: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Independent circular im2col: ``(B, C*kh*kw, H*W)`` with ``a[(c, u, v)] = core[c, (i + u) % H, (j + v) % W]``."""
    taps = [torch.roll(core, shifts=(-u, -v), dims=(2, 3)) for u in range(kh) for v in range(kw)]
    stacked = torch.stack(taps, dim=2)  # (B, C, kh*kw, H, W)
    return stacked.reshape(core.shape[0], -1, core.shape[2] * core.shape[3])


@pytest.mark.parametrize("dtype,tol", [(DT, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kernel,size", [((3, 3), (5, 7)), ((1, 1), (4, 4)), ((5, 3), (6, 5)), ((3, 3), (2, 2))])
def test_periodic_gram_equals_the_product_of_circular_patches(dtype, tol, kernel, size):
    """The spectral input factor of a circular stride-1 conv against the patch product in float64 (float32:
    the spectral route stays within float32 rounding of the exact value)."""
    torch.manual_seed(33)
    core = torch.randn(6, 3, *size, dtype=DT)
    scale = torch.rand(6, dtype=DT)
    patches = _rolled_patches(core, *kernel)
    expected = torch.einsum("n,nip,njp->ij", scale, patches, patches)
    got = periodic_gram(core.to(dtype), scale.to(dtype), kernel)
    assert got.dtype == dtype
    assert rel_err(got.to(DT), expected) < tol
    assert torch.equal(got, got.T)


def test_periodic_core_accepts_exactly_the_circular_stride_one_inputs():
    torch.manual_seed(34)
    x = torch.randn(2, 3, 5, 6, dtype=DT)
    circular = F.pad(x, (1, 1, 1, 1), mode="circular")
    core = ConvWindows(circular, (3, 3), (1, 1)).periodic_core()
    assert core is not None and torch.equal(core, torch.roll(x, shifts=(1, 1), dims=(2, 3)))
    assert ConvWindows(F.pad(x, (1, 1, 1, 1)), (3, 3), (1, 1)).periodic_core() is None  # zero padding
    assert ConvWindows(circular, (3, 3), (2, 2)).periodic_core() is None  # strided
    assert ConvWindows(torch.randn(2, 3, 7, 8, dtype=DT), (3, 3), (1, 1)).periodic_core() is None
    broken = circular.clone()
    broken[1, 2, 0, 3] += 1.0  # one wrapped pixel differs from the pixel it should copy
    assert ConvWindows(broken, (3, 3), (1, 1)).periodic_core() is None


@pytest.mark.parametrize("circular", [True, False])
@pytest.mark.parametrize("unused_fraction", [0.0, 0.05, 0.75, 1.0])
def test_sample_weighted_input_factor_matches_the_weighted_patch_product(circular, unused_fraction):
    """Per-sample weights on the used positions (spectral/scaled full product minus the unused positions, or
    the used ones gathered), for windows and for dense patches, against the dense weighted sum over F.unfold."""
    torch.manual_seed(35)
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    padded = F.pad(x, (1, 1, 1, 1), mode="circular") if circular else torch.randn(5, 2, 8, 8, dtype=DT)
    patches = F.unfold(padded, 3)  # (B, 18, 36)
    used = torch.rand(5, 36) >= unused_fraction
    used[0] = True  # one sample with every position, one (if any are dropped) with none but one
    weights = SampleWeights(torch.rand(5, dtype=DT) + 0.1, used)
    expected = torch.einsum("bp,bip,bjp->ij", weights.dense(), patches, patches)
    assert rel_err(input_factor(ConvWindows(padded, (3, 3), (1, 1)), weights), expected) < 1e-12
    assert rel_err(input_factor(patches, weights), expected) < 1e-12


def test_position_weights_count_the_used_positions_of_each_sample():
    torch.manual_seed(36)
    grads = torch.randn(3, 4, 2, 10, dtype=DT)
    grads[:, 1, :, 3:] = 0  # sample 1 uses positions 0..2 only
    grads[:, 2] = 0  # sample 2 uses none: it counts all
    grads[1:, 3, :, 5] = 0  # sample 3: position 5 used by the first direction only
    stats = {norm: ExpandStats(weight=True, bias=False, position_norm=norm) for norm in ("used", "all")}
    for part in (grads[:1], grads[1:]):
        for each in stats.values():
            each.add(part)
    expected = torch.full((4, 10), 0.1, dtype=DT)
    expected[1] = torch.tensor([1 / 3] * 3 + [0.0] * 7, dtype=DT)
    assert rel_err(stats["used"].weights().dense(), expected) < 1e-15
    assert stats["all"].weights() is None
    assert sample_weights(torch.ones(4, 10, dtype=torch.bool), DT) is None  # every position used: uniform


def test_polyphase_and_circular_pad_backward_match_torch_references_when_vmapped():
    """Custom backward formulas vs autograd of F.pad(circular) and of advanced indexing, per direction batch."""
    torch.manual_seed(27)
    x = torch.randn(4, 3, 6, 8, dtype=DT, requires_grad=True)
    chosen, index = polyphase_select(x)
    reference = x.reshape(4, 3, 3, 2, 4, 2)[torch.arange(4), :, :, index // 2, :, index % 2]
    seeds = torch.randn(5, *chosen.shape, dtype=DT)
    ours = torch.autograd.grad(chosen, x, seeds, is_grads_batched=True)[0]
    assert torch.equal(ours, torch.autograd.grad(reference, x, seeds, is_grads_batched=True)[0])
    padded = circular_pad(x, 3)
    seeds = torch.randn(5, *padded.shape, dtype=DT)
    ours = torch.autograd.grad(padded, x, seeds, is_grads_batched=True)[0]
    expected = torch.autograd.grad(F.pad(x, (1, 1, 1, 1), mode="circular"), x, seeds, is_grads_batched=True)[0]
    assert (ours - expected).abs().max() < 1e-12


# ------------------------------------------------------------------------------------ accumulation / errors


def test_batches_add_up_to_the_full_batch():
    torch.manual_seed(24)
    model = nn.Sequential(FactoredFC(2, 3, 4, 4, dtype=DT), Conv(3, 3).to(DT), FlattenHead(3 * 16))
    x, y = torch.randn(6, 2, 4, 4, dtype=DT), _labels(6, 3)
    whole = kfac_batch(model, x, y)
    parts = fit_kfac(model, [(x[:2], y[:2]), (x[2:3], y[2:3]), (x[3:], y[3:])])  # accumulated in place
    first, rest = kfac_batch(model, x[:2], y[:2]), kfac_batch(model, x[2:], y[2:])
    summed = first + rest
    assert parts.n_data == summed.n_data == 6 and abs(float(parts.loss - whole.loss)) < 1e-10
    for name in whole.block_names:
        assert rel_err(parts.dense(name), whole.dense(name)) < 1e-12
        assert rel_err(summed.dense(name), whole.dense(name)) < 1e-12


def test_unsupported_module_with_parameters_raises_naming_it():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 3))
    with pytest.raises(NotImplementedError, match=r"module 1 \(BatchNorm2d\)"):
        kfac_batch(model, torch.randn(2, 2, 5, 5), _labels(2, 3))


def test_grouped_stock_conv_raises():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 3))
    with pytest.raises(NotImplementedError, match="groups=2"):
        kfac_batch(model, torch.randn(2, 2, 5, 5), _labels(2, 3))


@pytest.mark.parametrize(
    ("x", "y", "likelihood", "message"),
    [
        (torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), "classification", r"must lie in \[0, 3\), got 0\.\.3"),
        (torch.randn(4, 5), torch.zeros(4), "classification", "must be 4 class indices"),
        (torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.long), "classification", "must be 4 class indices"),
        (torch.randn(4, 5), torch.zeros(4, 2), "regression", r"output's shape \(4, 3\), got \(4, 2\)"),
    ],
)
def test_bad_targets_raise_saying_what_is_wrong(x, y, likelihood, message):
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match=message):
        kfac_batch(model, x, y, likelihood)


def test_non_finite_model_output_is_a_curvature_error():
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(CurvatureError, match="NaN or inf"):
        kfac_batch(model, torch.full((4, 5), float("nan")), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------ decomposition


def _mixed_curvature(dtype=DT):
    """Curvature with every block layout: direct_sum, shared_out, kron and single."""
    torch.manual_seed(25)
    model = nn.Sequential(FactoredFC(2, 3, 3, 2, dtype=dtype), Conv(3, 2).to(dtype), FlattenHead(2 * 4)).to(dtype)
    x, y = torch.randn(4, 2, 3, 3, dtype=dtype), _labels(4, 3)
    per_group = kfac_batch(model, x, y)
    reference = kfac_batch(model, x, y, grouped_mode="reference")
    per_group.blocks["ref.stage_u.weight"] = reference.blocks["0.stage_u.weight"]
    return per_group


def test_logdet_and_effective_params_match_dense_matrices_and_are_differentiable():
    curv = _mixed_curvature()
    layouts = {block.layout for block in curv.blocks.values()}
    assert layouts == {"direct_sum", "shared_out", "kron", "single"}
    dec = curv.decompose()
    delta = torch.linspace(0.3, 2.0, len(curv.block_names), dtype=DT)
    logdet, n_eff = dec.logdet(delta), dec.effective_params(delta)
    for l, name in enumerate(curv.block_names):
        dense = curv.dense(name)
        eye = torch.eye(dense.shape[0], dtype=DT)
        sign, expected = torch.linalg.slogdet(dense + delta[l] * eye)
        assert sign > 0 and abs(float(logdet[l] - expected)) < 1e-9 * max(1.0, abs(float(expected)))
        lam = torch.linalg.eigvalsh(dense).clamp_min(0)
        assert abs(float(n_eff[l] - (lam / (lam + delta[l])).sum())) < 1e-9
        assert dec.num_params()[l] == dense.shape[0]
    assert dec.block_names == curv.block_names
    d = delta.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: dec.logdet(v), (d,))
    assert torch.autograd.gradcheck(lambda v: dec.effective_params(v), (d,))


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_eigenvalue_failure_recovers_with_jitter(monkeypatch, caplog, failure):
    """Every other ``eigvalsh`` fails (raises, or returns NaN as float32 LAPACK can): the batched calls that
    failed are redone factor by factor, with a jittered retry where that fails again; the result equals an
    undisturbed decomposition."""
    curv = _mixed_curvature(torch.float32)
    real = torch.linalg.eigvalsh
    calls = []

    def flaky(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        vals = real(matrix, *args, **kwargs)
        if len(calls) % 2 == 1:
            if failure == "raise":
                raise torch.linalg.LinAlgError("simulated failure")
            return torch.full_like(vals, float("nan"))
        return vals

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky)
    dec = curv.decompose()
    assert set(calls) == {torch.float64}
    assert "retrying with jitter" in caplog.text
    monkeypatch.setattr(torch.linalg, "eigvalsh", real)
    reference = curv.decompose()
    delta = torch.ones(len(curv.block_names))
    assert torch.allclose(dec.logdet(delta), reference.logdet(delta), rtol=1e-6)


def test_eigenvalues_failing_twice_raise_curvature_error_naming_the_block(monkeypatch):
    curv = _mixed_curvature()

    def broken(matrix, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    with pytest.raises(CurvatureError, match=r"block 0\.stage_u\.weight"):
        curv.decompose()


def test_decomposition_takes_one_eigenvalue_call_per_size_and_equals_dense_factors(monkeypatch):
    """Eigenvalues only, one batched call per factor size, the head's output factor (its bias block's matrix)
    once; every factor's eigenvalues equal ``torch.linalg.eigvalsh`` of that factor alone, and the eigenvectors,
    computed on first access, diagonalise it."""
    curv = _mixed_curvature()
    head_b = curv.blocks["2.head.weight"].out_factors
    assert torch.equal(head_b, curv.blocks["2.head.bias"].out_factors)
    sizes = []
    real = torch.linalg.eigvalsh

    def counted(matrix, *args, **kwargs):
        sizes.append(matrix.shape[-1])
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counted)
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: pytest.fail("eigenvectors were not asked for"))
    dec = curv.decompose()
    monkeypatch.undo()
    factor_sizes = {f.shape[-1] for name in curv.block_names for f in curv.scaled_factors(name) if f is not None}
    assert sorted(sizes) == sorted(factor_sizes)
    head = curv.block_names.index("2.head.weight")
    assert dec.eigen[head].out_vals is dec.eigen[head + 1].out_vals
    for name, eigen in zip(curv.block_names, dec.eigen):
        b, a = curv.scaled_factors(name)
        for vals, vecs, factor in ((eigen.out_vals, eigen.out_vecs, b), (eigen.in_vals, eigen.in_vecs, a)):
            if factor is None:
                assert vals is None and vecs is None
                continue
            sym = 0.5 * (factor + factor.transpose(-1, -2))
            scale = sym.abs().amax()
            torch.testing.assert_close(vals, torch.linalg.eigvalsh(sym), rtol=0, atol=1e-12 * scale)
            rebuilt = vecs @ torch.diag_embed(vals) @ vecs.transpose(-1, -2)
            torch.testing.assert_close(rebuilt, sym, rtol=0, atol=1e-12 * scale)


def test_decomposition_on_another_device_gives_the_same_eigenvalues():
    curv = _mixed_curvature()
    here, there = curv.decompose(), curv.decompose(device="cpu")
    torch.testing.assert_close(here.eigenvalues(), there.eigenvalues(), rtol=0, atol=0)
    assert there.eigenvalues().device == curv.blocks["2.head.bias"].out_factors.device


def _wide_curvature(dtype: torch.dtype, n: int = 130) -> tuple[KronCurvature, torch.Tensor]:
    """One ``kron`` block whose ``(n, n)`` output factor has known eigenvalues ``(n,)`` (returned, ascending;
    a random rotation of them, so neither factor is diagonal) and a ``3 x 3`` input factor."""
    gen = torch.Generator().manual_seed(41)
    vals = torch.logspace(-6, 2, n, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    a = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    block = KronBlock("w", torch.Size([n, 3]), "kron", ((q * vals) @ q.T)[None].to(dtype), (a.T @ a)[None].to(dtype))
    return KronCurvature({"w": block}, 5, 0.0), vals


def test_wide_cpu_factors_take_numpy_lapack_and_give_their_known_eigenvalues(monkeypatch):
    """A CPU factor at least ``NUMPY_EIGVALSH_MIN_SIZE`` wide is decomposed by numpy's LAPACK; its eigenvalues are
    the ones it was built from, and the block's log-determinant is the dense matrix's."""
    assert cpu_linalg.NUMPY_EIGVALSH_MIN_SIZE <= 130
    sizes = []
    real = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda m, *a, **k: sizes.append(m.shape[-1]) or real(m, *a, **k))
    curv, vals = _wide_curvature(DT)
    dec = curv.decompose()
    assert sizes == [130]
    torch.testing.assert_close(dec.eigen[0].out_vals[0], vals, rtol=0, atol=1e-13 * float(vals.max()))
    dense = curv.dense("w")
    sign, expected = torch.linalg.slogdet(dense + 0.3 * torch.eye(dense.shape[0], dtype=DT))
    assert sign > 0 and abs(float(dec.logdet(torch.tensor([0.3], dtype=DT))[0] - expected)) < 1e-10 * abs(float(expected))


def test_numpy_lapack_failures_are_retried_then_named(monkeypatch, caplog):
    """numpy's LAPACK failing once (the batched call) leaves the factor to be decomposed alone, with the same
    eigenvalues; failing every time raises a CurvatureError naming the block."""
    curv, _ = _wide_curvature(torch.float32)
    reference = curv.decompose().eigenvalues()
    real, calls = np.linalg.eigvalsh, []

    def once(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("simulated failure")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "eigvalsh", once)
    torch.testing.assert_close(curv.decompose().eigenvalues(), reference, rtol=0, atol=0)
    assert len(calls) == 2
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda *a, **k: (_ for _ in ()).throw(np.linalg.LinAlgError("no")))
    with pytest.raises(CurvatureError, match=r"block w \(output-side factor\): eigendecomposition failed twice"):
        curv.decompose()
    assert "retrying with jitter" in caplog.text


def test_numpy_lapack_runs_with_torchs_thread_count(monkeypatch):
    """numpy's OpenBLAS takes ``torch.get_num_threads()`` for the call and gets its own count back after."""
    control = cpu_linalg._openblas_threads()
    if control is None:
        pytest.skip("numpy's OpenBLAS thread count cannot be set here (not numpy's Linux wheels)")
    get, set_threads = control
    before, threads = get(), torch.get_num_threads()
    seen, real = [], np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda m, *a, **k: seen.append(get()) or real(m, *a, **k))
    set_threads(3)
    try:
        for wanted in (1, 2):
            torch.set_num_threads(wanted)
            cpu_linalg.eigvalsh(torch.eye(130, dtype=torch.float64)[None])
            assert seen[-1] == wanted and get() == 3
    finally:
        torch.set_num_threads(threads)
        set_threads(before)


def _two_wide_blocks(scale_v: float = 1.0) -> KronCurvature:
    """Blocks ``w`` and ``v`` with ``130``-wide output factors (fresh tensors on every call)."""
    curv, _ = _wide_curvature(torch.float32)
    w = curv.blocks["w"]
    v = KronBlock("v", w.param_shape, "kron", w.out_factors.flip(-1, -2) * scale_v, w.in_factors.clone())
    return KronCurvature({"w": w, "v": v}, 5, 0.0)


def test_unchanged_wide_factors_take_their_eigenvalues_from_the_memo(monkeypatch):
    """With an EigenvalueMemo, a later decomposition calls LAPACK only for the wide factors that changed; every
    eigenvalue is bit for bit the one a decomposition without the memo gives, and a changed jitter misses."""
    assert MEMO_MIN_SIZE <= 130
    sizes = []
    real = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda m, *a, **k: sizes.append(m.shape) or real(m, *a, **k))
    memo = EigenvalueMemo()
    first = _two_wide_blocks().decompose(memo=memo)
    assert sizes == [(2, 130, 130)] and memo.hits == 0
    sizes.clear()
    again = _two_wide_blocks().decompose(memo=memo)  # equal values in new tensors
    assert sizes == [] and memo.hits == 2
    torch.testing.assert_close(again.eigenvalues(), first.eigenvalues(), rtol=0, atol=0)
    changed = _two_wide_blocks(scale_v=1.5)
    got = changed.decompose(memo=memo)
    assert sizes == [(1, 130, 130)] and memo.hits == 3  # only v's output factor was decomposed
    sizes.clear()
    torch.testing.assert_close(got.eigenvalues(), changed.decompose().eigenvalues(), rtol=0, atol=0)
    sizes.clear()
    changed.decompose(memo=memo, jitter=1e-9)
    assert sizes == [(2, 130, 130)] and memo.hits == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_stack_is_each_factor_averaged_with_its_transpose(dtype):
    """The float64 stack the eigenvalues are taken of: ``(M + M^T) * 0.5`` of every factor, bit for bit."""
    torch.manual_seed(42)
    stacks = [torch.randn(2, 90, 90, dtype=dtype), torch.randn(1, 90, 90, dtype=dtype)]
    expected = torch.cat([(m.double() + m.double().transpose(-1, -2)) * 0.5 for m in stacks])
    got = _symmetric(stacks)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_finite_factor_whose_sum_overflows_is_decomposed():
    """The cheap finiteness check of a batched call (the factor's sum) overflows for entries near the float64
    maximum; such a factor is then checked entry by entry and decomposed, not refused."""
    vals = torch.tensor([1.0, 5e307, 5e307, 5e307, 5e307], dtype=DT)  # sum 2e308 > 1.8e308
    curv = KronCurvature({"b": KronBlock("b", torch.Size([5]), "single", torch.diag(vals)[None])}, 1, 0.0)
    torch.testing.assert_close(curv.decompose().eigenvalues(), vals)


def test_non_finite_factor_raises_curvature_error():
    curv = _mixed_curvature()
    curv.blocks["1.conv.bias"].out_factors[0, 0, 0] = float("nan")
    with pytest.raises(CurvatureError, match=r"block 1\.conv\.bias"):
        curv.decompose()
