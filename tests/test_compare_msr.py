"""Tests of the marglik-vs-MSR comparison (ella.msr.compare): model, closed-form MAP, summed objective, distances."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ella.marglik import neg_log_marglik
from ella.msr import TranslationProblem, conv_symmetry_matrix
from ella.msr.compare import (
    FCConvModel,
    MarglikConfig,
    conv_coverage_gap,
    conv_residual,
    generator_symmetry_matrix,
    learn_precisions,
    map_fit,
    query_mse,
    task_laplace,
)
from ella.priors import Prior
from script_utils import run_here
from test_msr import _evaluations, _results

DT = torch.float64


def _problem(rank: int, n: int = 10, examples: int = 3, tasks: int = 4, seed: int = 0) -> TranslationProblem:
    return TranslationProblem(rank=rank, in_features=n, n_train_tasks=tasks, n_test_tasks=tasks,
                              examples_per_train_task=examples, seed=seed, dtype=DT)


def _model_and_prior(n: int, log_delta: tuple[float, float] = (0.7, -0.4)) -> tuple[FCConvModel, Prior]:
    model = FCConvModel(n, 3).to(DT)
    prior = Prior(model).to(DT)
    with torch.no_grad():
        prior.log_precision.copy_(torch.tensor(log_delta, dtype=DT))
    return model, prior


def test_model_is_linear_plus_valid_conv_and_prior_has_two_paths():
    torch.manual_seed(0)
    model, prior = _model_and_prior(10)
    x = torch.randn(5, 10, dtype=DT)
    expected = x @ model.fc_weight.T + F.conv1d(x[:, None], model.conv_weight.view(1, 1, 3))[:, 0]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert [(g.path, g.kind) for g in prior.groups] == [("fc", "FC"), ("conv", "CONV")]


def test_closed_form_map_is_a_stationary_point_of_the_map_objective():
    """Autograd gradient of the MAP objective on the actual module vanishes at map_fit's solution."""
    prob = _problem(2)
    x, y = prob.tasks("train", [0, 1, 2])
    model, prior = _model_and_prior(10)
    noise_var = 0.05
    fc, conv = map_fit(x, y, prior.precisions(), noise_var)
    delta = prior.precisions().detach()
    for t in range(3):
        model.set_parameters(fc[t], conv[t])
        loss = 0.5 * (model(x[t]) - y[t]).pow(2).sum() / noise_var + prior.penalty(model)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert max(float(g.abs().max()) for g in grads) < 1e-9
        assert float(fc[t].abs().max()) > 1e-3  # non-trivial solution (both paths in use)
    # query_mse = F.mse_loss of the module with the MAP parameters of the support set
    xs, ys, xq, yq = x[:, :1], y[:, :1], x[:, 1:], y[:, 1:]
    fc, conv = map_fit(xs, ys, delta, noise_var)
    model.set_parameters(fc[1], conv[1])
    torch.testing.assert_close(query_mse(xs, ys, xq, yq, delta, noise_var)[1], F.mse_loss(model(xq[1]), yq[1]).detach())


def _dense_task_objective(x, y, fc, conv, delta, noise_var):
    """Independent -log p(D|delta) of the FC+CONV layer: dense per-path GGN blocks from explicit Jacobians."""
    m, n = fc.shape
    jac_fc = torch.einsum("op,ni->nopi", torch.eye(m, dtype=DT), x).reshape(-1, m * n)  # d f_{n,o} / d W[p, i]
    jac_conv = x.unfold(-1, 3, 1).reshape(-1, 3)  # d f_{n,o} / d w_j = x[n, o + j]
    pred = x @ fc.T + F.conv1d(x[:, None], conv.view(1, 1, 3))[:, 0]
    value = 0.5 * (pred - y).pow(2).sum() / noise_var
    for jac, theta, d in ((jac_fc, fc, delta[0]), (jac_conv, conv, delta[1])):
        ggn = jac.T @ jac / noise_var
        p = ggn.shape[0]
        value = value + 0.5 * d * theta.pow(2).sum() + 0.5 * (torch.logdet(ggn + d * torch.eye(p, dtype=DT)) - p * d.log())
    return value


def test_summed_objective_equals_sum_of_single_task_objectives():
    prob = _problem(2, examples=3, tasks=4)
    x, y = prob.tasks("train", list(range(4)))
    model, prior = _model_and_prior(10)
    noise_var = 0.1
    fc, conv = map_fit(x, y, prior.precisions(), noise_var)
    fits, dense = [], []
    for t in range(4):
        model.set_parameters(fc[t], conv[t])
        fits.append(task_laplace(model, prior, x[t], y[t], noise_var))
        dense.append(_dense_task_objective(x[t], y[t], fc[t], conv[t], prior.precisions().detach(), noise_var))
    separate = torch.stack([neg_log_marglik(f, prior) * f.n_data for f in fits])
    torch.testing.assert_close(separate.detach(), torch.stack(dense))  # KFAC exact per block here
    # the summed objective of all fits and its gradient in the log precisions
    total = neg_log_marglik(fits, prior) * 12
    g_stacked = torch.autograd.grad(total, prior.log_precision)[0]
    g_separate = torch.autograd.grad(separate.sum(), prior.log_precision)[0]
    torch.testing.assert_close(total, separate.sum())
    torch.testing.assert_close(g_stacked, g_separate)


def test_marglik_switches_the_fc_path_off_on_rank1_tasks():
    prob = TranslationProblem(rank=1, n_train_tasks=8, n_test_tasks=8, examples_per_train_task=10, seed=1)
    x, y = prob.tasks("train", list(range(8)))
    torch.manual_seed(0)
    model = FCConvModel(70, 3)
    _, before = learn_precisions(model, x, y, MarglikConfig(rounds=0))
    prior, after = learn_precisions(model, x, y, MarglikConfig(rounds=6, hyper_steps=20, hyper_lr=0.3))
    delta = prior.precisions().detach()
    assert before.relative("fc") > 0.05  # at delta = 1 the FC path carries real weight (max 10/70)
    assert delta[0] / delta[1] > 1e4
    assert after.relative("fc") < 0.005
    assert after.objective[-1] < after.objective[0]


def test_conv_distances():
    u0 = conv_symmetry_matrix(70, 3, dtype=DT)
    assert conv_residual(u0, u0) == pytest.approx(0.0, abs=1e-12)
    assert conv_coverage_gap(u0, u0) == pytest.approx(0.0, abs=1e-12)
    mixed = u0 @ torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert conv_residual(mixed, u0) == pytest.approx(0.0, abs=1e-12)
    assert conv_coverage_gap(mixed, u0) == pytest.approx(0.0, abs=1e-12)
    random = torch.randn(68 * 70, 70, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert conv_residual(random, u0) > 0.99
    assert conv_coverage_gap(random, u0) > 0.95
    # hand-computed: one conv column (68 ones) + the unit vector of W[0, 69] (outside the band)
    far = torch.zeros(68 * 70, 1, dtype=DT)
    far[69] = 1.0
    u = torch.cat([u0[:, :1], far], 1)
    assert conv_residual(u, u0) == pytest.approx(math.sqrt(1 / 69), rel=1e-12)
    assert conv_coverage_gap(u, u0) == pytest.approx(2 / 3, rel=1e-12)


def test_generator_symmetry_matrix_spans_the_task_weights():
    prob = TranslationProblem(rank=2, n_train_tasks=3, n_test_tasks=1, examples_per_train_task=2, dtype=DT)
    u_true = generator_symmetry_matrix(prob.connectivity, 70)
    assert u_true.shape == (68 * 70, 6)
    for t in range(3):
        weights = prob.task("train", t)[0]  # (68, 3) per-position filters
        dense = torch.zeros(68, 70, dtype=DT)
        for j in range(3):
            dense[torch.arange(68), torch.arange(68) + j] = weights[:, j]
        coef = torch.linalg.lstsq(u_true, dense.reshape(-1, 1)).solution
        torch.testing.assert_close(u_true @ coef, dense.reshape(-1, 1))
    ones = generator_symmetry_matrix(torch.ones(68, 1, dtype=DT), 70)
    torch.testing.assert_close(ones, conv_symmetry_matrix(70, 3, dtype=DT))


# ---------------------------------------------------------------- the script: output folder, resume and flags
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compare_msr.py"
TINY = ["--ks", "1", "2", "--methods", "msr_fc", "--outer-steps", "1", "--no-progress"]






def test_compare_msr_saves_each_row_and_resume_computes_only_the_missing_ones(tmp_path, capsys, monkeypatch):
    """Ctrl-C in MSR-FC at k = 2 keeps the two rows of k = 1; a rerun without --resume and a resume with other
    flags are refused, naming --resume and the flag; the resume computes the rows of k = 2 only and ends with the
    rows of an uninterrupted run."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _evaluations(patch, interrupt_at=2)
        code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out)], capsys, monkeypatch)
    assert code == 130 and "2 of 4 rows finished and saved" in err and "--resume" in err
    assert [(row["k"], row["method"]) for row in _results(out)] == [(1, "msr_fc"), (1, "generator")]
    assert "generator" in (out / "results.csv").read_text()
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and "already holds files" in err and "--resume" in err
    code, _, err = run_here(SCRIPT, [*TINY, "--ks", "1", "--out", str(out), "--resume"], capsys, monkeypatch)
    assert code == 2 and "--ks 1 2 there, 1 now" in err
    calls = _evaluations(monkeypatch)
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out), "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert len(calls) == 1  # MSR-FC at k = 1 was not computed again
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(tmp_path / "whole")], capsys, monkeypatch)
    assert code == 0, err
    assert _results(out) == _results(tmp_path / "whole") and len(_results(out)) == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-2", "--methods", "msr_fc", "--outer-steps", "1"],
         "argument --seed: must be an integer >= 0, got -2"),
        (["--methods", "msr_fc", "--outer-steps", "1", "--rounds", "3"],
         "--rounds has no effect here: it applies to marglik only"),
        (["--methods", "msr_fc", "--outer-steps", "1", "--noise-var", "0.1"],
         "--noise-var has no effect here: it applies to marglik and map only"),
        (["--methods", "map", "--hyper-lr", "0.2"], "--hyper-lr has no effect here: it applies to marglik only"),
    ],
)
def test_compare_msr_refuses_bad_or_ineffective_flags_before_writing(tmp_path, capsys, monkeypatch, flags, message):
    out = tmp_path / "run"
    code, _, err = run_here(SCRIPT, [*flags, "--ks", "1", "--no-progress", "--out", str(out)], capsys, monkeypatch)
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line: the error
    assert code == 2 and last.startswith("compare_msr.py: error: ") and message in last
    assert not out.exists()
