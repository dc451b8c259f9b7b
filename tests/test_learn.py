"""ella as a library: the one-call training entry point against the experiments' Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ella.train import train
from test_train import _tiny_config, _write_tiny_cifar

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
    return _tiny_config(data, layer="ffc_conv", epochs=2, burn_in=1, marglik_every=1)


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
