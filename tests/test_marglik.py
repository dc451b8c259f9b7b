"""The Laplace marginal likelihood and the effective-parameter report against independent dense computations."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from ella.data import TensorLoader
from ella.layers import FC, Conv, FactoredFC, RelaxedLayer
from ella.marglik import MarglikError, effective_parameters, fit_laplace, neg_log_marglik, optimise_prior
from ella.models import build_model
from ella.priors import Prior, prior_groups
from kfac import EigenvalueMemo, fit_kfac
from ella.report import effective_layer_types, format_report, path_output_power, path_reports, with_output_shares


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _exact_ggn_blocks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-tensor blocks of the exact GGN J^T H J of the summed cross-entropy (torch.func, dense)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (x,))

    jac = jacrev(logits)(params)  # name -> (N, K, *shape)
    probs = logits(params).softmax(-1)
    hess = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, K, K)
    blocks = {}
    for name, j in jac.items():
        j = j.flatten(2)  # (N, K, P)
        blocks[name] = torch.einsum("nkp,nkl,nlq->pq", j, hess, j)
    return blocks


def _dense_neg_log_marglik(model, x, y, delta_per_tensor) -> torch.Tensor:
    """-log p(D|delta)/N of the Laplace approximation with the block-diagonal exact GGN, by slogdet."""
    blocks = _exact_ggn_blocks(model, x)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    total = loss
    for (name, p), delta in zip(model.named_parameters(), delta_per_tensor):
        eye = torch.eye(p.numel(), dtype=p.dtype)
        logdet = torch.linalg.slogdet(blocks[name] + delta * eye).logabsdet
        total = total + 0.5 * delta * p.pow(2).sum() + 0.5 * (logdet - p.numel() * torch.log(delta))
    return total / len(y)


def test_marglik_equals_dense_laplace_where_kfac_is_exact() -> None:
    """One data point: every KFAC block of an MLP is its exact GGN block, so the objectives must agree."""
    model = _tiny_mlp()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    prior = Prior(model, per_tensor=True).double()
    with torch.no_grad():
        prior.log_precision.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64))
    fit = fit_laplace(model, TensorLoader(x, y, 1), prior)
    ours = neg_log_marglik(fit, prior)
    dense = _dense_neg_log_marglik(model, x, y, prior.tensor_precisions().detach())
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=1e-12)


def _tiny_relaxed(dense: str = "ffc") -> nn.Module:
    """An 8x8 F-FC+CONV (or FC+CONV) relaxed layer with downsampling and a linear head."""
    torch.manual_seed(1)
    fc = FactoredFC(1, 2, 8, 4) if dense == "ffc" else FC(1, 2, 8, 4)
    layer = RelaxedLayer({"fc": fc, "conv": Conv(1, 2)}, downsample=True)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(2 * 16, 4)).double()


def test_marglik_gradient_matches_finite_differences() -> None:
    model = _tiny_relaxed()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    prior = Prior(model).double()
    with torch.no_grad():
        prior.log_precision.copy_(torch.linspace(-2, 3, len(prior.groups), dtype=torch.float64))
    fit = fit_laplace(model, TensorLoader(x, y, 3), prior)
    value = neg_log_marglik(fit, prior)
    (grad,) = torch.autograd.grad(value, prior.log_precision)
    eps = 1e-5
    numeric = torch.empty_like(grad)
    with torch.no_grad():
        for g in range(len(grad)):
            prior.log_precision[g] += eps
            up = neg_log_marglik(fit, prior)
            prior.log_precision[g] -= 2 * eps
            down = neg_log_marglik(fit, prior)
            prior.log_precision[g] += eps
            numeric[g] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def _per_block_neg_log_marglik(fit, prior) -> torch.Tensor:
    """The objective written out block by block from each block's factor eigenvalues (the pre-fusion form)."""
    delta = prior.tensor_precisions()
    total = fit.loss_sum + 0.5 * (delta * fit.squared_norms.to(delta)).sum()
    for block, d, size in zip(fit.decomposition.eigen, delta, fit.n_params):
        beta = block.out_vals.clamp_min(0)
        lam = beta.reshape(-1) if block.in_vals is None else (
            beta.expand(block.in_vals.shape[0], -1)[:, :, None] * block.in_vals.clamp_min(0)[:, None, :])
        total = total + 0.5 * (torch.log(lam + d).sum() - size * torch.log(d))
    return total / fit.n_data


def _fit_with_spread_precisions():
    model = _tiny_relaxed()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    prior = Prior(model, per_tensor=True).double()
    with torch.no_grad():
        prior.log_precision.copy_(torch.linspace(-3, 4, len(prior.groups), dtype=torch.float64))
    return fit_laplace(model, TensorLoader(x, y, 3), prior), prior


def test_fused_objective_equals_the_per_block_formula_and_its_gradient() -> None:
    fit, prior = _fit_with_spread_precisions()
    fused = neg_log_marglik(fit, prior)
    reference = _per_block_neg_log_marglik(fit, prior)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=0)
    (g_fused,) = torch.autograd.grad(fused, prior.log_precision)
    (g_reference,) = torch.autograd.grad(reference, prior.log_precision)
    torch.testing.assert_close(g_fused, g_reference, rtol=1e-10, atol=1e-14)


def test_objective_of_a_float32_prior_is_evaluated_in_float64() -> None:
    """The gradient in a log precision cancels terms of the size of the parameter count: a float32 prior gets
    the float64 gradient, rounded once (a float32 evaluation is off in the fifth digit)."""
    fit, prior64 = _fit_with_spread_precisions()
    prior32 = Prior(_tiny_relaxed(), per_tensor=True)
    with torch.no_grad():
        prior32.log_precision.copy_(prior64.log_precision)
    (g64,) = torch.autograd.grad(neg_log_marglik(fit, prior64), prior64.log_precision)
    (g32,) = torch.autograd.grad(neg_log_marglik(fit, prior32), prior32.log_precision)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32, g64.float(), rtol=2e-7, atol=1e-9)


def test_optimise_prior_follows_the_plain_step_by_step_loop() -> None:
    """Twenty fused hyper-steps give the precisions and value of the loop that evaluates the per-block objective
    twice per step and checks it on the host (the implementation before fusion)."""
    fit, prior = _fit_with_spread_precisions()
    reference_prior = Prior(_tiny_relaxed(), per_tensor=True).double()
    with torch.no_grad():
        reference_prior.log_precision.copy_(prior.log_precision)
    value = optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), steps=20)
    optimizer = torch.optim.Adam(reference_prior.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        _per_block_neg_log_marglik(fit, reference_prior).backward()
        optimizer.step()
    torch.testing.assert_close(prior.log_precision, reference_prior.log_precision, rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(_per_block_neg_log_marglik(fit, reference_prior).detach()), rel=1e-10)
    assert prior.log_precision.grad is None  # no gradient left behind on the precisions


def _dense_kronecker_objective(kron, fit, prior) -> torch.Tensor:
    """-log p(D|delta)/N from every block's dense Kronecker matrix (``KronCurvature.dense``), by slogdet: no
    factor eigendecomposition involved."""
    delta = prior.tensor_precisions()
    total = fit.loss_sum + 0.5 * (delta * fit.squared_norms.to(delta)).sum()
    for name, d in zip(kron.block_names, delta):
        dense = kron.dense(name)
        logdet = torch.linalg.slogdet(dense + d * torch.eye(dense.shape[0], dtype=dense.dtype)).logabsdet
        total = total + 0.5 * (logdet - dense.shape[0] * torch.log(d))
    return total / fit.n_data


def test_a_round_equals_one_computed_on_the_dense_kronecker_matrices() -> None:
    """A whole round in float64 (F-FC, CONV and a Linear head, whose weight shares its output factor with the
    bias): every block's eigenvalues equal ``eigvalsh`` of its dense Kronecker matrix, the objective equals the
    slogdet of those matrices, and twenty Adam hyper-steps land on the precisions the same steps on the dense
    objective reach, all to 1e-10."""
    fit, prior = _fit_with_spread_precisions()
    model = _tiny_relaxed()  # seeded: the model and data of _fit_with_spread_precisions again
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    kron = fit_kfac(model, TensorLoader(x, y, 3))
    assert any(e.out_vals is f.out_vals for e, f in zip(fit.decomposition.eigen, fit.decomposition.eigen[1:]))
    for index, name in enumerate(kron.block_names):
        dense = torch.linalg.eigvalsh(kron.dense(name)).clamp_min(0)
        ours = fit.decomposition.block_eigenvalues(index).sort().values
        torch.testing.assert_close(ours, dense, rtol=0, atol=1e-10 * float(dense.max().clamp_min(1e-300)))
    torch.testing.assert_close(neg_log_marglik(fit, prior), _dense_kronecker_objective(kron, fit, prior),
                               rtol=1e-10, atol=0)
    reference = Prior(_tiny_relaxed(), per_tensor=True).double()
    with torch.no_grad():
        reference.log_precision.copy_(prior.log_precision)
    value = optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), steps=20)
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        _dense_kronecker_objective(kron, fit, reference).backward()
        optimizer.step()
    torch.testing.assert_close(prior.log_precision, reference.log_precision, rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(_dense_kronecker_objective(kron, fit, reference).detach()), rel=1e-10)


def test_a_step_to_a_non_finite_objective_is_undone_and_ends_the_round(caplog) -> None:
    fit, prior = _fit_with_spread_precisions()
    start = prior.log_precision.detach().clone()
    optimizer = torch.optim.SGD(prior.parameters(), lr=1e6)  # the first step overflows exp(log delta)
    with caplog.at_level("WARNING"):
        value = optimise_prior(fit, prior, optimizer, steps=5)
    torch.testing.assert_close(prior.log_precision.detach(), start, rtol=0, atol=0)
    assert value == pytest.approx(float(neg_log_marglik(fit, prior).detach()), rel=1e-12)
    assert "non-finite" in caplog.text


def test_objective_of_several_fits_is_their_summed_evidence() -> None:
    (fit_a, prior), (fit_b, _) = _fit_with_spread_precisions(), _fit_with_spread_precisions()
    summed = neg_log_marglik([fit_a, fit_b], prior) * (fit_a.n_data + fit_b.n_data)
    separate = neg_log_marglik(fit_a, prior) * fit_a.n_data + neg_log_marglik(fit_b, prior) * fit_b.n_data
    torch.testing.assert_close(summed, separate, rtol=1e-12, atol=0)


def test_effective_parameters_equal_dense_eigendecomposition() -> None:
    model = _tiny_mlp()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([0])
    prior = Prior(model, per_tensor=True).double()
    with torch.no_grad():
        prior.log_precision.copy_(torch.tensor([-3.0, 0.5, -1.0, 1.5], dtype=torch.float64))
    fit = fit_laplace(model, TensorLoader(x, y, 1), prior)
    ours = effective_parameters(fit, prior)
    blocks = _exact_ggn_blocks(model, x)
    for i, (name, _) in enumerate(model.named_parameters()):
        lam = torch.linalg.eigvalsh(blocks[name]).clamp_min(0)
        delta = prior.tensor_precisions()[i].detach()
        torch.testing.assert_close(ours[i], (lam / (lam + delta)).sum(), rtol=1e-8, atol=1e-10)


def test_a_later_fit_reuses_the_eigenvalues_of_unchanged_wide_factors_only() -> None:
    """Across two fits with a memo (as the Trainer keeps from round to round), the factors of parameters before
    the change are taken from the memo (both layers' input factors, which depend on the data and the first
    layer), the one that changed with the second layer is not (the first layer's output factor, as wide);
    the fit equals one without the memo bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(130, 130), nn.Tanh(), nn.Linear(130, 3)).double()
    x, y = torch.randn(40, 130, dtype=torch.float64), torch.randint(0, 3, (40,))
    prior, memo = Prior(model).double(), EigenvalueMemo()
    fit_laplace(model, TensorLoader(x, y, 20), prior, memo=memo)
    assert memo.hits == 0
    with torch.no_grad():
        model[2].weight.mul_(1.7)
    later = fit_laplace(model, TensorLoader(x, y, 20), prior, memo=memo)
    assert memo.hits == 2
    plain = fit_laplace(model, TensorLoader(x, y, 20), prior)
    torch.testing.assert_close(later.decomposition.eigenvalues(), plain.decomposition.eigenvalues(), rtol=0, atol=0)
    assert float(neg_log_marglik(later, prior).detach()) == float(neg_log_marglik(plain, prior).detach())


def test_hyper_steps_decrease_the_objective_and_keep_it_finite() -> None:
    model = _tiny_relaxed("fc")
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    prior = Prior(model).double()
    fit = fit_laplace(model, TensorLoader(x, y, 4), prior)
    start = float(neg_log_marglik(fit, prior).detach())
    end = optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), steps=20)
    assert math.isfinite(end) and end < start


def test_non_finite_marglik_is_a_clear_error() -> None:
    model = _tiny_mlp()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1])
    prior = Prior(model).double()
    fit = fit_laplace(model, TensorLoader(x, y, 2), prior)
    with torch.no_grad():
        prior.log_precision.fill_(float("nan"))
    with pytest.raises(MarglikError, match="not finite"):
        optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), steps=2)


def test_non_finite_model_output_makes_the_laplace_fit_a_marglik_error() -> None:
    model = _tiny_mlp()
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(MarglikError, match="NaN or inf"):  # so that training skips the round instead of stopping
        fit_laplace(model, TensorLoader(x, y, 2), Prior(model).double())


def test_prior_groups_are_paths() -> None:
    model = build_model("ffc_conv", in_channels=3, n_classes=10, alpha=1, device="meta")
    groups = prior_groups(model)
    assert [g.name for g in groups[:2]] == ["blocks.0.fc", "blocks.0.conv"]
    assert groups[0].kind == "F-FC" and groups[1].kind == "CONV"
    assert len(groups[0].param_names) == 4  # U, b_U, V, b_V share one precision
    assert [g.name for g in groups[-2:]] == ["head.0", "head.2"]
    assert len(groups) == 8 * 2 + 2
    assert len(prior_groups(model, per_tensor=True)) == 8 * 6 + 4  # the reference's 52 precisions


def test_report_relative_values_and_layer_types() -> None:
    """Hand-computed aggregation: normalised = N_eff / P per path, relative = share within the layer."""
    model = build_model("fc_conv", in_channels=1, n_classes=2, alpha=1)
    prior = Prior(model)
    sizes = torch.tensor([p.numel() for p in model.parameters()], dtype=torch.float64)
    n_eff = torch.zeros_like(sizes)
    names = prior.param_names
    n_eff[names.index("blocks.0.paths.fc.linear.weight")] = 0.001 * sizes[names.index("blocks.0.paths.fc.linear.weight")]
    n_eff[names.index("blocks.0.paths.conv.conv.weight")] = 0.5 * sizes[names.index("blocks.0.paths.conv.conv.weight")]
    n_eff[names.index("blocks.6.paths.fc.linear.weight")] = 0.2 * sizes[names.index("blocks.6.paths.fc.linear.weight")]
    rows = {(r.layer, r.path): r for r in path_reports(prior, n_eff, sizes)}
    fc0, conv0 = rows[("blocks.0", "fc")], rows[("blocks.0", "conv")]
    assert fc0.n_params == 1024 * 1024 + 1024 and conv0.n_params == 9 + 1
    norm_fc = 0.001 * 1024 * 1024 / fc0.n_params
    norm_conv = 0.5 * 9 / 10
    assert fc0.relative == pytest.approx(norm_fc / (norm_fc + norm_conv))
    assert conv0.relative == pytest.approx(norm_conv / (norm_fc + norm_conv))
    types = effective_layer_types(list(rows.values()))
    assert types["blocks.0"] == "CONV" and types["blocks.6"] == "FC"


def test_report_with_per_tensor_priors_still_compares_paths() -> None:
    """Per-tensor precisions change the prior's groups, not the report's rows: one row per path, the same
    sums and shares as with per-path groups, and the per-tensor precisions listed in parameter order."""
    model = build_model("ffc_conv", in_channels=1, n_classes=2, alpha=1, device="meta")
    per_path, per_tensor = Prior(model.to_empty(device="cpu")), Prior(model, per_tensor=True)
    with torch.no_grad():
        per_tensor.log_precision.copy_(torch.linspace(-1.0, 1.0, len(per_tensor.groups)))
    sizes = torch.tensor([p.numel() for p in model.parameters()], dtype=torch.float64)
    n_eff = sizes * torch.linspace(0.01, 0.9, len(sizes), dtype=torch.float64)
    expected = path_reports(per_path, n_eff, sizes)
    rows = path_reports(per_tensor, n_eff, sizes)
    assert [(r.layer, r.path) for r in rows] == [(r.layer, r.path) for r in expected]
    for row, ref in zip(rows, expected):
        assert (row.n_params, row.kind) == (ref.n_params, ref.kind)
        assert row.n_eff == pytest.approx(ref.n_eff) and row.relative == pytest.approx(ref.relative)
    ffc0 = rows[0]
    assert (ffc0.layer, ffc0.path) == ("blocks.0", "fc") and ffc0.precision is None
    assert ffc0.precisions == pytest.approx(per_tensor.precisions()[:4].tolist())  # U, b_U, V, b_V
    assert expected[0].precision == pytest.approx(1.0)
    assert "-" in format_report(rows).splitlines()[1]  # the precision range of the F-FC path


def test_output_shares_against_the_paths_called_directly() -> None:
    """The hooks see each path's output as the layer uses it: against direct calls in a stride-1 layer, and
    against a zeroed path (share exactly 0) in the CIFAR network; shares sum to 1 per layer; no hook is left."""
    torch.manual_seed(0)
    layer = RelaxedLayer({"fc": FactoredFC(2, 3, 5, 5), "conv": Conv(2, 3)}, downsample=False)
    model = nn.Sequential(layer, nn.Flatten())
    x = torch.randn(7, 2, 5, 5)
    power = path_output_power(model, x, batch_size=3)
    with torch.no_grad():
        direct = {name: float(path(x).pow(2).mean()) for name, path in layer.paths.items()}
    assert power == {("0", name): pytest.approx(value, rel=1e-5) for name, value in direct.items()}
    assert all(not path._forward_hooks for path in layer.paths.values())

    net = build_model("ffc_conv", in_channels=1, n_classes=2, alpha=1)
    with torch.no_grad():
        for p in net.blocks[3].paths["fc"].parameters():
            p.zero_()
    prior = Prior(net)
    sizes = torch.tensor([p.numel() for p in net.parameters()], dtype=torch.float64)
    rows = with_output_shares(path_reports(prior, 0.5 * sizes, sizes), path_output_power(net, torch.randn(4, 1, 32, 32)))
    shares = {(r.layer, r.path): r.output_share for r in rows}
    assert shares[("blocks.3", "fc")] == 0.0 and shares[("blocks.3", "conv")] == 1.0
    for i in range(8):
        assert shares[(f"blocks.{i}", "fc")] + shares[(f"blocks.{i}", "conv")] == pytest.approx(1.0)
    assert shares[("head.0", None)] is None
    assert format_report(rows).splitlines()[0].split()[-3] == "output"


def test_block_eigenvalues_are_views_of_the_flat_eigenvalues() -> None:
    fit, _ = _fit_with_spread_precisions()
    decomposition = fit.decomposition
    for index, block in enumerate(decomposition.eigen):
        torch.testing.assert_close(decomposition.block_eigenvalues(index), block.eigenvalues(), rtol=0, atol=0)
    assert decomposition.block_eigenvalues(1).data_ptr() != decomposition.block_eigenvalues(0).data_ptr()
    assert decomposition.block_eigenvalues(0).untyped_storage().data_ptr() == \
        decomposition.eigenvalues().untyped_storage().data_ptr()


def test_a_parameter_frozen_after_the_prior_was_built_is_named() -> None:
    model = _tiny_mlp()
    prior = Prior(model)
    frozen = next(name for name, _ in model.named_parameters())
    model.get_parameter(frozen).requires_grad_(False)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.arange(6) % 3
    with pytest.raises(MarglikError, match=rf"with a prior but not trainable now: \['{re.escape(frozen)}'\]"):
        fit_laplace(model, TensorLoader(x, y, 3), prior)


def test_optimise_prior_refuses_a_prior_optimizer_or_step_count_it_cannot_use() -> None:
    fit, prior = _fit_with_spread_precisions()
    other = Prior(_tiny_mlp())
    with pytest.raises(ValueError, match=r"the prior covers 4 parameter tensors but the Laplace fit \d+"):
        optimise_prior(fit, other, torch.optim.Adam(other.parameters()), 2)
    with pytest.raises(ValueError, match=re.escape("the optimizer does not hold the prior's log precisions")):
        optimise_prior(fit, prior, torch.optim.Adam(_tiny_mlp().parameters()), 2)
    with pytest.raises(ValueError, match=re.escape("steps must be an integer >= 0, got -3")):
        optimise_prior(fit, prior, torch.optim.Adam(prior.parameters()), -3)
    before = prior.log_precision.detach().clone()
    optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), 0)
    assert torch.equal(prior.log_precision, before)
