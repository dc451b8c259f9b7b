"""kfac on its own: stock models where ``ella`` cannot be imported, and the rule and option registration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ella.layers  # registers ella's rules: the stock results must not depend on them)
import kfac
from kfac.laplace_backend import KfacGGN
from kfac_utils import stock_models
from laplace import KronLaplace

REPO = Path(__file__).resolve().parents[1]
DT = torch.float64

# Runs in a fresh interpreter: every import of ``ella`` fails, then kfac fits a stock MLP and a stock CNN (and
# laplace-torch's KronLaplace with the kfac backend the MLP) and saves what it found to argv[1].
_WITHOUT_ELLA = r"""
import importlib.abc
import sys


class BlockElla(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ella" or name.startswith("ella."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None


sys.meta_path.insert(0, BlockElla())
try:
    import ella
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("ella could be imported")

import torch
from laplace import KronLaplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kfac
from kfac.laplace_backend import KfacGGN
sys.path.insert(0, sys.argv[2])
from kfac_utils import stock_models

found = {}
for tag, (model, x, y) in stock_models().items():
    curvature = kfac.fit_kfac(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    found[tag] = {name: (block.out_factors, block.in_factors) for name, block in curvature.blocks.items()}
model, x, y = stock_models()["mlp"]
la = KronLaplace(model, "classification", backend=KfacGGN)
la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
found["laplace"] = la.log_marginal_likelihood(torch.tensor(0.5, dtype=torch.float64)).detach()
try:
    kfac.fit_kfac(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), [(torch.randn(4, 5), torch.zeros(4).long())])
except NotImplementedError as error:
    found["unsupported"] = str(error)
found["ella_modules"] = sorted(name for name in sys.modules if name == "ella" or name.startswith("ella."))
torch.save(found, sys.argv[1])
"""


def test_kfac_fits_stock_models_where_ella_cannot_be_imported(tmp_path):
    out = tmp_path / "found.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ELLA, str(out), str(REPO / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = torch.load(out)
    assert found["ella_modules"] == []
    assert "module 1 (BatchNorm1d) owns parameters ['weight', 'bias'] but has no KFAC rule" in found["unsupported"]
    for tag, (model, x, y) in stock_models().items():  # the same numbers with ella's rules registered
        curvature = kfac.fit_kfac(model, [(x[:3], y[:3]), (x[3:], y[3:])])
        assert list(found[tag]) == [name for name, _ in model.named_parameters()]
        for name, block in curvature.blocks.items():
            for got, expected in zip(found[tag][name], (block.out_factors, block.in_factors)):
                assert (got is None and expected is None) or torch.allclose(got, expected, rtol=1e-12, atol=0)
    model, x, y = stock_models()["mlp"]
    la = KronLaplace(model, "classification", backend=KfacGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    expected = la.log_marginal_likelihood(torch.tensor(0.5, dtype=DT)).detach()
    assert torch.allclose(found["laplace"], expected, rtol=1e-12, atol=0)


def test_kfac_source_never_names_ella():
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "kfac").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "ella" in line
    ]
    assert hits == []


class _Affine(nn.Module):
    """``nn.Linear``'s forward in a class of its own (no stock rule applies to it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias, self.out_features = linear.weight, linear.bias, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _SubclassedAffine(_Affine):
    pass


class _SubclassedLinear(nn.Linear):
    pass


def test_a_registered_rule_is_used_for_its_class_and_subclasses_only_when_asked():
    torch.manual_seed(1)
    linear = nn.Linear(4, 3, dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.arange(5) % 3
    with pytest.raises(NotImplementedError, match=r"module <root> \(_Affine\).*kfac\.register_rule"):
        kfac.kfac_batch(_Affine(linear), x, y)
    kfac.register_rule(_Affine, kfac.rules.linear_rule)
    kfac.register_rule(_Affine, kfac.rules.linear_rule)  # the same rule again: nothing changes
    expected = kfac.kfac_batch(linear, x, y)
    subclassed = _SubclassedLinear(4, 3, dtype=DT)  # stock rules apply to subclasses
    subclassed.load_state_dict(linear.state_dict())
    for model in (_Affine(linear), subclassed):
        got = kfac.kfac_batch(model, x, y)
        for name in ("weight", "bias"):
            assert torch.equal(got.dense(name), expected.dense(name))
    with pytest.raises(NotImplementedError, match=r"module <root> \(_SubclassedAffine\)"):
        kfac.kfac_batch(_SubclassedAffine(linear), x, y)
    with pytest.raises(ValueError, match="_Affine already has a KFAC rule"):
        kfac.register_rule(_Affine, kfac.rules.conv2d_rule)
    kfac.register_rule(_Affine, kfac.rules.linear_rule, subclasses=True, replace=True)
    got = kfac.kfac_batch(_SubclassedAffine(linear), x, y)
    assert torch.equal(got.dense("weight"), expected.dense("weight"))


def test_options_are_checked_by_name_and_value():
    with pytest.raises(TypeError, match=r"unknown KFAC option\(s\) \['grouped_mod'\]"):
        kfac.RuleOptions(grouped_mod="reference")
    with pytest.raises(ValueError, match=r"rotation_mode must be one of \('expand', 'reduce'\), got 'full'"):
        kfac.RuleOptions(rotation_mode="full")
    options = kfac.RuleOptions(grouped_mode="reference")
    assert (options.grouped_mode, options.rotation_mode, options.kfac_approx) == ("reference", "expand", "expand")
    kfac.register_option(kfac.RuleOption("rotation_mode", ella.layers.ROTATION_MODES, "expand"))  # again: fine
    with pytest.raises(ValueError, match="a different KFAC option 'rotation_mode'"):
        kfac.register_option(kfac.RuleOption("rotation_mode", ella.layers.ROTATION_MODES, "reduce"))


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(DT)


def _cnn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(5, 2, 4, 4, dtype=DT), torch.arange(5) % 3


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_labels_of_any_integer_dtype_give_the_int64_result(dtype):
    model, (x, y) = _tiny_cnn(), _cnn_batch()
    for curvature in ("ggn", "ef", "mc"):
        expected = kfac.kfac_batch(model, x, y, curvature=curvature, generator=torch.Generator().manual_seed(2))
        got = kfac.kfac_batch(model, x, y.to(dtype), curvature=curvature, generator=torch.Generator().manual_seed(2))
        assert torch.equal(got.loss, expected.loss)
        for name in expected.block_names:
            assert torch.equal(got.dense(name), expected.dense(name))
    marglik = []
    for labels in (y, y.to(dtype)):
        la = KronLaplace(model, "classification", backend=KfacGGN)
        la.fit(DataLoader(TensorDataset(x, labels), batch_size=3))
        marglik.append(la.log_marginal_likelihood(torch.tensor(0.5, dtype=DT)).detach())
    assert torch.equal(marglik[1], marglik[0])


def test_bool_labels_are_rejected_as_classification_targets():
    model, (x, y) = _tiny_cnn(), _cnn_batch()
    with pytest.raises(ValueError, match=r"targets must be 5 class indices \(integers\), got torch.bool"):
        kfac.kfac_batch(model, x, y > 0)


class _WithAuxHead(nn.Module):
    """A tiny CNN whose ``aux`` head is never called in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = _tiny_cnn(), nn.Linear(12, 5, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _KeywordInput(nn.Module):
    """Calls its linear layer with the input as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(input=x)


def test_an_uncalled_trainable_module_is_named_and_an_uncalled_frozen_one_is_ignored():
    model, (x, y) = _WithAuxHead(), _cnn_batch()
    with pytest.raises(NotImplementedError, match=r"module aux \(Linear\) owns trainable parameters but was not "
                       r"called in the forward pass; freeze its parameters \(module.requires_grad_\(False\)\)"):
        kfac.fit_kfac(model, [(x, y)])
    model.aux.requires_grad_(False)
    got = kfac.fit_kfac(model, [(x, y)])
    expected = kfac.fit_kfac(model.body, [(x, y)])
    assert got.block_names == [f"body.{name}" for name in expected.block_names]
    with pytest.raises(NotImplementedError, match=r"module linear \(Linear\) was called without a positional input"):
        kfac.kfac_batch(_KeywordInput(), torch.randn(5, 4, dtype=DT), y)


def test_empty_batches_and_models_without_trainable_parameters_are_value_errors():
    model, (x, y) = _tiny_cnn(), _cnn_batch()
    with pytest.raises(ValueError, match=r"the batch has no samples \(inputs of shape \(0, 2, 4, 4\)\)"):
        kfac.kfac_batch(model, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"fit_kfac: batch 1 of the loader has no samples"):
        kfac.fit_kfac(model, [(x, y), (x[:0], y[:0])])
    model.requires_grad_(False)
    for fit in (lambda: kfac.kfac_batch(model, x, y), lambda: kfac.fit_kfac(model, [(x, y)])):
        with pytest.raises(ValueError, match=r"all 4 parameter tensors of the model are frozen.*_grad_\(True\)"):
            fit()
    no_params = nn.Flatten()
    for fit in (lambda: kfac.kfac_batch(no_params, x, y), lambda: kfac.fit_kfac(no_params, [(x, y)])):
        with pytest.raises(ValueError, match="the model has no parameters"):
            fit()


def test_factor_dtype_must_be_a_floating_torch_dtype():
    model, (x, y) = _tiny_cnn(), _cnn_batch()
    with pytest.raises(TypeError, match=r"factor_dtype must be a torch.dtype such as torch.float64 \(or None\), got "
                       r"'float64'"):
        kfac.fit_kfac(model, [(x, y)], factor_dtype="float64")
    with pytest.raises(ValueError, match="factor_dtype must be a floating-point dtype"):
        kfac.kfac_batch(model, x, y, factor_dtype=torch.int64)
    assert kfac.kfac_batch(model.float(), x.float(), y, factor_dtype=DT).dense("2.weight").dtype == DT
