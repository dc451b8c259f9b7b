"""Known symmetry: a teacher relaxed layer with one path on, a student that learns its path precisions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ella.layers import rotate_p4
from ella.priors import Prior
from ella.teacher import (
    PathTypes,
    Problem,
    deep_teacher,
    evidence_profile,
    learn_precisions,
    path_squared_norm,
    relaxed_model,
    structure_paths,
    teacher_data,
)

PROBLEM = Problem(channels=2, size=6, n=256, noise=0.1)


def _learn(active: str, rounds: int = 6):
    x, y = teacher_data(PROBLEM, active)
    model = relaxed_model(PROBLEM, seed=0)
    prior = Prior(model)
    return model, prior, x, y, learn_precisions(model, prior, x, y, rounds=rounds)


def test_teacher_data_shapes_and_bad_path() -> None:
    x, y = teacher_data(PROBLEM, "conv")
    assert x.shape == (256, 2, 6, 6) and y.shape == (256, 72)
    with pytest.raises(ValueError, match="unknown teacher path 'gconv'"):
        teacher_data(PROBLEM, "gconv")


def test_a_dense_teacher_switches_the_conv_path_off() -> None:
    _, _, _, _, history = _learn("fc")
    last = history[-1]
    assert last["precision_conv"] > 1e4 * last["precision_fc"]
    assert last["output_share_conv"] < 1e-6
    assert last["relative_fc"] > last["relative_conv"]  # the layer's effective type is F-FC


def test_a_conv_teacher_stalls_the_alternation_although_the_evidence_prefers_the_fc_path_off() -> None:
    """The alternation ends where its fixed-parameter optimum holds (MacKay: delta ||theta||^2 = N_eff), with the
    F-FC path functionally off but a large relative N_eff; refitting the MAP at larger F-FC precisions keeps
    improving the Laplace evidence, down to a relative N_eff near 0 (docs/design.md, "Known symmetry")."""
    model, prior, x, y, history = _learn("conv")
    last = history[-1]
    for path in ("fc", "conv"):
        assert last[f"precision_{path}"] * path_squared_norm(model, path) == pytest.approx(last[f"n_eff_{path}"],
                                                                                          rel=1e-3)
    assert last["output_share_fc"] < 1e-3
    assert last["relative_fc"] > 0.3
    stall = math.log(last["precision_fc"])
    profile = evidence_profile(model, prior, x, y, "fc", [stall, stall + 2, stall + 8])
    values = [row["neg_log_marglik"] for row in profile]
    assert values[0] == pytest.approx(last["neg_log_marglik"], rel=1e-5)  # the same MAP, refitted
    assert values[2] < values[1] < values[0] - 0.1
    assert profile[2]["relative_fc"] < 0.01
    assert torch.isfinite(torch.tensor(values)).all()


def test_the_experiment_writes_rounds_profile_config_and_figure(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "known"
    command = [sys.executable, str(repo / "experiments" / "known_symmetry.py"), "--teachers", "conv", "--rounds", "2",
               "--n", "64", "--profile", "0", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    for method in ("alternation", "ray"):
        rounds = json.loads((out / "conv" / method / "rounds.json").read_text())
        profile = json.loads((out / "conv" / method / "profile.json").read_text())
        assert [row["round"] for row in rounds] == [0, 1] and len(profile) == 2
        assert profile[1]["log_precision_fc"] == pytest.approx(profile[0]["log_precision_fc"] + 3)
        assert (out / "conv" / method / "rounds.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [(row["teacher"], row["method"]) for row in summary] == [("conv", "alternation"), ("conv", "ray")]
    assert "teacher conv  alternation" in result.stdout and "teacher conv  ray" in result.stdout
    assert (out / "conv" / "figures" / "profile.png").is_file()
    assert json.loads((out / "config.json").read_text())["rounds"] == 2


def test_deep_teacher_layers_have_the_chosen_preactivation_scale_and_one_path() -> None:
    problem = Problem(channels=2, size=4, n=128, noise=0.1, teacher_scale=1.5)
    teacher, x, y = deep_teacher(problem, "CFC", seed=3)
    assert [tuple(layer.paths) for layer in teacher[:3]] == [("conv",), ("fc",), ("conv",)]
    h = x
    with torch.no_grad():
        for layer in teacher[:3]:
            pre = sum(path(h) for path in layer.paths.values())
            assert float(pre.std()) == pytest.approx(1.5, rel=1e-9)
            h = layer(h)
        assert float((y - teacher(x)).std()) == pytest.approx(1.0, rel=0.05)  # unit noise after the 1 / noise
    with pytest.raises(ValueError, match="unknown teacher structure 'CXC'"):
        structure_paths("CXC")


def test_a_group_teachers_gconv_layers_are_rotation_equivariant_and_its_others_are_not() -> None:
    problem = Problem(channels=2, size=4, n=16, noise=0.1)
    group = PathTypes(group=True)
    equivariant, x, y = deep_teacher(problem, "GGG", seed=1, types=group)
    assert x.shape == (16, 8, 4, 4) and y.shape == (16, 128)  # four rotations of two channels
    assert [tuple(layer.paths) for layer in equivariant[:3]] == [("gconv",)] * 3
    assert not torch.equal(x[:, :2], x[:, 2:4])  # independent rotations, not a lifted image
    layers = equivariant[:3]
    with torch.no_grad():
        assert torch.allclose(layers(rotate_p4(x)), rotate_p4(layers(x)), atol=1e-12)
        for structure in ("CGG", "GFG"):  # a CONV or dense layer on p4 maps is not rotation equivariant
            layers = deep_teacher(problem, structure, seed=1, types=group)[0][:3]
            assert not torch.allclose(layers(rotate_p4(x)), rotate_p4(layers(x)), atol=1e-3)
    with pytest.raises(ValueError, match="GCONV layers need a group model"):
        deep_teacher(problem, "CGF", seed=1)


def test_the_layerwise_experiment_recovers_a_ccf_teacher_at_tiny_size(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "layerwise"
    command = [sys.executable, str(repo / "experiments" / "layerwise_symmetry.py"), "--structures", "CCF",
               "--seeds", "0", "--final-map-iter", "100", "--out", str(out)]  # one cell, shorter final refits
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "recovered 3/3 layers"
    layers = json.loads((out / "layers.json").read_text())
    assert [(row["layer"], row["student"]) for row in layers] == [(1, "CONV"), (2, "CONV"), (3, "F-FC")]
    assert all(row["unused_output_share"] <= 1e-3 for row in layers)
    evidence = json.loads((out / "evidence.json").read_text())[0]
    assert evidence["relaxed"] < min(evidence["all_conv"], evidence["all_fc"]) - 10  # neither fixed alternative fits
    assert (out / "figures" / "recovery.png").is_file() and (out / "cells" / "CCF_0.json").is_file()


def test_the_layerwise_experiment_refuses_a_gconv_teacher_for_a_student_without_gconv(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(repo / "experiments" / "layerwise_symmetry.py"), "--structures", "CGF",
               "--out", str(tmp_path / "refused")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2
    assert "CGF has a GCONV layer, which needs --student ffc_conv_gconv" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "refused").exists()


def test_the_layerwise_experiment_with_a_group_student_reports_three_paths_per_layer(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "group"
    command = [sys.executable, str(repo / "experiments" / "layerwise_symmetry.py"), "--student", "ffc_conv_gconv",
               "--structures", "GF", "--seeds", "0", "--channels", "1", "--n", "32", "--rounds", "1",
               "--map-iter", "5", "--final-map-iter", "5", "--out", str(out)]  # the wiring only, a few seconds
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    layers = json.loads((out / "layers.json").read_text())
    assert [(row["layer"], row["teacher"]) for row in layers] == [(1, "GCONV"), (2, "F-FC")]
    assert all(row["largest"] in "CFG" and 0 <= row["unused_output_share"] <= 1 for row in layers)
    evidence = json.loads((out / "evidence.json").read_text())[0]
    assert {"relaxed", "true", "all_fc", "all_conv", "all_gconv"} <= set(evidence)
    assert "| GF | " in result.stdout and result.stdout.strip().splitlines()[-1].startswith("recovered ")
