"""The paper's network: parameter counts, name handling, and exact invariances of whole models."""

from __future__ import annotations

import pytest
import torch

from ella.models import LAYER_NAMES, build_model, count_parameters

CIFAR10_COUNTS = {
    "fc": 133_635_690,
    "conv": 338_770,
    "fc_conv": 133_865_010,
    "ffc": 1_542_625,
    "ffc_conv": 1_771_945,
    "sfc": 831_820,
    "sconv": 237_050,  # 5 anchors per 3x3 filter
    "sfc_sconv": 959_420,
    "gconv": 338_770,
    "ffc_conv_gconv": 1_237_527,  # alpha 2
}


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_cifar10_parameter_counts_match_the_paper(layer: str) -> None:
    model = build_model(layer, in_channels=3, n_classes=10, device="meta")
    assert count_parameters(model) == CIFAR10_COUNTS[layer]


@pytest.mark.parametrize(
    ("layer", "classes", "expected"),
    [("fc", 10, 112_664_170), ("fc", 40, 112_683_400), ("conv", 10, 338_590), ("conv", 40, 357_820),
     ("ffc_conv", 10, 1_730_805), ("ffc_conv", 40, 1_750_035), ("ffc_conv_gconv", 10, 1_105_843)],
)
def test_mnist_parameter_counts_match_the_paper(layer: str, classes: int, expected: int) -> None:
    assert count_parameters(build_model(layer, in_channels=1, n_classes=classes, device="meta")) == expected


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid layers are: fc, conv, fc_conv"):
        build_model("ffc_gconv")
    for alpha in (0, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"alpha must be a positive integer, got {alpha!r}"):
            build_model("conv", alpha=alpha, device="meta")


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = build_model("conv", in_channels=3, alpha=1)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_forward_shapes(layer: str) -> None:
    torch.manual_seed(0)
    alpha = 1 if layer in ("fc", "fc_conv") else 2
    model = build_model(layer, in_channels=1, n_classes=7, alpha=alpha)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)


def _zero_path(model: torch.nn.Module, path: str) -> None:
    with torch.no_grad():
        for block in model.blocks:
            for p in block.paths[path].parameters():
                p.zero_()


SHIFTS = [(1, 0), (0, 3), (5, -7), (-1, 1), (16, 9)]


@pytest.mark.parametrize("layer", ["conv", "sconv", "gconv", "ffc_conv", "ffc_conv_gconv"])
def test_equivariant_networks_are_exactly_shift_invariant(layer: str) -> None:
    """Circular shifts of the input (odd ones too, through 5 polyphase downsamplings) leave the logits unchanged.

    For relaxed models the dense path is switched off (the prior limit), which must give the same invariance.
    """
    torch.manual_seed(1)
    model = build_model(layer, in_channels=3, n_classes=5, alpha=2).double()
    if "ffc" in layer:
        _zero_path(model, "fc")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = model(x)
    for shift in SHIFTS:
        shifted = model(torch.roll(x, shifts=shift, dims=(-2, -1)))
        torch.testing.assert_close(shifted, reference, rtol=1e-10, atol=1e-12)


def test_dense_path_breaks_shift_invariance() -> None:
    """Teeth for the test above: the same network with its F-FC path switched on is not invariant."""
    torch.manual_seed(1)
    model = build_model("ffc_conv", in_channels=3, n_classes=5, alpha=2).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert (model(torch.roll(x, 1, dims=-1)) - model(x)).abs().max() > 1e-6


@pytest.mark.parametrize("layer", ["gconv", "ffc_conv_gconv"])
def test_group_networks_are_exactly_rotation_invariant(layer: str) -> None:
    torch.manual_seed(2)
    model = build_model(layer, in_channels=3, n_classes=5, alpha=2).double()
    if layer == "ffc_conv_gconv":
        _zero_path(model, "fc")
        _zero_path(model, "conv")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = model(x)
    for k in (1, 2, 3):
        rotated = model(torch.rot90(x, k, dims=(-2, -1)))
        torch.testing.assert_close(rotated, reference, rtol=1e-10, atol=1e-12)


def test_conv_path_of_multigroup_model_is_not_rotation_invariant() -> None:
    """Teeth: the plain CONV path on the lifted tensor is translation- but not rotation-equivariant."""
    torch.manual_seed(2)
    model = build_model("ffc_conv_gconv", in_channels=3, n_classes=5, alpha=2).double()
    _zero_path(model, "fc")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert (model(torch.rot90(x, 1, dims=(-2, -1))) - model(x)).abs().max() > 1e-6


def test_predictions_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(3)
    model = build_model("ffc_conv", in_channels=3, n_classes=5, alpha=2).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)


def _block_rms(model, x: torch.Tensor) -> list[float]:
    """Root-mean-square activation after each block."""
    rms = []
    with torch.no_grad():
        for block in model.blocks:
            x = block(x)
            rms.append(x.pow(2).mean().sqrt().item())
    return rms


@pytest.mark.parametrize("layer", ["fc", "ffc", "fc_conv", "ffc_conv"])
def test_default_init_keeps_the_activation_scale(layer: str) -> None:
    # Every path keeps the second moment through the ReLU and "sqrt" adds P paths without changing it; the
    # reference's "mean" shrinks it by sqrt(P) per block (x1/16 after 8 blocks) and "sum" grows it likewise.
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    rms = _block_rms(build_model(layer, alpha=2), x)
    assert all(0.5 < value < 2.5 for value in rms), rms
    if layer in ("fc_conv", "ffc_conv"):
        torch.manual_seed(0)
        assert _block_rms(build_model(layer, alpha=2, combine="mean"), x)[-1] < 0.2
        torch.manual_seed(0)
        assert _block_rms(build_model(layer, alpha=2, combine="sum"), x)[-1] > 8
