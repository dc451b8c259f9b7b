"""Known symmetry: a teacher relaxed layer with one path on, a student that learns its path precisions."""

from __future__ import annotations

import math

import pytest
import torch

from ella.priors import Prior
from ella.teacher import Problem, evidence_profile, learn_precisions, path_squared_norm, relaxed_model, teacher_data

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
