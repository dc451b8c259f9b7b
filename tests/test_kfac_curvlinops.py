"""Our factors for stock Linear / Conv2d (ella's circular Conv) equal curvlinops' KFAC (expand and reduce)."""

from __future__ import annotations

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

from ella.layers import Conv, with_stock_strided_convs
from ella.models import build_model
from kfac.fit import kfac_batch

DT = torch.float64


def _model() -> nn.Module:
    return nn.Sequential(
        Conv(2, 3).to(DT),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=DT),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 9, 5, dtype=DT),
    )


def _curvlinops_factors(model, x, y, fisher_type, seed=2147483647, kfac_approx="expand"):
    params = [p for p in model.parameters()]
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=True,
        check_deterministic=False,
        seed=seed,
    )
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_factors_match_curvlinops(fisher_type, kfac_approx):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(6, 2, 6, 6, dtype=DT), torch.arange(6) % 5
    a_ref, b_ref = _curvlinops_factors(model, x, y, fisher_type, seed=123, kfac_approx=kfac_approx)
    ours = kfac_batch(
        model,
        x,
        y,
        curvature="ggn" if fisher_type == "type-2" else "mc",
        position_norm="all",
        kfac_approx=kfac_approx,
        generator=torch.Generator().manual_seed(123),
    )
    for module_name, weight in (("0.conv", "0.conv.weight"), ("2", "2.weight"), ("5", "5.weight")):
        b, a = ours.scaled_factors(weight)
        torch.testing.assert_close(a[0], a_ref[module_name], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(b[0], b_ref[module_name], rtol=1e-6, atol=1e-10)
    # Linear bias: curvlinops' bias block is the gradient covariance, which is exact for 2-d inputs
    torch.testing.assert_close(ours.scaled_factors("5.bias")[0][0], b_ref["5"], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_conv_network_factors_match_curvlinops_on_its_stock_form(fisher_type):
    """The paper's CONV network: our factors (stride-2 CONV paths as ``StackedConv2d`` on phase stacks) equal
    curvlinops' on the same network with those paths in stock form (``nn.Conv2d(stride=2)`` on phase windows)."""
    torch.manual_seed(0)
    model = build_model("conv", in_channels=1, n_classes=3, alpha=1).to(DT)
    stock = with_stock_strided_convs(model)
    x, y = torch.randn(3, 1, 32, 32, dtype=DT), torch.arange(3)
    a_ref, b_ref = _curvlinops_factors(stock, x, y, fisher_type, seed=5)
    ours = kfac_batch(
        model, x, y, curvature="ggn" if fisher_type == "type-2" else "mc", position_norm="all",
        generator=torch.Generator().manual_seed(5),
    )
    strided = [name for name, module in stock.named_modules() if getattr(module, "stride", None) == (2, 2)]
    assert len(strided) == 5 and set(strided) <= set(a_ref)  # every downsampling block is compared
    for module_name in a_ref:
        b, a = ours.scaled_factors(f"{module_name}.weight")
        torch.testing.assert_close(a[0], a_ref[module_name], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(b[0], b_ref[module_name], rtol=1e-6, atol=1e-10)
