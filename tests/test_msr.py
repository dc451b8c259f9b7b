"""Tests of the MSR baseline (ella.msr): layers vs stock convs, inner/outer loops vs autograd, task symmetries."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from ella.msr import (
    Conv1dFlat,
    LocallyConnected1d,
    MetaConfig,
    MetaLearner,
    MSRConv,
    MSRFC,
    MultiTaskConfig,
    MultiTaskLearner,
    RotationProblem,
    TranslationProblem,
    conv_symmetry_matrix,
    group_filters,
    mean_confidence_interval,
)
from ella.msr.output import default_out
from script_utils import run_here

DT = torch.float64


def _translation(rank: int, **kw) -> TranslationProblem:
    args = dict(n_train_tasks=8, n_test_tasks=4, examples_per_train_task=4, seed=3, dtype=DT)
    args.update(kw)
    return TranslationProblem(rank=rank, **args)


# ---------------------------------------------------------------- layers
def test_msrfc_with_shift_permutation_U_is_conv1d():
    torch.manual_seed(0)
    layer = MSRFC(70, 68, latent_size=3).to(DT)
    with torch.no_grad():
        layer.U.copy_(conv_symmetry_matrix(70, 3, dtype=DT))
    x = torch.randn(5, 70, dtype=DT)
    expected = F.conv1d(x.unsqueeze(1), layer.v.detach().view(1, 1, 3)).squeeze(1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_msrfc_kron_matches_explicit_kronecker_and_linear_at_identity():
    torch.manual_seed(1)
    layer = MSRFC(6, 4, structure="kron").to(DT)
    x = torch.randn(3, 6, dtype=DT)
    torch.testing.assert_close(layer(x), x @ layer.v.detach().T)  # identity factors = plain linear
    with torch.no_grad():
        layer.U_out.copy_(torch.randn(4, 4, dtype=DT))
        layer.U_in.copy_(torch.randn(6, 6, dtype=DT))
    vec_w = torch.kron(layer.U_out, layer.U_in) @ layer.v.reshape(-1)  # row-wise vec
    torch.testing.assert_close(layer.weight(), vec_w.reshape(4, 6))


def test_msrconv_kron_identity_is_plain_conv_and_matches_kron_formula():
    torch.manual_seed(2)
    layer = MSRConv(2, 5, 3, structure="kron").to(DT)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.v.detach().reshape(5, 2, 3, 3)), rtol=0, atol=1e-12)
    with torch.no_grad():
        for p in (layer.U_out, layer.U_in, layer.U_space):
            p.copy_(torch.randn_like(p))
    u = torch.kron(torch.kron(layer.U_out, layer.U_in), layer.U_space)
    torch.testing.assert_close(layer.weight().reshape(-1), u @ layer.v.reshape(-1))


def test_msrconv_dense_with_rotation_permutations_is_c4_lifting_conv():
    """Prop. 1 for C4: U = stacked rot90 permutations of the 3x3 filter gives the group-lifting conv."""
    torch.manual_seed(3)
    eye = torch.eye(9, dtype=DT).reshape(9, 1, 3, 3)  # column t = basis filter e_t
    perms = group_filters(eye.squeeze(1), "C4").reshape(9, 4, 9)  # (t, g, taps)
    u = perms.permute(1, 2, 0).reshape(36, 9)
    layer = MSRConv(1, 4, 3, structure="dense", latent_size=9).to(DT)
    with torch.no_grad():
        layer.U.copy_(u)
    x = torch.randn(2, 1, 7, 7, dtype=DT)
    expected = F.conv2d(x, group_filters(layer.v.detach().reshape(1, 3, 3), "C4"))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_locally_connected_with_shared_filter_is_conv():
    torch.manual_seed(4)
    lc, conv = LocallyConnected1d(70).to(DT), Conv1dFlat().to(DT)
    with torch.no_grad():
        lc.weight.copy_(conv.conv.weight.view(1, 3).expand(68, 3))
    x = torch.randn(4, 70, dtype=DT)
    torch.testing.assert_close(lc(x), conv(x))


# ---------------------------------------------------------------- inner / outer loop
def _manual_query_loss(u, v, lr, xs, ys, xq, yq, steps):
    """Reference second-order MSR objective with plain autograd, one task at a time."""
    losses = []
    for t in range(xs.shape[0]):
        vt = v
        for _ in range(steps):
            w = (u @ vt).reshape(68, 70)
            g = torch.autograd.grad(F.mse_loss(xs[t] @ w.T, ys[t]), vt, create_graph=True)[0]
            vt = vt - lr * g
        losses.append(F.mse_loss(xq[t] @ (u @ vt).reshape(68, 70).T, yq[t]))
    return torch.stack(losses).mean()


def test_inner_loop_changes_only_v_and_matches_autograd_sgd():
    torch.manual_seed(5)
    model = MSRFC(70, 68, latent_size=4).to(DT)
    learner = MetaLearner(model, MetaConfig(inner_lr_init=0.3))
    batch = _translation(1).sample_batch(np.random.default_rng(0), 2)
    params, lrs = learner._detached()
    xs, ys = batch.x_support[0], batch.y_support[0]
    adapted = learner.adapt(params, lrs, xs, ys, steps=1)
    assert torch.equal(adapted["U"], model.U.detach())
    assert not torch.allclose(adapted["v"], model.v.detach())
    v = model.v.detach().clone().requires_grad_()
    g = torch.autograd.grad(F.mse_loss(xs @ (model.U.detach() @ v).reshape(68, 70).T, ys), v)[0]
    torch.testing.assert_close(adapted["v"], v.detach() - 0.3 * g)
    u_before = model.U.detach().clone()
    learner.evaluate([batch])  # meta-test adapts a copy of v only
    assert torch.equal(model.U, u_before)


def test_msr_joint_inner_loop_updates_U():
    torch.manual_seed(6)
    model = MSRFC(70, 68, latent_size=4).to(DT)
    learner = MetaLearner(model, MetaConfig(), inner_names=("U", "v"))
    batch = _translation(1).sample_batch(np.random.default_rng(0), 1)
    params, lrs = learner._detached()
    adapted = learner.adapt(params, lrs, batch.x_support[0], batch.y_support[0], steps=1)
    assert set(lrs) == {"U", "v"}
    assert not torch.equal(adapted["U"], model.U.detach())


def test_outer_gradient_is_second_order_and_one_step_decreases_query_loss():
    torch.manual_seed(7)
    model = MSRFC(70, 68, latent_size=5, u_init_std=0.1).to(DT)
    cfg = MetaConfig(inner_steps_train=2, inner_lr_init=0.5, outer_lr=1e-3)
    learner = MetaLearner(model, cfg)
    batch = _translation(1).sample_batch(np.random.default_rng(1), 4)
    u = model.U.detach().clone().requires_grad_()
    v = model.v.detach().clone().requires_grad_()
    lr = torch.tensor(0.5, dtype=DT, requires_grad=True)
    ref = _manual_query_loss(u, v, lr, batch.x_support, batch.y_support, batch.x_query, batch.y_query, 2)
    g_u, g_v, g_lr = torch.autograd.grad(ref, (u, v, lr))
    loss_before = learner.outer_step(batch)
    torch.testing.assert_close(torch.tensor(loss_before, dtype=DT), ref.detach())
    torch.testing.assert_close(model.U.grad, g_u)
    torch.testing.assert_close(model.v.grad, g_v)
    torch.testing.assert_close(learner.inner_lrs["v"].grad, g_lr)
    params, lrs = learner._detached()
    loss_after = float(learner.task_losses(params, lrs, batch, cfg.inner_steps_train).mean())
    assert loss_after < loss_before - 1e-3 * abs(loss_before)


def test_mtsr_trains_shared_U_and_freezes_it_at_test():
    torch.manual_seed(8)
    prob = _translation(1)
    model = MSRFC(70, 68, latent_size=3).to(DT)
    learner = MultiTaskLearner(model, MultiTaskConfig(steps_train=5, steps_test=5), seed=0)
    u0 = model.U.detach().clone()
    learner.fit(prob)
    assert not torch.equal(model.U.detach(), u0)
    u1 = model.U.detach().clone()
    losses = learner.evaluate(prob.test_batches(2))
    assert losses.shape == (4,) and np.all(np.isfinite(losses))
    assert torch.equal(model.U.detach(), u1)


# ---------------------------------------------------------------- tasks
def test_tasks_are_deterministic_and_seeded():
    a, b, c = _translation(2), _translation(2), _translation(2, seed=4)
    for split in ("train", "test"):
        wa, xa, ya = a.task(split, 1)
        wb, xb, yb = b.task(split, 1)
        assert torch.equal(wa, wb) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.task("train", 1)[1], c.task("train", 1)[1])
    assert not torch.equal(a.task("train", 1)[1], a.task("test", 1)[1])
    with pytest.raises(IndexError):
        a.task("train", 8)


@pytest.mark.parametrize("shift", [1, 5])
def test_rank1_tasks_are_translation_equivariant(shift):
    prob = _translation(1)
    w, x, y = prob.task("train", 0)
    assert torch.equal(w, w[:1].expand_as(w))
    y_roll = prob.apply(w, torch.roll(x, shift, dims=-1))  # circular shift: valid where no wrap-around
    torch.testing.assert_close(y_roll[:, shift:], y[:, :-shift], rtol=0, atol=1e-12)
    x_lin = F.pad(x, (shift, 0))[:, :70]  # linear shift with zero fill
    torch.testing.assert_close(prob.apply(w, x_lin)[:, shift:], y[:, :-shift], rtol=0, atol=1e-12)


def test_rank2_tasks_are_not_translation_equivariant():
    prob = _translation(2)
    w, x, y = prob.task("train", 0)
    y_roll = prob.apply(w, torch.roll(x, 1, dims=-1))
    err = (y_roll[:, 1:] - y[:, :-1]).pow(2).mean()
    assert err > 0.05 * y.pow(2).mean()
    assert torch.allclose(prob.connectivity.sum(-1), torch.ones(68, dtype=DT))


def test_c4_tasks_are_rotation_equivariant():
    prob = RotationProblem("C4", n_fields=2, image_size=9, n_train_tasks=2, n_test_tasks=2,
                           examples_per_train_task=3, dtype=DT)
    w, x, y = prob.task("train", 0)
    y_rot = prob.apply(w, torch.rot90(x, 1, dims=(-2, -1)))
    # rotating the input rotates every output map and shifts the rotation index of each field by one
    expected = torch.rot90(y, 1, dims=(-2, -1)).unflatten(1, (2, 4)).roll(1, dims=2).flatten(1, 2)
    torch.testing.assert_close(y_rot, expected, rtol=0, atol=1e-12)
    assert (y_rot - torch.rot90(y, 1, dims=(-2, -1))).abs().max() > 0.1  # not invariant per channel


def _channel_permutation(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """perm with a[:, c] == b[:, perm[c]] for every channel c (raises if none matches)."""
    perm = []
    for c in range(a.shape[1]):
        hits = [d for d in range(b.shape[1]) if torch.allclose(a[:, c], b[:, d], rtol=0, atol=1e-12)]
        assert len(hits) == 1, f"channel {c} matches {hits}"
        perm.append(hits[0])
    return perm


@pytest.mark.parametrize("transform", ["rot", "flip"])
def test_d4_tasks_are_rotation_and_flip_equivariant(transform):
    prob = RotationProblem("D4", n_fields=2, image_size=9, n_train_tasks=2, n_test_tasks=2,
                           examples_per_train_task=3, dtype=DT)
    w, x, y = prob.task("train", 1)
    g = (lambda t: torch.rot90(t, 1, dims=(-2, -1))) if transform == "rot" else (lambda t: torch.flip(t, dims=(-1,)))
    perm = _channel_permutation(prob.apply(w, g(x)), g(y))
    assert sorted(perm) == list(range(16)) and perm != list(range(16))
    assert all(p // 8 == c // 8 for c, p in enumerate(perm))  # permutation stays within each field


# ---------------------------------------------------------------- statistics
def test_confidence_interval_matches_scipy_t():
    values = np.random.default_rng(0).gamma(2.0, size=37)
    mean, half = mean_confidence_interval(values, 0.95)
    lo, hi = scipy.stats.t.interval(0.95, df=36, loc=values.mean(), scale=scipy.stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx((hi - lo) / 2, rel=1e-10)
    with pytest.raises(ValueError):
        mean_confidence_interval([1.0])


def test_msr_synthetic_writes_config_and_results_through_the_cli_plumbing(tmp_path):
    """config.json holds the flags and settings; results.json / results.csv are ``ella.cli.write_table``'s, with
    the per-method dict of inner learning rates as JSON in its CSV cell."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "msr_synthetic.py"
    command = [sys.executable, str(script), "--tables", "translation", "--ks", "1", "--regimes", "small",
               "--methods", "maml_fc", "maml_conv", "--outer-steps", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["outer_steps"] == 2 and config["out"] == str(tmp_path / "run") and "torch" in config
    assert config["translation_meta"]["outer_steps"] == 2
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    with (tmp_path / "run" / "results.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == [row["method"] for row in cells] == ["MAML-FC", "MAML-Conv"]
    assert json.loads(cells[0]["inner_lrs"]) == rows[0]["inner_lrs"] and set(rows[0]["inner_lrs"]) == {"weight"}
    assert json.loads(cells[1]["inner_lrs"]) == rows[1]["inner_lrs"] and float(cells[1]["mean"]) == rows[1]["mean"]


# ---------------------------------------------------------------- the script's output folder, resume and flags
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "msr_synthetic.py"
TINY = ["--tables", "translation", "--ks", "1", "--regimes", "small", "--methods", "maml_fc", "maml_conv",
        "--outer-steps", "1", "--no-progress"]


def _evaluations(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[int]:
    """Count MetaLearner.evaluate's calls (one per meta-learned row) in the returned list; the ``interrupt_at``-th
    call raises KeyboardInterrupt instead, as Ctrl-C during that row would."""
    calls: list[int] = []
    evaluate = MetaLearner.evaluate

    def counted(self, batches):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return evaluate(self, batches)

    monkeypatch.setattr(MetaLearner, "evaluate", counted)
    return calls


def _results(out: Path) -> list[dict]:
    """results.json of ``out`` without the timings, which differ between runs."""
    rows = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def test_msr_synthetic_saves_each_row_and_resume_computes_only_the_missing_ones(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second row keeps the first (results.json, results.csv); a rerun without --resume and a resume
    with other flags are refused, naming --resume and the flag; the resume computes the second row only and ends
    with the rows of an uninterrupted run."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _evaluations(patch, interrupt_at=2)
        code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out)], capsys, monkeypatch)
    assert code == 130 and "1 of 2 rows finished and saved" in err and "--resume" in err
    assert [row["method"] for row in _results(out)] == ["MAML-FC"]
    assert "MAML-FC" in (out / "results.csv").read_text() and not list(out.glob("*.tmp"))
    saved = (out / "results.json").read_text()
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and "already holds files" in err and "--resume" in err
    code, _, err = run_here(SCRIPT, [*TINY, "--outer-steps", "2", "--out", str(out), "--resume"], capsys, monkeypatch)
    assert code == 2 and "--outer-steps 1 there, 2 now" in err
    assert (out / "results.json").read_text() == saved
    calls = _evaluations(monkeypatch)
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(out), "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert len(calls) == 1  # MAML-FC was not computed again
    code, _, err = run_here(SCRIPT, [*TINY, "--out", str(tmp_path / "whole")], capsys, monkeypatch)
    assert code == 0, err
    assert _results(out) == _results(tmp_path / "whole") and len(_results(out)) == 2


def test_default_output_folder_follows_the_flags_that_change_results():
    """The same flags give the same default folder (so that the same command resumes there); flags that change
    results give another, flags that only say how the run is carried out do not."""
    settings = dict(preset="cpu", seed=0, ks=[1], out=None, resume=False, threads=1, device="cpu", no_progress=False)
    folder = default_out("runs/x", "cpu", settings)
    assert folder.parent == Path("runs/x") and folder.name.startswith("cpu-")
    assert default_out("runs/x", "cpu", {**settings, "resume": True, "threads": 2, "device": "cuda"}) == folder
    assert default_out("runs/x", "cpu", {**settings, "seed": 1}) != folder
    assert default_out("runs/x", "cpu", {**settings, "ks": [1, 2]}) != folder


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1", "--methods", "maml_fc", "--ks", "1", "--regimes", "small", "--outer-steps", "1"],
         "argument --seed: must be an integer >= 0, got -1"),
        (["--image-size", "2", "--methods", "msr_conv", "--groups", "C4", "--outer-steps", "1"],
         "argument --image-size: must be an integer >= 3, got 2"),
        (["--tables", "rotation", "--methods", "maml_fc"], "--tables rotation runs none of --methods maml_fc"),
        (["--tables", "translation", "--methods", "maml_fc", "msr_conv", "--ks", "1", "--regimes", "small",
          "--outer-steps", "1"], "--methods msr_conv belong to no table run (--tables translation)"),
        (["--methods", "msr_fc", "--fc-structure", "kron", "--latent-size", "5", "--ks", "1", "--regimes", "small",
          "--outer-steps", "1"], "--latent-size has no effect here"),
        (["--methods", "msr_fc", "--fc-structure", "kron", "--u-init-std", "0.1", "--ks", "1", "--regimes", "small",
          "--outer-steps", "1"], "--u-init-std has no effect here"),
        (["--tables", "translation", "--methods", "maml_fc", "--groups", "C4", "--ks", "1", "--regimes", "small",
          "--outer-steps", "1"], "--groups has no effect here: it applies to --tables rotation"),
        (["--methods", "mtsr_fc", "--outer-steps", "3", "--ks", "1", "--regimes", "small"],
         "--outer-steps has no effect here: mtsr_fc is no meta-learner"),
    ],
)
def test_msr_synthetic_refuses_bad_or_ineffective_flags_before_writing(tmp_path, capsys, monkeypatch, flags, message):
    code, _, err = run_here(SCRIPT, [*flags, "--no-progress", "--out", str(tmp_path / "run")], capsys, monkeypatch)
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line: the error
    assert code == 2 and last.startswith("msr_synthetic.py: error: ") and message in last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["msr_synthetic.py", "compare_msr.py"])
def test_help_shows_every_flags_default(script, capsys, monkeypatch):
    code, text, _ = run_here(SCRIPT.parent / script, ["--help"], capsys, monkeypatch)
    options = text[text.index("options:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one entry per flag: its names, then its help
    assert len(entries) > 10 and code == 0
    missing = [entry.split()[0] for entry in entries if "default" not in entry and not entry.startswith("-h")]
    assert missing == []
