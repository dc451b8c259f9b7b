"""Exact translation / rotation equivariance of the equivariant paths, APS and relaxed stacks (with teeth)."""

from __future__ import annotations

import pytest
import torch

from ella.layers import (
    Conv,
    FactoredFC,
    GroupConv,
    LiftingConv,
    PolyphaseDownsample,
    RelaxedLayer,
    SparseConv,
    check_rotation_equivariance,
    check_rotation_invariance,
    check_translation_equivariance,
    check_translation_invariance,
    group_max_pool,
    lift,
    rotate_p4,
)
from ella.layers.equivariance import candidate_output_shifts

DT = torch.float64
TOL = 1e-12
SHIFTS = [(1, 0), (0, -1), (3, -5), (-2, 7), (5, 5), (-7, -3)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def wrong_rotate_p4(x: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Rotates the slices but shifts the group axis the WRONG way (slice g <- rotated slice g + r)."""
    parts = torch.rot90(x.view(x.shape[0], 4, -1, *x.shape[2:]), r, dims=(-2, -1))
    return torch.roll(parts, shifts=-r, dims=1).reshape(x.shape)


def with_bias(module: torch.nn.Module) -> torch.nn.Module:
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)
    return module


# ---------------------------------------------------------------------------------------------- group action
def test_rotate_p4_definition_and_group_law():
    x = torch.randn(2, 4 * 3, 5, 5, dtype=DT)
    y = rotate_p4(x)
    for g in range(4):
        h = (g - 1) % 4
        torch.testing.assert_close(y[:, 3 * g : 3 * g + 3], torch.rot90(x[:, 3 * h : 3 * h + 3], 1, (2, 3)))
    torch.testing.assert_close(rotate_p4(rotate_p4(x), 3), x)
    torch.testing.assert_close(rotate_p4(x, 2), rotate_p4(rotate_p4(x)))
    torch.testing.assert_close(rotate_p4(lift(x[:, :3])), lift(torch.rot90(x[:, :3], 1, (2, 3))))
    torch.testing.assert_close(group_max_pool(rotate_p4(x)), torch.rot90(group_max_pool(x), 1, (2, 3)))


def test_candidate_output_shifts():
    assert candidate_output_shifts(3, 2) == [1, 2]
    assert candidate_output_shifts(-3, 2) == [-2, -1]
    assert candidate_output_shifts(4, 2) == [2]
    assert candidate_output_shifts(-5, 1) == [-5]
    assert candidate_output_shifts(5, 4) == [1, 2]


# ---------------------------------------------------------------------------------------------- translations
def _equivariant_paths():
    return {
        "conv": (Conv(3, 4, dtype=DT), 3),
        "sparse_conv": (SparseConv(3, 4, dtype=DT), 3),
        "gconv_pointwise": (GroupConv(2, 3, mode="pointwise", dtype=DT), 8),
        "gconv_full": (GroupConv(2, 3, mode="full", dtype=DT), 8),
        "lifting": (LiftingConv(3, 2, dtype=DT), 3),
        "conv_5x5": (Conv(3, 2, kernel_size=5, dtype=DT), 3),
    }


@pytest.mark.parametrize("name", list(_equivariant_paths()))
def test_paths_commute_with_circular_shifts(name):
    module, channels = _equivariant_paths()[name]
    with_bias(module)
    x = torch.randn(2, channels, 7, 9, dtype=DT)  # odd and non-square on purpose
    assert check_translation_equivariance(module, x, SHIFTS) < TOL


def test_zero_padded_sparse_conv_is_not_shift_equivariant():
    module = SparseConv(3, 4, padding="zeros", dtype=DT)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    assert check_translation_equivariance(module, x, [(1, 0)]) > 1e-2


# ---------------------------------------------------------------------------------------------- rotations
@pytest.mark.parametrize("mode", ["pointwise", "full"])
@pytest.mark.parametrize("r", [1, 2, 3, -1])
def test_group_conv_commutes_with_rotations(mode, r):
    module = with_bias(GroupConv(2, 3, mode=mode, dtype=DT))
    x = torch.randn(2, 8, 6, 6, dtype=DT)
    assert check_rotation_equivariance(module, x, r, group_input=True, group_output=True) < TOL


@pytest.mark.parametrize("r", [1, 2, 3])
def test_lifting_conv_commutes_with_rotations(r):
    module = with_bias(LiftingConv(3, 2, dtype=DT))
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    assert check_rotation_equivariance(module, x, r, group_output=True) < TOL


@pytest.mark.parametrize("mode", ["pointwise", "full", "lifting"])
def test_wrong_group_shift_direction_fails(mode):
    if mode == "lifting":
        module, x = LiftingConv(3, 2, dtype=DT), torch.randn(2, 3, 6, 6, dtype=DT)
        rotate_in = lambda t: torch.rot90(t, 1, (2, 3))  # noqa: E731
    else:
        module, x, rotate_in = GroupConv(2, 3, mode=mode, dtype=DT), torch.randn(2, 8, 6, 6, dtype=DT), rotate_p4
    with torch.no_grad():
        error = (module(rotate_in(x)) - wrong_rotate_p4(module(x))).abs().max().item()
    assert error > 1e-2


def test_plain_conv_is_not_rotation_equivariant_on_group_maps():
    module = Conv(8, 12, dtype=DT)
    x = torch.randn(2, 8, 6, 6, dtype=DT)
    assert check_rotation_equivariance(module, x, 1, group_input=True, group_output=True) > 1e-2


# ---------------------------------------------------------------------------------------------- polyphase
def independent_choice(x: torch.Tensor) -> tuple[int, int]:
    """Row/column offset (a, b) of the largest-l2 component of one sample (C, H, W), lowest index on ties."""
    norms = [(x[:, a::2, b::2].pow(2).sum().item(), -(2 * a + b), a, b) for a in (0, 1) for b in (0, 1)]
    best = max(norms)
    return best[2], best[3]


@pytest.mark.parametrize("s,t", [(1, 0), (0, 1), (1, 1), (2, 3), (-1, 4), (-3, -3), (6, -5)])
def test_aps_selection_follows_roll_of_one_sample(s, t):
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    aps = PolyphaseDownsample()
    out = aps(x)
    for n in range(3):
        a, b = independent_choice(x[n])
        torch.testing.assert_close(out[n], x[n, :, a::2, b::2], rtol=0, atol=0)
    y = x.clone()
    y[0] = torch.roll(x[0], (s, t), dims=(1, 2))
    a, b = independent_choice(x[0])
    out_y = aps(y)
    expected0 = torch.roll(out[0], ((a + s) // 2, (b + t) // 2), dims=(1, 2))
    torch.testing.assert_close(out_y[0], expected0, rtol=0, atol=0)
    torch.testing.assert_close(out_y[1:], out[1:], rtol=0, atol=0)


@pytest.mark.parametrize("criterion", ["l2", "linf"])
def test_aps_is_batch_independent_and_shift_equivariant(criterion):
    aps = PolyphaseDownsample(criterion)
    x = torch.randn(1, 3, 6, 6, dtype=DT)
    scales = torch.tensor([0.01, 1.0, 10.0, 100.0], dtype=DT)[:, None, None, None]
    others = torch.randn(4, 3, 6, 6, dtype=DT) * scales
    alone = aps(x)
    for position in range(5):
        batch = torch.cat([others[:position], x, others[position:]])
        torch.testing.assert_close(aps(batch)[position : position + 1], alone, rtol=0, atol=0)
    assert check_translation_equivariance(aps, torch.cat([x, others]), SHIFTS, factor=2) == 0.0


def test_aps_linf_uses_absolute_value():
    x = torch.zeros(1, 1, 4, 4, dtype=DT)
    x[0, 0, 0, 0] = 2.0
    x[0, 0, 1, 1] = -3.0  # component (1, 1) has the largest |value| but the smallest signed max
    torch.testing.assert_close(PolyphaseDownsample("linf")(x), x[:, :, 1::2, 1::2])
    torch.testing.assert_close(PolyphaseDownsample("batch_signed_max")(x), x[:, :, 0::2, 0::2])


@pytest.mark.parametrize("r", [1, 2, 3])
def test_aps_commutes_with_rotation(r):
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    assert check_rotation_equivariance(PolyphaseDownsample(), x, r) == 0.0


def test_aps_batch_signed_max_is_not_batch_independent():
    aps = PolyphaseDownsample("batch_signed_max")
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    x[0, 0, 0, 0] = 5.0  # alone: component 0 wins by signed max
    other = torch.zeros(1, 2, 4, 4, dtype=DT)
    other[0, 0, 1, 1] = 50.0  # in a batch: component 3 wins for every sample
    alone = aps(x)
    torch.testing.assert_close(alone, x[:, :, 0::2, 0::2])
    in_batch = aps(torch.cat([x, other]))[:1]
    assert (in_batch - alone).abs().max().item() > 1e-2


def test_aps_ties_gradient_and_errors():
    constant = torch.ones(2, 1, 4, 4, dtype=DT)
    torch.testing.assert_close(PolyphaseDownsample()(constant), constant[:, :, ::2, ::2])
    x = torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True)
    PolyphaseDownsample()(x).sum().backward()
    for n in range(2):
        a, b = independent_choice(x[n].detach())
        mask = torch.zeros(2, 4, 4, dtype=DT)
        mask[:, a::2, b::2] = 1.0
        torch.testing.assert_close(x.grad[n], mask)
    with pytest.raises(ValueError, match="even"):
        PolyphaseDownsample()(torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match="criterion"):
        PolyphaseDownsample("l1")


# ---------------------------------------------------------------------------------------------- stacks
def lifted_stack(c: int, with_dense: bool = False, gconv_only: bool = False) -> torch.nn.Sequential:
    """lift -> relaxed(8 -> 4) -> relaxed(4 -> 4) -> relaxed(4 -> 2), channels c -> 3 -> 3 -> 4 per rotation."""
    widths, sizes, downs = [c, 3, 3, 4], [8, 4, 4, 2], [True, False, True]
    layers: list[torch.nn.Module] = []
    for i, down in enumerate(downs):
        ci, co = widths[i], widths[i + 1]
        mode = "full" if i == 1 else "pointwise"
        paths: dict[str, torch.nn.Module] = {"gconv": with_bias(GroupConv(ci, co, mode=mode, dtype=DT))}
        if not gconv_only:
            paths["conv"] = with_bias(Conv(4 * ci, 4 * co, dtype=DT))
        if with_dense and i == 0:
            paths["fc"] = FactoredFC(4 * ci, 4 * co, sizes[i], sizes[i + 1], dtype=DT)
        layers.append(RelaxedLayer(paths, downsample=down))
    return torch.nn.Sequential(*layers)


def global_pool(stack: torch.nn.Module):
    return lambda x: stack(lift(x)).mean(dim=(-2, -1))


def test_relaxed_stack_translation_equivariant_and_pooled_invariant():
    stack = lifted_stack(2)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    assert check_translation_equivariance(lambda t: stack(lift(t)), x, SHIFTS, factor=4) < TOL
    assert check_translation_invariance(global_pool(stack), x, SHIFTS) < TOL


def test_relaxed_stack_with_dense_path_breaks_translation():
    stack = lifted_stack(2, with_dense=True)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    assert check_translation_equivariance(lambda t: stack(lift(t)), x, SHIFTS, factor=4) > 1e-3
    assert check_translation_invariance(global_pool(stack), x, SHIFTS) > 1e-3


def test_gconv_stack_rotation_equivariant_and_readout_invariant():
    stack = lifted_stack(2, gconv_only=True)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    assert check_rotation_equivariance(lambda t: stack(lift(t)), x, 1, group_output=True) < TOL
    readout = lambda t: group_max_pool(stack(lift(t))).mean(dim=(-2, -1))  # noqa: E731
    for r in (1, 2, 3):
        assert check_rotation_invariance(readout, x, r) < TOL
    assert check_translation_invariance(readout, x, SHIFTS) < TOL


def test_conv_path_breaks_rotation_of_stack():
    stack = lifted_stack(2)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    assert check_rotation_equivariance(lambda t: stack(lift(t)), x, 1, group_output=True) > 1e-3


def test_per_path_selection_would_break_equivariance():
    """Documents the fix: selecting per path (reference) is not equivariant; one shared selection is."""
    conv, gconv = with_bias(Conv(8, 12, dtype=DT)), with_bias(GroupConv(2, 3, dtype=DT))
    aps = PolyphaseDownsample()

    def per_path(t):
        return torch.relu((aps(conv(t)) + aps(gconv(t))) / 2)

    shared = RelaxedLayer({"conv": conv, "gconv": gconv}, downsample=True)
    found_break = False
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(4, 8, 8, 8, dtype=DT)
        assert check_translation_equivariance(shared, x, SHIFTS, factor=2) < TOL
        found_break |= check_translation_equivariance(per_path, x, SHIFTS, factor=2) > 1e-3
    assert found_break
