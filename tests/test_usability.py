"""What a new user meets first: the main command on the official data layout, the flags' help, the inputs'
checks and the learning-curve figures."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from ella import data as D
from ella.config import TrainConfig
from test_data import trust_fixture_checksums, write_cifar_torchvision

REPO = Path(__file__).resolve().parents[1]


def run_experiment(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python experiments/<name>.py ARGV`` in this process (so that fixtures may patch torchvision)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", *argv])
    module.main()


def official_layout_cifar(root: Path, n_train: int = 300) -> tuple[np.ndarray, ...]:
    """A stand-in for CIFAR-10 in torchvision's on-disk layout (pickled batches) with a full 10,000-image test
    batch of 32x32x3 uint8 images; returns the arrays written."""
    rng = np.random.default_rng(3)
    arrays = (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), (np.arange(n_train) % 10).astype(np.uint8),
              rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8), (np.arange(10_000) % 10).astype(np.uint8))
    write_cifar_torchvision(root, arrays)
    return arrays


def test_the_main_command_runs_on_torchvisions_layout_with_the_official_test_set(tmp_path, monkeypatch, capsys):
    """README's main command (default preset) on a folder holding only torchvision's cifar-10-batches-py/: it
    tests on the 10,000 exact images and says so (the preset once demanded the project's own JPEG copy)."""
    data = tmp_path / "data"
    official_layout_cifar(data)
    trust_fixture_checksums(monkeypatch, data)
    out = tmp_path / "run"
    run_experiment("cifar10", ["--layer", "ffc_conv", "--laplace", "--data-dir", str(data), "--device", "cpu",
                               "--n-train", "100", "--n-valid", "50", "--epochs", "1", "--alpha", "1",
                               "--burn-in", "1", "--marglik-every", "1", "--hyper-steps", "2", "--out", str(out)],
                   monkeypatch)
    final = json.loads((out / "final.json").read_text())
    assert final["config"]["cifar_test"] == "auto"
    assert final["test_set"] == "exact (10,000 official test images)"
    assert '"test_set": "exact (10,000 official test images)"' in capsys.readouterr().out
    assert (final["test"]["acc"] * 100) % 1 == pytest.approx(0, abs=1e-6)  # a count out of 10,000


@pytest.mark.parametrize(("files", "n_test", "source", "warning"), [
    (("npz10k",), 10_000, "exact (10,000 official test images)", None),
    (("npz1k", "jpeg"), 20, "jpeg10k (20 lossy JPEG copies, non-official order)", "lossy JPEG copies"),
    (("npz1k",), 30, "exact (30 official test images)", "standard error"),
])
def test_auto_takes_the_official_test_set_where_it_exists_and_says_what_it_took(
        tmp_path, caplog, files, n_test, source, warning):
    rng = np.random.default_rng(0)
    n_exact = 10_000 if "npz10k" in files else 30
    x_test = rng.integers(0, 256, (n_exact, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=x_test, y_test=np.arange(n_exact) % 10)
    if "jpeg" in files:
        np.savez(tmp_path / "cifar10_test10k_jpeg.npz", x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                 y_test=np.arange(20) % 10)
    with caplog.at_level("WARNING"):
        arrays, got = D.read_cifar10_with_source(tmp_path)
    assert (len(arrays[2]), got) == (n_test, source)
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text and "cifar-10-batches-py" in caplog.text
    exact, _ = D.read_cifar10_with_source(tmp_path, cifar_test="exact")  # asked for: the exact ones there are
    np.testing.assert_array_equal(exact[2], x_test)


def help_text(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """The ``--help`` of ``experiments/<name>.py ARGV``, with its line breaks undone.

    A wide terminal keeps argparse from breaking lines after a hyphen, which would leave a space inside a path.
    """
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit) as done:
        run_experiment(name, [*argv, "--help"], monkeypatch)
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def usage_error(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """The message with which ``experiments/<name>.py ARGV`` refuses its flags (exit status 2)."""
    with pytest.raises(SystemExit) as done:
        run_experiment(name, argv, monkeypatch)
    assert done.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_the_out_folder_in_help_and_readme_is_the_one_the_main_command_writes(monkeypatch, capsys):
    from ella.cli import config_from_args, default_out_dir, default_out_pattern

    spec = importlib.util.spec_from_file_location("cifar10_script", REPO / "experiments" / "cifar10.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = type("Args", (), {"preset": "cpu"})()
    written = str(default_out_dir("cifar10", config_from_args(args, script.PRESETS, layer="ffc_conv", laplace=True,
                                                              dataset="cifar10"), "cpu"))
    pattern = default_out_pattern("cifar10", "cifar10")
    seedless, seed_part = pattern.split("[")
    assert seedless.replace("<layer>", "ffc_conv").replace("<map|laplace>", "laplace").replace("<preset>", "cpu") == written
    assert seed_part.startswith("-s<seed>")
    assert f"output folder (default: {pattern})" in help_text("cifar10", ["--layer", "conv"], monkeypatch, capsys)
    assert f"(default `{written}`)" in " ".join((REPO / "README.md").read_text().split())
    assert "output folder (default: runs/quadrant_mnist/<preset>)" in help_text("quadrant_mnist", [], monkeypatch, capsys)
    assert "output folder (default: runs/multigroup/<preset>)" in help_text("multigroup", [], monkeypatch, capsys)
    tables = help_text("paper_tables", ["cifar10"], monkeypatch, capsys)
    assert "output folder (default: runs/tables/cifar10-<preset>)" in tables


def test_paper_tables_takes_the_preset_that_fits_the_machine_and_asks_for_an_experiment(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tables = help_text("paper_tables", ["cifar10"], monkeypatch, capsys)
    assert "cpu (the default): --epochs 10" in tables and "(default: 10, from --preset cpu)" in tables
    bare = help_text("paper_tables", [], monkeypatch, capsys)
    assert "--epochs" not in bare and "4000" not in bare and "paper_tables.py EXPERIMENT --help" in bare
    message = usage_error("paper_tables", ["--preset", "cpu"], monkeypatch, capsys)
    assert "name the experiment to run (one of cifar10, quadrant_mnist, multigroup)" in message
    assert "invalid choice" not in message


@pytest.mark.parametrize(("name", "argv", "message"), [
    ("cifar10", ["--layer", "conv", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    ("cifar10", ["--layer", "ffc_conv", "--marglik-method", "ray"], "a MAP run has none: add --laplace"),
    ("multigroup", ["--marglik-method", "ray", "--preset", "cpu"], "a MAP run has none: add --laplace"),
    ("quadrant_mnist", ["--runs", "fc:map", "ffc_cnv:laplace"], "--runs ffc_cnv:laplace: unknown layer 'ffc_cnv'"),
    ("quadrant_mnist", ["--runs", "conv:map", "--marglik-method", "ray"], "a MAP run has none: add --laplace"),
    ("cifar10", ["--layer", "conv", "--hyper-steps", "3"], "--hyper-steps is an option of the marginal-likelihood "
                                                          "rounds that --laplace adds; a MAP run has none"),
    ("cifar10", ["--layer", "conv", "--burn-in", "0"], "--burn-in is an option of the marginal-likelihood rounds"),
    ("cifar10", ["--layer", "conv", "--curvature", "mc"], "--curvature acts on the Laplace fit, which a MAP run "
                                                         "makes only for --report: add --laplace or --report"),
    ("cifar10", ["--layer", "conv", "--laplace", "--hyper-lr", "0.5"], "--hyper-lr is the Adam step size of "
                                                                      "--marglik-method alternation"),
    ("cifar10", ["--layer", "ffc_conv", "--laplace", "--marglik-method", "alternation", "--ray-min-scale", "0"],
     "the alternation has none: leave out one of them"),
    ("cifar10", ["--layer", "ffc_conv", "--ray-min-scale", "0"], "--ray-min-scale is an option of the marginal-"),
    ("multigroup", ["--laplace", "--marglik-method", "ray", "--ray-min-scale", "1"],
     "argument --ray-min-scale: must be a finite number in [0, 1), got 1"),
    ("quadrant_mnist", ["--runs", "conv:map", "--laplace"],
     "--laplace is not taken here: each --runs entry chooses MAP or Laplace"),
    ("paper_tables", ["cifar10", "--only", "conv-map", "--laplace"], "--laplace is not taken here: each member"),
    ("paper_tables", ["cifar10", "--only", "conv-map", "--seed", "5"], "--seed is not taken here: --seeds names"),
    ("paper_tables", ["cifar10", "--only", "conv-map", "--hyper-steps", "5"], "a MAP run has none: add --laplace"),
    ("paper_tables", ["cifar10", "--seeds", "-3"], "argument --seeds: must be an integer >= 0, got -3"),
    ("cifar10", ["--layer", "conv", "--n-valid", "20", "--valid-fraction", "0.2"],
     "--n-valid overrides --valid-fraction: give one of them"),
])
def test_flags_that_cannot_work_are_refused_before_anything_runs(name, argv, message, monkeypatch, capsys):
    import ella.cli
    import ella.train

    monkeypatch.setattr(ella.cli, "run_many", lambda *a, **k: pytest.fail("trained before refusing a flag"))
    monkeypatch.setattr(ella.train, "train", lambda *a, **k: pytest.fail("trained before refusing a flag"))
    assert message in usage_error(name, argv, monkeypatch, capsys)


def test_multigroup_trains_cifar_4x_under_the_paper_preset_unless_epochs_are_given(monkeypatch) -> None:
    import argparse

    spec = importlib.util.spec_from_file_location("multigroup_script", REPO / "experiments" / "multigroup.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paper, cpu = (argparse.Namespace(preset=preset, epochs=None) for preset in ("paper", "cpu"))
    assert [script.run_options(args)["cifar_epochs"] for args in (paper, cpu)] == [4, 1]
    assert script.run_options(argparse.Namespace(preset="paper", epochs=1))["cifar_epochs"] == 1
    assert script.paper_accuracy({"dataset": "mnist", "laplace": False}) is None
    assert script.paper_accuracy({"dataset": "mnist", "laplace": True}) == 99.21


def test_numpy_numbers_are_options_and_the_run_records_them_as_plain_values(tmp_path: Path) -> None:
    """A sweep's ``np.int64`` / ``np.float32`` / ``np.bool_`` values are taken (they were refused as "must be an
    integer >= 1, got np.int64(8)") and recorded as plain Python values."""
    import torch
    from torch import nn

    from ella.layers import relaxed_layer
    from ella.learn import learn

    torch.manual_seed(0)
    model = nn.Sequential(relaxed_layer(3, 2, 4, "ffc_conv"), nn.Flatten(), nn.Linear(32, 3))
    data = torch.randn(16, 3, 4, 4), torch.arange(16) % 3
    learn(model, data, epochs=np.int64(1), batch_size=np.int64(8), lr=np.float32(0.01), laplace=np.bool_(False),
          device="cpu", out_dir=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["epochs"], config["batch_size"], config["laplace"]) == (1, 8, False)
    assert config["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got np.float64\(8.0\)$"):
        learn(model, data, epochs=1, batch_size=np.float64(8))


SWITCHES = [item.name for item in fields(TrainConfig) if isinstance(item.default, bool)]


@pytest.mark.parametrize("name", SWITCHES)
def test_a_switch_that_is_not_a_bool_is_refused(name: str) -> None:
    """``laplace="False"`` once ran the Laplace rounds (a non-empty string is true); every switch takes a bool only
    (numpy's made plain)."""
    for argument_names in (True, False):
        with pytest.raises(ValueError, match=f"^{name} must be True or False, got 'False'$"):
            TrainConfig(**{name: "False"}).check(argument_names)
    config = TrainConfig(**{name: np.bool_(False)})
    config.check()
    assert getattr(config, name) is False


def test_learn_refuses_a_switch_that_is_not_a_bool_before_it_trains() -> None:
    import torch
    from torch import nn

    from ella.layers import relaxed_layer
    from ella.learn import learn

    model = nn.Sequential(relaxed_layer(3, 2, 4, "ffc_conv"), nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(ValueError, match=r"^laplace must be True or False, got 'False'$"):
        learn(model, (torch.randn(4, 3, 4, 4), torch.arange(4) % 3), epochs=1, laplace="False")
    assert {"laplace", "report", "per_tensor_prior", "capture", "augment", "download"} <= set(SWITCHES)  # all tested


def test_a_data_folder_that_is_a_file_is_called_so(tmp_path, monkeypatch):
    (tmp_path / "cifar10.npz").write_bytes(b"")
    monkeypatch.setenv("ELLA_DATA", str(tmp_path / "cifar10.npz"))
    with pytest.raises(D.DatasetNotFoundError, match="cifar10.npz, which is a file, not a folder"):
        D.read_cifar10()


def test_ctrl_c_while_a_script_loads_is_one_line():
    import signal
    import subprocess

    code = "from ella.interrupt import quiet_interrupts; quiet_interrupts(); raise KeyboardInterrupt"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stderr == "interrupted\n" and done.returncode == -signal.SIGINT
    for script in sorted((REPO / "experiments").glob("*.py")):
        imports = [ast.unparse(node) for node in ast.parse(script.read_text()).body
                   if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert imports[1] == "from ella.interrupt import quiet_interrupts", script.name  # before every other import


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_every_run_draws_its_learning_curves_and_the_shares_of_every_round(tmp_path):
    """A learned run's figure folder gets learning_curves.png and relative_per_round.png (one point per round
    recorded in metrics.jsonl); a MAP run the learning curves alone."""
    import torch
    from torch import nn

    from ella.curves import plot_share_rounds, read_history
    from ella.layers import relaxed_layer
    from ella.learn import learn

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(32, 3, 8, 8, generator=generator), torch.arange(32) % 3
    for laplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(relaxed_layer(3, 4, 8, "ffc_conv", downsample=True), nn.ReLU(),
                              relaxed_layer(4, 4, 4, "ffc_conv"), nn.Flatten(), nn.Linear(64, 3))
        out = tmp_path / ("learned" if laplace else "map")
        learn(model, data, valid=data, epochs=3, burn_in=1, marglik_every=1, hyper_steps=2, laplace=laplace,
              device="cpu", out_dir=out)
        assert _is_png(out / "figures" / "learning_curves.png")
        history = read_history(out / "metrics.jsonl")
        assert sum(1 for row in history if row.get("relative_n_eff")) == (3 if laplace else 0)
        assert _is_png(out / "figures" / "relative_per_round.png") == laplace
    assert plot_share_rounds(read_history(tmp_path / "map" / "metrics.jsonl"), tmp_path / "none.png") is None


def test_the_figures_take_paths_given_as_text(tmp_path: Path) -> None:
    """A str path works as a Path does (the figures once called ``.parent`` on it, or divided it)."""
    from ella.curves import CURVES_FILE, ROUNDS_FILE, plot_block_shares, plot_learning_curves, plot_run, read_history

    rows = [{"epoch": epoch, "train_loss": 1.0 / epoch, "valid_acc": 50.0, "valid_nll": 1.0, "neg_log_marglik": 2.0,
             "relative_n_eff": {"0.conv": 0.4, "0.fc": 0.6}} for epoch in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    history = read_history(str(tmp_path / "metrics.jsonl"))
    figures = tmp_path / "figures"
    assert plot_run(history, str(figures)) == [figures / CURVES_FILE, figures / ROUNDS_FILE]
    assert _is_png(figures / CURVES_FILE) and _is_png(figures / ROUNDS_FILE)
    assert _is_png(plot_learning_curves(history, str(tmp_path / "curves.png")))
    report = [{"layer": "0", "path": "conv", "kind": "CONV", "relative": 1.0, "output_share": 1.0}]
    assert _is_png(plot_block_shares({"run": report}, str(tmp_path / "blocks.png")))


def test_paper_tables_draws_its_tables_block_shares(tmp_path, monkeypatch, capsys):
    from test_train import _write_tiny_cifar

    data = _write_tiny_cifar(tmp_path / "data")
    root = tmp_path / "tables"
    run_experiment("paper_tables", ["cifar10", "--only", "conv-map", "--report", "--data-dir", str(data),
                                    "--device", "cpu", "--n-train", "30", "--n-valid", "10", "--alpha", "1",
                                    "--epochs", "1", "--out", str(root)], monkeypatch)
    assert f"per-block shares in {root / 'figures' / 'block_shares.png'}" in capsys.readouterr().out
    assert _is_png(root / "figures" / "block_shares.png")
    assert _is_png(root / "conv-map-s711" / "figures" / "learning_curves.png")
