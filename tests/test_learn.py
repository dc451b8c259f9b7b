"""ella as a library: the one-call training entry point against the experiments' Trainer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ella.checkpoint import CheckpointError
from ella.data import DataBundle, load_dataset
from ella.inputs import ModelError
from ella.layers import Conv, FactoredFC, RelaxedLayer, relaxed_layer
from ella.layers.blocks import GROUP_LAYERS, LAYER_NAMES, LAYERS
from ella.layers.group import N_ROTATIONS
from ella.learn import learn
from ella.models import build_model
from ella.priors import prior_groups
from ella.train import Interrupted, Learner, train
from test_train import REPO, _raise_in_epoch, _tiny_config, _without_timing, _write_tiny_cifar

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
    return _tiny_config(data, layer="ffc_conv", epochs=2, burn_in=1, marglik_every=1, marglik_method="alternation")


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


def _tiny_bundle(data: Path, config) -> DataBundle:
    """The data a Trainer of ``config`` loads, loaded as a user would; the global seed set as the Trainer sets it."""
    torch.manual_seed(config.seed)
    return load_dataset(config.dataset, data, n_train=config.n_train, n_valid=config.n_valid, seed=config.seed,
                        device="cpu")


def _rows(out: Path) -> list[dict]:
    return _without_timing([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def test_learn_on_the_papers_network_gives_the_trainers_run(tmp_path: Path) -> None:
    """The entry point on ``build_model("ffc_conv", ...)`` with the experiment's options: the Trainer's metrics,
    precisions, history and report, to the bit (and so the numbers pinned from before the refactor)."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _equivalence_config(data)
    expected = train(config, tmp_path / "trainer")
    bundle = _tiny_bundle(data, config)
    model = build_model("ffc_conv", bundle.in_channels, bundle.n_classes, alpha=1)
    result = learn(model, bundle.train, valid=bundle.valid, test=bundle.test, augment=bundle.augment, epochs=2,
                   batch_size=16, burn_in=1, marglik_every=1, hyper_steps=3, kfac_batch_size=25, seed=3, device="cpu",
                   marglik_method="alternation")
    for key in ("valid", "test", "neg_log_marglik", "precisions", "n_params", "effective_layer_types"):
        assert result.metrics[key] == expected[key], key
    assert result.precisions == expected["precisions"]
    assert _without_timing(result.history) == _rows(tmp_path / "trainer")
    report = json.loads((tmp_path / "trainer" / "effective_parameters.json").read_text())["paths"]
    assert [asdict(row) for row in result.report] == [{**row, "precisions": tuple(row["precisions"])} for row in report]
    assert result.metrics["test"] == pytest.approx(TRAINER_BEFORE["test"], rel=1e-5)


class _Stage(nn.Module):
    """A user's module holding a relaxed layer one level down."""

    def __init__(self) -> None:
        super().__init__()
        self.block = relaxed_layer(3, 4, 8, "ffc_conv", downsample=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _nested_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Stage(), nn.Sequential(relaxed_layer(4, 4, 4, "fc_conv")), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _images(n: int = 24, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.arange(n) % classes


def test_the_report_names_relaxed_layers_by_their_module_path_at_any_depth(tmp_path: Path) -> None:
    model = _nested_model()
    result = learn(model, _images(), epochs=1, batch_size=8, burn_in=1, hyper_steps=2, device="cpu",
                   out_dir=tmp_path / "run")
    assert [(row.layer, row.path, row.kind) for row in result.report] == [
        ("0.block", "fc", "F-FC"), ("0.block", "conv", "CONV"), ("1.0", "fc", "FC"), ("1.0", "conv", "CONV"),
        ("3", None, "Linear"),
    ]
    modules = dict(model.named_modules())
    for row in result.report:  # every row counts the parameters of its own module
        owner = modules[f"{row.layer}.paths.{row.path}" if row.path else row.layer]
        assert row.n_params == sum(p.numel() for p in owner.parameters())
    for layer in ("0.block", "1.0"):
        assert sum(row.relative for row in result.report if row.layer == layer) == pytest.approx(1.0)
    assert list(result.precisions) == ["0.block.fc", "0.block.conv", "1.0.fc", "1.0.conv", "3"]
    assert result.metrics["effective_layer_types"].keys() == {"0.block", "1.0"}
    assert "0.block" in result.table() and (tmp_path / "run" / "effective_parameters.txt").read_text() == \
        result.table() + "\n"


def test_a_relaxed_layer_inside_a_path_has_its_own_precisions() -> None:
    """The innermost path owns a parameter: a relaxed layer nested in another's path is not merged into it."""
    class Deep(nn.Sequential):  # a user's path made of a relaxed layer
        equivariant, kind = False, "deep"

    outer = RelaxedLayer({"conv": Conv(2, 2), "deep": Deep(relaxed_layer(2, 2, 4, "ffc_conv"))}, downsample=False)
    groups = {group.name: group.param_names for group in prior_groups(nn.Sequential(outer))}
    assert list(groups) == ["0.conv", "0.paths.deep.0.fc", "0.paths.deep.0.conv"]
    assert groups["0.paths.deep.0.conv"] == ("0.paths.deep.0.paths.conv.conv.weight",
                                             "0.paths.deep.0.paths.conv.conv.bias")


def test_a_dataloader_trains_exactly_as_the_same_batches_of_tensors(tmp_path: Path) -> None:
    """The plain loop over a torch DataLoader (whose sampler draws the permutations the tensor loader draws):
    the same run, epoch by epoch, as the tensors."""
    x, y = _images()

    class SamePermutations(torch.utils.data.Sampler):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(5)

        def __len__(self) -> int:
            return len(y)

        def __iter__(self):
            return iter(torch.randperm(len(y), generator=self.generator).tolist())

    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=8, sampler=SamePermutations())
    options = {"epochs": 2, "batch_size": 8, "burn_in": 1, "marglik_every": 1, "hyper_steps": 2, "seed": 5,
               "device": "cpu", "valid": (x[:10], y[:10]), "laplace_data": (x, y)}
    from_tensors = learn(_nested_model(), (x, y), **options)
    from_loader = learn(_nested_model(), loader, **{**options, "valid": DataLoader(TensorDataset(x[:10], y[:10]), batch_size=10)})
    assert _without_timing(from_loader.history) == _without_timing(from_tensors.history)
    assert from_loader.precisions == from_tensors.precisions


def test_an_interrupted_library_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"epochs": 3, "batch_size": 8, "burn_in": 1, "marglik_every": 1, "hyper_steps": 2, "device": "cpu",
               "checkpoint_every": 1}  # so that the interruption in epoch 3 finds epoch 2 saved
    straight = learn(_nested_model(), _images(), out_dir=tmp_path / "straight", **options)
    original = _raise_in_epoch(monkeypatch, 3, KeyboardInterrupt, Learner)
    with pytest.raises(Interrupted, match="interrupted in epoch 3 of 3; the checkpoint in .* holds epoch 2"):
        learn(_nested_model(), _images(), out_dir=tmp_path / "run", **options)
    monkeypatch.setattr(Learner, "train_epoch", original)
    resumed = learn(_nested_model(), _images(), out_dir=tmp_path / "run", resume=True, **options)
    assert _rows(tmp_path / "run") == _rows(tmp_path / "straight")
    assert resumed.precisions == straight.precisions and resumed.metrics["epochs"] == 3
    other = nn.Sequential(relaxed_layer(3, 4, 8, "conv"), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    with pytest.raises(CheckpointError, match="holds another model than this run's"):
        learn(other, _images(), out_dir=tmp_path / "run", resume=True, **options)


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = relaxed_layer(3, 4, 8, "ffc_conv")
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x)).flatten(1))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), "has no relaxed layer"),
        (_BatchNormNet, "module norm (BatchNorm2d) owns parameters ['weight', 'bias'] but has no KFAC rule"),
        (lambda: nn.Sequential(relaxed_layer(3, 4, 8, "conv"), nn.Flatten(), nn.Linear(256, 8),
                               nn.ReLU(inplace=True), nn.Linear(8, 3)), "output of module 2 was modified in place"),
    ],
)
def test_a_model_ella_cannot_handle_is_refused_before_training(make, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Learner, "train_epoch", lambda self: pytest.fail("trained a model it cannot handle"))
    model = make()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ModelError, match=re.escape(message)):
        learn(model, _images(), epochs=1, device="cpu")
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([{"image": torch.zeros(2, 3, 8, 8), "label": torch.zeros(2, dtype=torch.long)}],
         "a batch was a dict with keys ['image', 'label']"),
        ([torch.zeros(2, 3, 8, 8)], "a batch was one tensor of shape (2, 3, 8, 8)"),
        ([(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), "id")], "a batch was a tuple of 3 items"),
    ],
)
def test_loaders_whose_batches_are_not_pairs_are_a_clear_error(batches: list, message: str) -> None:
    class Loader(list):
        dataset = range(2)

    for name, training, laplace, marglik in (("train", Loader(batches), None, True),  # blamed on train, not laplace
                                             ("laplace_data", _images(), Loader(batches), True),
                                             ("train", Loader(batches), None, False)):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be tensors (x, y) or a loader") +
                           ".*" + re.escape(message)):
            learn(_nested_model(), training, laplace_data=laplace, laplace=marglik, epochs=1, device="cpu")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"layer": "conv"}, TypeError, "learn() takes no 'layer'"),
        ({"learning_rate": 0.1}, TypeError, "unknown option 'learning_rate'; the training options are: epochs,"),
        ({"resume": True}, ValueError, "resume needs the output folder"),
        ({"resume": "False"}, ValueError, "resume must be True or False, got 'False'"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0, got -1.0"),
        ({"epochs": 0}, ValueError, "epochs must be an integer >= 1, got 0"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
    ],
)
def test_options_that_learn_cannot_take_are_a_clear_error(options: dict, error: type, message: str) -> None:
    options = {"epochs": 1, **options}
    with pytest.raises(error, match=re.escape(message)) as raised:
        learn(_nested_model(), _images(), device="cpu", **options)
    assert "--" not in str(raised.value)  # the argument's name, not a flag


def test_the_example_learns_the_precisions_of_its_network_and_prints_the_report(tmp_path: Path) -> None:
    """examples/mnist_symmetries.py on a small stand-in for MNIST: one row per path of its three relaxed layers
    (named by their index in the user's nn.Sequential) and one for the head, each layer's shares summing to 1."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (700, 28, 28), dtype=np.uint8),
             y_train=np.arange(700) % 10, x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
             y_test=np.arange(100) % 10)
    command = [sys.executable, str(REPO / "examples" / "mnist_symmetries.py"), "--data-dir", str(tmp_path),
               "--n-train", "100", "--epochs", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split() for line in lines[header + 1:header + 8]]
    assert [row[:3] for row in rows] == [["0", "fc", "F-FC"], ["0", "conv", "CONV"], ["1", "fc", "F-FC"],
                                         ["1", "conv", "CONV"], ["2", "fc", "F-FC"], ["2", "conv", "CONV"],
                                         ["4", "-", "Linear"]]
    for layer in ("0", "1", "2"):
        relative = [float(row[7]) for row in rows if row[0] == layer]  # layer path kind precision params N_eff norm rel out
        effective_type = " ".join(rows[int(layer) * 2][9:])  # one path, or both readings where they disagree
        assert sum(relative) == pytest.approx(1.0, abs=1e-3)
        assert re.fullmatch(r"(F-FC|CONV)|(F-FC|CONV)\? \(rel\) / (F-FC|CONV) \(out\)", effective_type), effective_type
    assert lines[0].startswith("test accuracy ")


def _with(data: tuple[torch.Tensor, torch.Tensor], index: int, *, label: int | None = None,
          value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``data`` with example ``index``'s label or one of its input values replaced."""
    x, y = data[0].clone(), data[1].clone()
    if label is not None:
        y[index] = label
    if value is not None:
        x[index, 0, 0, 0] = value
    return x, y


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"train": _with(_images(), 21, label=3)}, "train: the label of example 21 is 3, not a class index in [0, 3)"),
        ({"valid": _with(_images(6), 5, label=-1)}, "valid: the label of example 5 is -1"),
        ({"test": _with(_images(6), 4, label=9)}, "test: the label of example 4 is 9"),
        ({"train": (_images()[0], F.one_hot(_images()[1], 3).float())},
         "the labels of train look one-hot (shape (24, 3), torch.float32): learn() expects class indices"),
        ({"train": _with(_images(), 17, value=float("nan"))}, "train: example 17 has non-finite inputs (nan or inf)"),
        ({"valid": _with(_images(6), 2, value=float("inf"))}, "valid: example 2 has non-finite inputs"),
        ({"laplace_data": _with(_images(), 9, value=float("nan"))}, "laplace_data: example 9 has non-finite inputs"),
        ({"train": (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))}, "train holds no examples"),
        ({"valid": (torch.zeros(3, 3, 8, 8), torch.zeros(2, dtype=torch.long))}, "valid holds 3 inputs but 2 labels"),
        ({"train": DataLoader(TensorDataset(*_with(_images(), 13, label=5)), batch_size=10)},
         "train: the label of example 3 in batch 1 is 5"),
        ({"valid": DataLoader(TensorDataset(*_with(_images(6), 4, value=float("nan"))), batch_size=4)},
         "valid: example 0 in batch 1 has non-finite inputs"),
    ],
)
def test_bad_data_anywhere_are_named_by_argument_and_example_before_training(
        arguments: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every example is checked, in every argument, before a step is taken (tensors) or as its batch comes
    (loaders: the epoch fails at that batch, not with an IndexError or a NaN loss)."""
    data = {"train": _images(), **arguments}
    if not isinstance(data["train"], DataLoader) and not isinstance(data.get("valid"), DataLoader):
        monkeypatch.setattr(Learner, "train_epoch", lambda self: pytest.fail("trained on data it should refuse"))
    with pytest.raises(ValueError, match=re.escape(message)):
        learn(_nested_model(), data.pop("train"), **data, epochs=1, laplace=False, device="cpu")


def test_an_in_place_activation_after_a_relaxed_layer_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Learner, "train_epoch", lambda self: pytest.fail("trained a model it cannot handle"))
    model = nn.Sequential(relaxed_layer(3, 4, 8, "ffc_conv"), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(ModelError, match=re.escape("an in-place operation (such as nn.ReLU(inplace=True)")):
        learn(model, _images(), epochs=1, device="cpu")


def test_frozen_parameters_are_constants_without_a_prior(caplog: pytest.LogCaptureFixture) -> None:
    """A frozen head (``requires_grad=False``) has no prior group, is left as it was, and every round learns the
    precisions of the trainable paths (a prior over the frozen tensors skipped every round, then failed)."""
    model = _nested_model()
    model[3].requires_grad_(False)
    head = model[3].weight.detach().clone()
    with caplog.at_level("WARNING"):
        result = learn(model, _images(), epochs=2, batch_size=8, burn_in=1, marglik_every=1, hyper_steps=3,
                       device="cpu")
    assert "skipped" not in caplog.text
    assert [(row.layer, row.path) for row in result.report] == [("0.block", "fc"), ("0.block", "conv"),
                                                                ("1.0", "fc"), ("1.0", "conv")]
    assert torch.equal(result.model[3].weight, head)
    assert all(p != 1.0 for p in result.prior.as_dict().values())  # learned from delta = 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"train": (_images()[0].mul(40).clamp(0, 255).to(torch.uint8), _images()[1])},
         "the model cannot take the inputs of train: they are torch.uint8 and the model takes torch.float32: "
         "convert them, e.g. x.to(torch.float32) / 255"),
        ({"train": (_images()[0].double(), _images()[1])},
         "they are torch.float64 and the model takes torch.float32: convert them with x.to(torch.float32)"),
        ({"valid": (_images(6)[0].double(), _images(6)[1])},
         "valid: the inputs are not those the model takes: they are torch.float64"),
        ({"train": TensorDataset(*_images())}, "train is a TensorDataset of single examples: pass tensors (x, y) or "
                                               "batches, e.g. torch.utils.data.DataLoader(dataset, batch_size=128)"),
        ({"train": tuple(t.numpy() for t in _images())}, "train must be tensors (x, y), not numpy arrays"),
        ({"test": DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)))},
         "test holds no examples"),
        ({"augment": True}, "augment takes a function (x, generator) -> x"),
    ],
)
def test_inputs_the_model_cannot_take_are_a_clear_error_before_training(
        arguments: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Learner, "train_epoch", lambda self: pytest.fail("trained on data it should refuse"))
    data = {"train": _images(), **arguments}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        learn(_nested_model(), data.pop("train"), **data, epochs=1, laplace=False, device="cpu")


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _nested_model()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x


def test_a_model_that_returns_more_than_scores_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=re.escape("one tensor of class scores (B, K); on one example of train it "
                                                   "gave a tuple of 2 items (Tensor, Tensor)")):
        learn(_TwoOutputs(), _images(), epochs=1, device="cpu")


def test_labels_of_any_integer_type_and_no_augmentation_train_as_int64_labels() -> None:
    x, y = _images()
    runs = [learn(_nested_model(), (x, labels), epochs=1, batch_size=8, burn_in=1, hyper_steps=2, device="cpu",
                  augment=augment).metrics["neg_log_marglik"]
            for labels, augment in ((y, None), (y.int(), False), (y.short(), None), (y.to(torch.uint8), None))]
    assert runs[1:] == runs[:1] * 3
