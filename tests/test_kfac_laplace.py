"""laplace-torch KronLaplace with the ella backends equals our own KFAC marginal likelihood and gradient."""

from __future__ import annotations

import pytest
import torch
from laplace import KronLaplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ella.layers import FC, Conv, FactoredFC, RelaxedLayer, SparseConv
from ella.models import LAYER_NAMES, build_model
from kfac import CurvatureError
from kfac.fit import fit_kfac
from kfac.laplace_backend import EllaEF, EllaGGN, EllaMC, KfacEF, KfacGGN, KfacMC

DT = torch.float64


def _model(dense: str) -> nn.Module:
    """Relaxed layer (dense path + CONV or S-CONV) with downsampling, then a Linear head."""
    paths = {
        "fc": FC(2, 3, 4, 2, dtype=DT) if dense == "fc" else FactoredFC(2, 3, 4, 2, dtype=DT),
        "conv": Conv(2, 3).to(DT) if dense == "fc" else SparseConv(2, 3, dtype=DT),
    }
    return nn.Sequential(RelaxedLayer(paths, downsample=True), nn.Flatten(), nn.Linear(12, 3, dtype=DT))


def _loader() -> DataLoader:
    x = torch.randn(10, 2, 4, 4, dtype=DT)
    y = torch.arange(10) % 3
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _our_log_marglik(model, loader, delta, curvature="ggn", **options) -> torch.Tensor:
    curv = fit_kfac(model, loader, "classification", curvature, grouped_mode="reference", **options)
    dec = curv.decompose()
    sq_norms = torch.stack([p.detach().square().sum() for p in model.parameters()])
    n_params = torch.tensor(dec.num_params(), dtype=DT)
    logdet = dec.logdet(delta).sum() - (n_params * delta.log()).sum()
    return -(curv.loss + 0.5 * (delta * sq_norms).sum() + 0.5 * logdet)


@pytest.mark.parametrize(("dense", "kfac_approx"), [("fc", "expand"), ("ffc", "expand"), ("fc", "reduce")])
def test_kron_laplace_marglik_and_gradient_match_ours(dense, kfac_approx):
    torch.manual_seed(0)
    model, loader = _model(dense), _loader()
    n_tensors = len(list(model.parameters()))
    log_delta = torch.linspace(-1.0, 1.5, n_tensors, dtype=DT)

    la = KronLaplace(model, "classification", backend=EllaGGN, backend_kwargs={"kfac_approx": kfac_approx})
    la.fit(loader)
    delta_la = log_delta.exp().requires_grad_(True)
    lml_la = la.log_marginal_likelihood(delta_la)
    (grad_la,) = torch.autograd.grad(lml_la, delta_la)

    delta_ours = log_delta.exp().requires_grad_(True)
    lml_ours = _our_log_marglik(model, loader, delta_ours, kfac_approx=kfac_approx)
    (grad_ours,) = torch.autograd.grad(lml_ours, delta_ours)

    assert abs(float((lml_la - lml_ours).detach())) < 1e-6 * abs(float(lml_ours.detach()))
    assert torch.allclose(grad_la, grad_ours, rtol=1e-6, atol=1e-9)


def test_laplace_factor_layout_matches_parameter_shapes():
    torch.manual_seed(1)
    model = _model("ffc")
    x, y = next(iter(_loader()))
    _, kron = EllaGGN(model, "classification").kron(x, y, N=10)
    for p, factors in zip(model.parameters(), kron.kfacs):
        sizes = [f.shape[0] for f in factors]
        assert sizes == ([p.shape[0]] if p.ndim == 1 else [p.shape[0], p[0].numel()])


@pytest.mark.parametrize("backend", [EllaMC, EllaEF])
def test_stochastic_and_empirical_backends_fit(backend):
    torch.manual_seed(2)
    model = _model("ffc")
    la = KronLaplace(model, "classification", backend=backend)
    la.fit(_loader())
    assert torch.isfinite(la.log_marginal_likelihood(torch.tensor(1.0, dtype=DT)))


def test_empirical_backend_matches_our_empirical_fisher():
    torch.manual_seed(3)
    model, loader = _model("fc"), _loader()
    delta = torch.tensor(0.7, dtype=DT)
    la = KronLaplace(model, "classification", backend=EllaEF, prior_precision=0.7)
    la.fit(loader)
    ours = _our_log_marglik(model, loader, delta.expand(len(list(model.parameters()))), curvature="ef")
    assert abs(float((la.log_marginal_likelihood() - ours).detach())) < 1e-6 * abs(float(ours.detach()))


def test_per_group_mode_is_rejected():
    with pytest.raises(ValueError, match="reference"):
        EllaGGN(_model("ffc"), "classification", grouped_mode="per_group")


def test_the_old_backend_names_are_the_kfac_backends():
    assert (EllaGGN, EllaMC, EllaEF) == (KfacGGN, KfacMC, KfacEF)


def test_huge_inputs_are_a_curvature_error_naming_the_block_not_a_silent_exit():
    """Images x 1e20 (finite): a float32 input factor overflows, and laplace-torch's eigendecomposition of it
    would call exit() (status 0, no message)."""
    torch.manual_seed(5)
    model = _model("fc").float()
    x, y = 1e20 * torch.randn(10, 2, 4, 4), torch.arange(10) % 3
    la = KronLaplace(model, "classification", backend=KfacGGN)
    message = r"block 0\.paths\.fc\.linear\.weight \(input-side factor\): the factor of a batch has inf or NaN"
    with pytest.raises(CurvatureError, match=message):
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))


def test_factors_that_overflow_only_when_summed_over_batches_are_a_curvature_error():
    """Each batch's output factor of the first layer (``sum W2^T W2``, 1e308) is finite, their sum is not."""
    model = nn.Sequential(nn.Linear(2, 2, dtype=DT), nn.Linear(2, 1, dtype=DT))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1e-3)
        model[1].weight.fill_(1e154)
    x, y = torch.randn(2, 2, dtype=DT), torch.zeros(2, 1, dtype=DT)
    la = KronLaplace(model, "regression", backend=KfacGGN)
    message = r"block 0\.weight \(output-side factor\): the factor summed over the batches has inf or NaN"
    with pytest.raises(CurvatureError, match=message):
        la.fit(DataLoader(TensorDataset(x, y), batch_size=1))


def test_an_exit_in_laplace_eigendecomposition_is_a_curvature_error_naming_the_block(monkeypatch):
    monkeypatch.setattr("laplace.utils.matrix.symeig", lambda matrix: exit())
    la = KronLaplace(_model("fc"), "classification", backend=KfacGGN)
    message = r"block 0\.paths\.fc\.linear\.weight: laplace-torch's eigendecomposition failed \(it called exit\(\)\)"
    with pytest.raises(CurvatureError, match=message):
        la.fit(_loader())


def _fit_on_paper_network(layer: str) -> torch.Tensor:
    torch.manual_seed(4)
    model = build_model(layer, in_channels=1, n_classes=3, alpha=1).to(DT)
    x, y = torch.randn(6, 1, 32, 32, dtype=DT), torch.arange(6) % 3
    la = KronLaplace(model, "classification", backend=EllaGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    n_tensors = len(list(model.parameters()))
    return la.log_marginal_likelihood(torch.full((n_tensors,), 2.0, dtype=DT))


FAST_NETWORKS = ("conv", "sconv", "gconv")  # the others hold F-FC / S-FC / FC factors up to 4096^2 at width 1


@pytest.mark.parametrize("layer", FAST_NETWORKS)
def test_kron_laplace_fits_every_paper_network(layer):
    """``KronLaplace(model, backend=EllaGGN)`` on the paper's 8-block network, for every layer name."""
    assert torch.isfinite(_fit_on_paper_network(layer))


@pytest.mark.slow
@pytest.mark.parametrize("layer", [name for name in LAYER_NAMES if name not in FAST_NETWORKS])
def test_kron_laplace_fits_the_dense_paper_networks(layer):
    """The same for the networks with dense paths (laplace-torch's one-Kronecker-product format materialises
    the F-FC input factor as a block-diagonal (C X)^2 matrix: up to 4096^2 here, minutes to eigendecompose)."""
    assert torch.isfinite(_fit_on_paper_network(layer))
