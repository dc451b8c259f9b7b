"""ella as a library: the one-call training entry point against the experiments' Trainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ella.layers import Conv, FactoredFC, RelaxedLayer, relaxed_layer
from ella.layers.blocks import GROUP_LAYERS, LAYER_NAMES, LAYERS
from ella.layers.group import N_ROTATIONS
from ella.train import train
from test_train import _tiny_config, _write_tiny_cifar

# What the Trainer gave for ``_equivalence_config`` before the training loop became a library entry point
# (commit cd55884); pinned so that the refactor is checked against the code it replaced, not against itself.
TRAINER_BEFORE = {
    "valid": {"nll": 2.289271926879883, "acc": 20.0},
    "test": {"nll": 2.287612533569336, "acc": 10.0},
    "neg_log_marglik": 16.714173811930458,
    "train_loss": [2.299105644226074, 2.306316089630127],
    "precisions": {"blocks.0.fc": 0.5659734606742859, "blocks.0.conv": 1.7818684577941895,
                   "blocks.7.conv": 0.5750441551208496, "head.2": 1.813406229019165},
}


def _equivalence_config(data: Path):
    """F-FC+CONV at width 1 on 40 images, 2 epochs with a marginal-likelihood round after each."""
    return _tiny_config(data, layer="ffc_conv", epochs=2, burn_in=1, marglik_every=1)


def test_the_trainer_gives_the_numbers_it_gave_before(tmp_path: Path) -> None:
    final = train(_equivalence_config(_write_tiny_cifar(tmp_path / "data")), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    close = {"rel": 1e-5}  # float32 training: another CPU's kernels may round differently
    assert final["valid"] == pytest.approx(TRAINER_BEFORE["valid"], **close)
    assert final["test"] == pytest.approx(TRAINER_BEFORE["test"], **close)
    assert final["neg_log_marglik"] == pytest.approx(TRAINER_BEFORE["neg_log_marglik"], **close)
    assert [row["train_loss"] for row in rows] == pytest.approx(TRAINER_BEFORE["train_loss"], **close)
    for name, value in TRAINER_BEFORE["precisions"].items():
        assert final["precisions"][name] == pytest.approx(value, **close), name


@pytest.mark.parametrize("downsample", [False, True])
def test_relaxed_layer_derives_the_sizes_and_strides_a_user_would_have_to_know(downsample: bool) -> None:
    """F-FC+CONV from channels, input size and ``downsample``: the same parameters, the same function as the layer
    built by hand (F-FC to the output size, CONV at stride 2 in a downsampling layer)."""
    torch.manual_seed(0)
    derived = relaxed_layer(3, 5, 8, "ffc_conv", downsample=downsample)
    torch.manual_seed(0)
    out_size, stride = (4, 2) if downsample else (8, 1)
    by_hand = RelaxedLayer({"fc": FactoredFC(3, 5, 8, out_size), "conv": Conv(3, 5, stride=stride)},
                           downsample=downsample)
    assert (derived.paths["fc"].out_size, derived.paths["conv"].stride) == (out_size, stride)
    assert derived.state_dict().keys() == by_hand.state_dict().keys()
    for name, value in by_hand.state_dict().items():
        assert torch.equal(derived.state_dict()[name], value), name
    x = torch.randn(2, 3, 8, 8)
    assert derived(x).shape == (2, 5, out_size, out_size)
    assert torch.equal(derived(x), by_hand(x))


@pytest.mark.parametrize("paths", LAYER_NAMES)
def test_relaxed_layer_of_every_name_maps_its_input_to_the_output_shape(paths: str) -> None:
    fields = N_ROTATIONS if paths in GROUP_LAYERS else 1  # group layers act on p4 feature maps (B, 4C, H, W)
    layer = relaxed_layer(2, 3, 6, paths, downsample=True)
    assert layer(torch.randn(2, 2 * fields, 6, 6)).shape == (2, 3 * fields, 3, 3)
    assert set(layer.paths) == set(LAYERS[paths])


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((3, 4, 8, "ffc_cnv"), {}, "unknown layer 'ffc_cnv'; valid layers are: fc, conv"),
        ((3, 4, 7), {"downsample": True}, "size must be even, got 7"),
        ((0, 4, 8), {}, "in_channels must be a positive integer, got 0"),
        ((3, 4, 8.0), {}, "size must be a positive integer, got 8.0"),
    ],
)
def test_relaxed_layer_rejects_what_it_cannot_build(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        relaxed_layer(*args, **kwargs)
