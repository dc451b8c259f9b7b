"""The training flags derived from :class:`~ella.train.TrainConfig`'s fields: types, ranges, choices, defaults in
``--help``, how presets and flags combine, and that every message names the flag the user types."""

from __future__ import annotations

import argparse
import math
import runpy
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest

import ella.cli as cli
from ella.checkpoint import CheckpointError, OutputError
from ella.cli import add_training_arguments, config_from_args, resume_command, run_script
from ella.options import COUNT, Range, flag, is_option, option
from ella.train import Interrupted, TrainConfig

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"cpu": {"epochs": 10, "alpha": 4, "augment": False, "optimizer": "adam"}, "paper": {"epochs": 4000}}


def run_cifar10(flags: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                stream: str = "err") -> tuple[int, str]:
    """Run ``experiments/cifar10.py`` in this process (as its command line would); return its exit status and
    what it printed to ``stream`` ("err" or "out")."""
    monkeypatch.setattr(sys, "argv", ["experiments/cifar10.py", *flags])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "experiments" / "cifar10.py"), run_name="__main__")
    return stop.value.code, getattr(capsys.readouterr(), stream)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, PRESETS)
    return parser


def test_preset_values_then_flags_then_the_experiments_fixed_choices() -> None:
    config = config_from_args(_parser().parse_args([]), PRESETS, dataset="mnist")
    assert (config.epochs, config.alpha, config.augment, config.optimizer) == (10, 4, False, "adam")  # cpu preset
    assert (config.lr, config.laplace, config.per_tensor_prior, config.dataset) == (0.01, False, False, "mnist")
    args = _parser().parse_args(["--preset", "paper", "--epochs", "3", "--laplace", "--lr", "0.5", "--no-augment",
                                 "--combine", "mean", "--per-tensor-prior", "--n-train", "100"])
    config = config_from_args(args, PRESETS, dataset="mnist", lr=0.25)
    assert (config.epochs, config.alpha, config.augment, config.optimizer, config.combine) == (3, None, False, "sgd", "mean")
    assert (config.laplace, config.per_tensor_prior, config.n_train, config.lr) == (True, True, 100, 0.25)


def test_every_option_field_is_a_flag() -> None:
    options = [item for item in fields(TrainConfig) if is_option(item)]
    flags = {string for action in _parser()._actions for string in action.option_strings}
    assert {flag(item) for item in options} <= flags
    assert {"--no-augment", "--laplace", "--lr-min", "--kfac-approx", "--data-dir", "--device"} <= flags
    assert {item.name for item in fields(TrainConfig) if not is_option(item)} == {"layer", "dataset", "task", "momentum"}


def test_a_new_option_is_one_field(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Fields added to the config (here as the GPU work would) become flags with their check and help."""

    @dataclass
    class Extended(TrainConfig):
        eval_batch_size: int = option(500, "batch size of evaluation", COUNT)
        capture: bool = option(False, "capture the training step as a CUDA graph")

    monkeypatch.setattr(cli, "TrainConfig", Extended)
    config = config_from_args(_parser().parse_args(["--eval-batch-size", "64", "--capture"]), PRESETS)
    assert isinstance(config, Extended) and (config.eval_batch_size, config.capture, config.epochs) == (64, True, 10)
    with pytest.raises(ValueError, match="--eval-batch-size must be an integer >= 1, got 0"):
        replace(config, eval_batch_size=0).check()
    with pytest.raises(SystemExit):
        _parser().parse_args(["--eval-batch-size", "0"])
    assert "argument --eval-batch-size: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert "batch size of evaluation (default: 500)" in " ".join(_parser().format_help().split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hyper-steps", "-3"], "argument --hyper-steps: must be an integer >= 0, got -3"),
        (["--burn-in", "-1"], "argument --burn-in: must be an integer >= 0, got -1"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        (["--batch-size", "2.5"], "argument --batch-size: must be an integer >= 1, got '2.5'"),
        (["--prior-init", "nan"], "argument --prior-init: must be a finite number > 0, got nan"),
        (["--prior-init", "inf"], "argument --prior-init: must be a finite number > 0, got inf"),
        (["--lr", "-1"], "argument --lr: must be a finite number >= 0, got -1"),
        (["--lr-min=-0.001"], "argument --lr-min: must be a finite number >= 0, got -0.001"),
        (["--valid-fraction", "1"], "argument --valid-fraction: must be a finite number in (0, 1), got 1"),
        (["--n-valid", "0"], "argument --n-valid: must be an integer >= 1, got 0"),
        (["--seed", "x"], "argument --seed: must be an integer >= 0, got 'x'"),
        (["--curvature", "kfe"], "argument --curvature: invalid choice: 'kfe'"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("item", [item for item in fields(TrainConfig) if isinstance(item.metadata.get("values"), Range)],
                         ids=lambda item: item.name)
def test_config_check_names_the_flag_of_a_value_out_of_range(item) -> None:
    config = replace(TrainConfig(device="cpu"), **{item.name: math.nan})
    with pytest.raises(ValueError, match=f"^{flag(item)} must be "):
        config.check()


def test_lr_min_above_lr_is_refused_naming_both_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ValueError, match=r"--lr-min \(0.5\) must not be above --lr \(0.1\)"):
        TrainConfig(lr=0.1, lr_min=0.5).check()
    code, err = run_cifar10(["--layer", "conv", "--lr-min", "0.01", "--out", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 2 and "error: --lr-min (0.01) must not be above --lr (0.003)" in err  # the cpu preset's --lr
    assert not (tmp_path / "run").exists()


def test_help_shows_each_preset_and_the_defaults_the_run_uses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag
    code, text = run_cifar10(["--help"], monkeypatch, capsys, stream="out")
    assert code == 0
    assert "cpu (the default): --epochs 10 --alpha 4 --n-train 20000 --n-valid 1000 --optimizer adam --lr 0.003" in text
    assert "; paper: --epochs 4000 --burn-in 10 --marglik-every 5" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert lines["--alpha"].endswith("(2 for ffc_conv_gconv) (default: 4, from --preset cpu)")
    assert lines["--epochs"].endswith("training epochs (default: 10, from --preset cpu)")
    assert lines["--hyper-lr"].endswith("(default: 0.1)")


@pytest.mark.parametrize("error", [OutputError("cannot write x: No space left on device"),
                                   CheckpointError("cannot resume: y cannot be read")])
def test_run_script_turns_output_and_checkpoint_errors_into_a_message(
    error: Exception, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def main() -> None:
        raise error

    monkeypatch.setattr(cli.sys, "argv", ["script.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n(run with -v for the traceback)\n"


def test_ctrl_c_prints_one_line_with_the_resume_command(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def main() -> None:
        raise Interrupted("interrupted in epoch 3 of 10; the checkpoint in runs/x holds epoch 2")

    monkeypatch.setattr(cli.sys, "argv", ["experiments/cifar10.py", "--layer", "conv", "--out", "my runs/x"])
    with pytest.raises(SystemExit) as stop:
        run_script(main)
    assert stop.value.code == 130
    assert capsys.readouterr().err == (
        "interrupted in epoch 3 of 10; the checkpoint in runs/x holds epoch 2; continue with: "
        "python experiments/cifar10.py --layer conv --out 'my runs/x' --resume\n"
    )
    assert resume_command(["a.py", "--resume", "--epochs", "3"]) == "python a.py --resume --epochs 3"

    def other() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_script(other)
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"
