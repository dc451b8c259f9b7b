"""Ray-profiled hyper-steps for bilinear paths (ella.bilinear_ray) against ground truth.

- the KFAC quadratic form against the dense block, for every block layout;
- in linear regression with the factored path last (where KFAC of the output factor is exact and the data fit is
  exactly quadratic along the ray), the ray objective equals the Laplace evidence refitted at the scaled
  parameters, and the hyper-gradient equals its finite differences;
- on the known-symmetry toy, the ray hyper-gradient follows the finite differences of the profiled evidence
  (MAP and KFAC refitted) where the alternation's is zero, and the ray reaches the profile's optimum for F-FC and
  S-FC;
- a training run with ``marglik_method="ray"`` learns precisions and says so in its report; a bad method name
  is a clear error, in the library and on the command line.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ella.bilinear_ray import (
    FACTOR_TENSORS,
    bilinear_rays,
    kron_quadratic_form,
    optimise_precisions,
    ray_neg_log_marglik,
)
from ella.layers import FactoredFC, GroupedLinear, SparseFC
from ella.marglik import fit_laplace, neg_log_marglik
from ella.priors import Prior
from ella.teacher import Problem, evidence_profile, fit_map, fit_map_and_laplace, learn_precisions, relaxed_model, teacher_data
from ella.train import TrainConfig, train
from kfac import fit_kfac
from script_utils import run_here
from test_train import _tiny_config, _write_tiny_cifar

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grouped_mode", ["per_group", "reference"])
def test_kron_quadratic_form_equals_the_dense_block(grouped_mode: str) -> None:
    """Non-square factors, so that swapping the input and output sides would fail."""
    torch.manual_seed(0)
    model = nn.Sequential(FactoredFC(2, 3, 3, 2), nn.Flatten(), nn.Linear(12, 5)).double()
    x, y = torch.randn(7, 2, 3, 3, dtype=torch.float64), torch.arange(7) % 5
    kron = fit_kfac(model, [(x, y)], grouped_mode=grouped_mode)
    decomposition = kron.decompose()
    for (name, param), eigen in zip(model.named_parameters(), decomposition.eigen):
        w = torch.randn_like(param)
        dense = w.reshape(-1) @ kron.dense(name) @ w.reshape(-1)
        assert kron_quadratic_form(eigen, w) == pytest.approx(float(dense), rel=1e-9), name


def _linear_regression(path: type[nn.Module]) -> tuple[nn.Module, Prior, torch.Tensor, torch.Tensor]:
    """A bilinear path alone (the last layer of a Gaussian regression), at its exact MAP for precision 3."""
    torch.manual_seed(1)
    model = nn.Sequential(path(2, 2, 4, 3), nn.Flatten()).double()
    x = torch.randn(40, 2, 4, 4, dtype=torch.float64)
    y = 0.3 * torch.randn(40, 18, dtype=torch.float64) + 0.5 * model(x).detach()
    prior = Prior(model).double()
    with torch.no_grad():
        prior.log_precision.fill_(math.log(3.0))
    fit_map(model, prior, x, y, max_iter=2000)
    return model, prior, x, y


def _at(prior: Prior, log_precision: float) -> Prior:
    moved = copy.deepcopy(prior)
    with torch.no_grad():
        moved.log_precision.fill_(log_precision)
    return moved


@pytest.mark.parametrize("path", [FactoredFC, SparseFC])
@pytest.mark.parametrize("min_scale", [0.0, 0.5])
def test_ray_objective_equals_the_evidence_refitted_along_the_ray(path: type[nn.Module], min_scale: float) -> None:
    """Also at the edge of the trust region, where the objective is the evidence at ``t = min_scale``."""
    model, prior, x, y = _linear_regression(path)
    fit = fit_laplace(model, [(x, y)], prior, likelihood="regression")
    rays = bilinear_rays(model, prior, fit, min_scale)
    assert [r.path for r in rays] == ["0"]
    assert rays[0].tensors == tuple(prior.param_names.index(f"0.{t}") for t in FACTOR_TENSORS)
    start = float(prior.log_precision.detach()[0])
    with torch.no_grad():
        assert float(ray_neg_log_marglik(fit, prior, rays)) == pytest.approx(float(neg_log_marglik(fit, prior)), rel=1e-12)

    def refitted(log_precision: float) -> tuple[float, float, float]:
        """(ray objective, evidence refitted at the ray's scaled parameters, t) at one precision."""
        shifted = _at(prior, log_precision)
        t = float(rays[0].scale(shifted.tensor_precisions().detach().double()))
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for i, p in enumerate(scaled.parameters()):
                if i in rays[0].tensors:
                    p.mul_(math.sqrt(t))
        with torch.no_grad():
            truth = neg_log_marglik(fit_laplace(scaled, [(x, y)], shifted, likelihood="regression"), shifted)
            return float(ray_neg_log_marglik(fit, shifted, rays)), float(truth), t

    scales = []
    for offset in (-0.5, 0.7, 2.0, 6.0):
        predicted, truth, t = refitted(start + offset)
        assert predicted == pytest.approx(truth, rel=1e-7), offset
        scales.append(t)
    assert scales[0] == 1 > scales[1] > scales[2] > 0.5 and scales[3] == min_scale  # below delta0, shrinks, the edge

    h = 1e-4  # the hyper-gradient against finite differences of the refitted evidence
    shifted = _at(prior, start + 0.7)
    ray_neg_log_marglik(fit, shifted, rays).backward()
    difference = (refitted(start + 0.7 + h)[1] - refitted(start + 0.7 - h)[1]) / (2 * h)
    assert float(shifted.log_precision.grad.sum()) == pytest.approx(difference, rel=1e-5)



def _factor_eigenvalues(model: nn.Module, data, likelihood: str, s: float) -> list[torch.Tensor]:
    """The KFAC eigenvalues of path ``0``'s factor tensors, refitted with those tensors scaled by ``s``."""
    scaled = copy.deepcopy(model)
    names = [name for name, _ in scaled.named_parameters()]
    index = [names.index(f"0.{t}") for t in FACTOR_TENSORS]
    with torch.no_grad():
        for i, p in enumerate(scaled.parameters()):
            if i in index:
                p.mul_(s)
    fit = fit_laplace(scaled, data, Prior(scaled).double(), likelihood=likelihood)
    return [fit.decomposition.block_eigenvalues(i) for i in index]


@pytest.mark.parametrize("path", [FactoredFC, SparseFC])
def test_factor_eigenvalues_scale_by_t_exactly_only_where_the_path_feeds_a_gaussian_likelihood(path) -> None:
    """The documented exactness (docs/design.md, "Ray-profiled precision updates"): a bilinear path as the last
    layer of a Gaussian regression, KFAC refitted at the scaled factors, gives ``t = s^2`` times the eigenvalues
    to float64 round-off. With a nonlinearity and a softmax after the path the backpropagated factors change
    too: the refitted eigenvalue sums differ from ``t`` times the old ones by an amount of the order of
    ``|t - 1|`` itself (1-2% at ``s = 0.99``, up to 190% at ``s = 0.5``)."""
    torch.manual_seed(1)
    x = torch.randn(40, 2, 4, 4, dtype=torch.float64)
    regression = nn.Sequential(path(2, 2, 4, 3), nn.Flatten()).double()
    data = [(x, torch.randn(40, 18, dtype=torch.float64))]
    start = _factor_eigenvalues(regression, data, "regression", 1.0)
    for s in (0.5, 1.7):
        for new, old in zip(_factor_eigenvalues(regression, data, "regression", s), start):
            assert float((new - s * s * old).abs().max()) <= 1e-12 * float(old.abs().max())
    classifier = nn.Sequential(path(2, 2, 4, 3), nn.Flatten(), nn.Tanh(), nn.Linear(18, 5)).double()
    data = [(x, torch.arange(40) % 5)]
    start = _factor_eigenvalues(classifier, data, "classification", 1.0)
    for s in (0.99, 0.5, 1.7):
        t = s * s
        errors = [abs(float(new.sum() / (t * old.sum())) - 1)
                  for new, old in zip(_factor_eigenvalues(classifier, data, "classification", s), start)]
        assert max(errors) <= 3 * abs(t - 1), s  # bounded by the move along the ray
        assert max(errors) >= 0.1 * abs(t - 1), s  # and not exact: the ray is a model here


PROBLEM = Problem(channels=2, size=6, n=256, noise=0.1)


@pytest.fixture(scope="module")
def conv_teacher() -> tuple[torch.Tensor, torch.Tensor]:
    return teacher_data(PROBLEM, "conv")


@pytest.fixture(scope="module")
def stalled(conv_teacher) -> tuple[nn.Module, Prior, dict]:
    """The alternation's end on the CONV teacher (float64 precisions): F-FC functionally off, yet at its
    fixed-parameter optimum (docs/design.md, "Known symmetry")."""
    x, y = conv_teacher
    model = relaxed_model(PROBLEM, seed=0)
    prior = Prior(model).double()
    last = learn_precisions(model, prior, x, y, rounds=10)[-1]
    return model, prior, last


def test_ray_hypergradient_follows_the_profiled_evidence_where_the_alternation_stalls(conv_teacher, stalled) -> None:
    """At the stall the fixed-parameter gradient in the F-FC log precision is 0, while the evidence profiled
    with the MAP and KFAC refitted falls; the ray's gradient follows that slope."""
    x, y = conv_teacher
    model, prior = copy.deepcopy(stalled[:2])
    group = prior.group_names.index("0.fc")
    fit = fit_map_and_laplace(model, prior, x, y)
    gradients = {}
    for name, objective in (("alternation", lambda: neg_log_marglik(fit, prior)),
                            ("ray", lambda: ray_neg_log_marglik(fit, prior, bilinear_rays(model, prior, fit)))):
        prior.log_precision.grad = None
        objective().backward()
        gradients[name] = float(prior.log_precision.grad[group])
    stall, h = float(prior.log_precision.detach()[group]), 0.2
    ends = [row["neg_log_marglik"] for row in evidence_profile(model, prior, x, y, "fc", [stall - h, stall + h])]
    slope = (ends[1] - ends[0]) / (2 * h)
    assert slope < -0.1
    assert abs(gradients["alternation"]) < 0.01 * abs(slope)
    assert gradients["ray"] == pytest.approx(slope, rel=0.15)


@pytest.mark.parametrize("path", [FactoredFC, SparseFC])
def test_the_ray_reaches_the_profiled_optimum_where_the_alternation_stalls(conv_teacher, stalled, path) -> None:
    x, y = conv_teacher
    model = relaxed_model(PROBLEM, seed=0, fc=path)
    prior = Prior(model)
    last = learn_precisions(model, prior, x, y, rounds=10, method="ray")[-1]
    reached = math.log(last["precision_fc"])
    profile = [row["neg_log_marglik"] for row in evidence_profile(model, prior, x, y, "fc", [reached, reached + 4, reached + 8])]
    assert profile[0] == pytest.approx(last["neg_log_marglik"], abs=1e-3)  # refitting the MAP changes nothing
    assert profile[0] < min(profile) + 0.01  # at the profile's optimum
    assert last["relative_fc"] < 0.05 and last["output_share_fc"] < 1e-6
    assert last["neg_log_marglik"] < stalled[2]["neg_log_marglik"] - 0.3  # the F-FC alternation's stall: 37.54


def test_both_methods_leave_the_parameters_alone_and_paths_without_output_have_no_ray() -> None:
    model, prior, x, y = _linear_regression(FactoredFC)
    fit = fit_laplace(model, [(x, y)], prior, likelihood="regression")
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("alternation", "ray"):
        optimiser = torch.optim.Adam(prior.parameters(), lr=0.1)
        start = prior.log_precision.detach().clone()
        rays = bilinear_rays(model, prior, fit) if method == "ray" else []
        value = optimise_precisions(method, fit, prior, model, optimiser, steps=3)
        assert not torch.equal(start, prior.log_precision.detach())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        with torch.no_grad():
            assert value == pytest.approx(float(ray_neg_log_marglik(fit, prior, rays)))
    with torch.no_grad():
        model[0].stage_v.weight.zero_()
    assert bilinear_rays(model, prior, fit_laplace(model, [(x, y)], prior, likelihood="regression")) == []
    assert bilinear_rays(nn.Sequential(GroupedLinear(2, 3, 4)).double(), prior, fit) == []


def test_unknown_method_is_a_clear_error() -> None:
    model, prior, x, y = _linear_regression(FactoredFC)
    fit = fit_laplace(model, [(x, y)], prior, likelihood="regression")
    with pytest.raises(ValueError, match="marglik_method must be one of"):
        optimise_precisions("profile", fit, prior, model, torch.optim.Adam(prior.parameters()), 1)
    with pytest.raises(ValueError, match="marglik_method must be one of .*'alternation', 'ray'.*got 'lbfgs'"):
        TrainConfig(marglik_method="lbfgs").check()


def test_a_training_run_learns_precisions_by_the_ray_and_its_report_says_so(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    out = tmp_path / "ray"
    final = train(_tiny_config(data, layer="ffc_conv", epochs=3, marglik_method="ray", hyper_steps=5), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("neg_log_marglik") is not None for row in rows] == [False, True, True]
    assert final["precisions"]["blocks.0.fc"] != 1.0 and final["config"]["marglik_method"] == "ray"
    report = json.loads((out / "effective_parameters.json").read_text())
    assert "scaling ray" in report["caption"] and "scaling ray" in (out / "effective_parameters.txt").read_text()


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("experiments/cifar10.py", ["--layer", "ffc_conv", "--laplace", "--marglik-method", "lbfgs"],
         "--marglik-method: invalid choice: 'lbfgs'"),
        ("experiments/known_symmetry.py", ["--methods", "ray", "lbfgs"], "--methods: invalid choice: 'lbfgs'"),
    ],
)
def test_scripts_reject_an_unknown_method_with_a_message(tmp_path: Path, script: str, flags: list[str],
                                                          message: str, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_here(REPO / script, flags, capsys, monkeypatch, env={"ELLA_DATA": str(tmp_path / "missing")})
    assert code == 2 and message in err and "Traceback" not in err


def test_the_ray_advances_the_step_hooks_of_the_rounds_optimizer() -> None:
    """A training run's progress bar counts the hyper-optimizer's steps; the ray takes its own L-BFGS steps
    and reports each to the hooks registered on that optimizer, without moving it."""
    model, prior, x, y = _linear_regression(FactoredFC)
    fit = fit_laplace(model, [(x, y)], prior, likelihood="regression")
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    optimise_precisions("ray", fit, prior, model, optimizer, steps=4)
    assert len(calls) == 4 and not optimizer.state
