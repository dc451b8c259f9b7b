"""The training flags derived from :class:`~ella.train.TrainConfig`'s fields: types, ranges, choices, defaults in
``--help``, how presets and flags combine, and that every message names the flag the user types."""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest

import ella.cli as cli
from ella.checkpoint import CheckpointError, OutputError
from ella.cli import (
    add_training_arguments, check_method_flags, config_from_args, default_out_dir, resume_command, run_many, run_script,
)
from ella.options import COUNT, Range, flag, is_option, option
from ella.train import Interrupted, TrainConfig
from test_train import _tiny_config, _write_tiny_cifar

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


def test_an_explicit_flag_is_never_overridden_silently(capsys: pytest.CaptureFixture) -> None:
    presets = {"cpu": {**PRESETS["cpu"], "n_valid": 1000}}
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, presets)
    config = config_from_args(parser.parse_args(["--valid-fraction", "0.5"]), presets)
    assert (config.n_valid, config.valid_fraction) == (None, 0.5)
    assert config_from_args(parser.parse_args([]), presets).n_valid == 1000
    for both in (["--valid-fraction", "0.5", "--n-valid", "20"],
                 ["--checkpoint-minutes", "1", "--checkpoint-every", "2"]):
        args = parser.parse_args(both)
        with pytest.raises(SystemExit):
            check_method_flags(parser, args, config_from_args(args, presets))
        assert f"{both[2]} overrides {both[0]}: give one of them" in capsys.readouterr().err


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
        run_script(main, verbose_flag=True)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n(run with -v for the traceback)\n"
    with pytest.raises(SystemExit):
        run_script(main)  # a script without -v: no hint to use it
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("world", ["1", "2"])
def test_sigterm_interrupts_the_run_but_not_its_last_message(
    world: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch scheduler's SIGTERM, or torchrun's to the other processes: during the run it is a Ctrl-C (the run
    says where it stopped); once the process reports why it ends, a second one is ignored so that the message is
    whole."""
    import signal

    seen = []

    def main() -> None:
        seen.append(signal.getsignal(signal.SIGTERM))
        raise ValueError("the data changed")

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(cli.sys, "argv", ["script.py"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            run_script(main)
        assert seen == [signal.default_int_handler] and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 2 and "error: the data changed" in capsys.readouterr().err


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


def test_resume_command_keeps_the_torchrun_launcher_and_its_processes() -> None:
    argv = ["experiments/cifar10.py", "--layer", "conv"]
    assert resume_command(argv, {}) == "python experiments/cifar10.py --layer conv --resume"
    two = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1"}
    assert resume_command(argv, two) == (
        "torchrun --standalone --nproc_per_node=2 experiments/cifar10.py --layer conv --resume")
    nodes = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert resume_command(argv, nodes).startswith("torchrun --nnodes=2 --nproc_per_node=4 experiments/cifar10.py ")


def test_only_rank_0_says_where_an_interrupted_run_stopped(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def main() -> None:
        raise Interrupted("interrupted in epoch 3 of 10; the checkpoint in runs/x holds epoch 2")

    monkeypatch.setattr(cli.sys, "argv", ["experiments/cifar10.py"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "interrupted in epoch 3 of 10; the checkpoint in runs/x holds epoch 2; "
                                        "continue with: torchrun --standalone --nproc_per_node=2 "
                                        "experiments/cifar10.py --resume\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            run_script(main)
        assert stop.value.code == 130 and capsys.readouterr().err == said


def test_default_output_folder_names_a_seed_other_than_the_default() -> None:
    """Issue 30, first row: two seeds on the default --out must not share one folder."""
    config = TrainConfig(layer="conv", device="cpu")
    assert default_out_dir("cifar10", config, "cpu") == Path("runs/cifar10/cifar10-conv-map-cpu")
    assert default_out_dir("cifar10", replace(config, seed=5, laplace=True), "cpu") == Path(
        "runs/cifar10/cifar10-conv-laplace-cpu-s5")


def test_run_set_resume_refuses_a_finished_run_of_another_configuration(tmp_path: Path) -> None:
    """Issue 30, first table: ``paper_tables.py ... --epochs 2`` then ``--epochs 1 --resume``: the finished run
    is not reused, and the message names the differing fields with their flags; the same flags reuse it."""
    config = _tiny_config(_write_tiny_cifar(tmp_path / "data"), epochs=2, laplace=False)
    first = run_many({"conv-map-s3": config}, tmp_path / "t", resume=False)
    out = tmp_path / "t" / "conv-map-s3"
    with pytest.raises(ValueError, match=rf"^--resume \(resume=True in Python\): the finished run in {out} has "
                                         r"another configuration: epochs \(--epochs\): 2 saved, 1 now; lr \(--lr\): 0.01 saved, 0.1 now; run these"):
        run_many({"conv-map-s3": replace(config, epochs=1, lr=0.1)}, tmp_path / "t", resume=True)
    again = run_many({"conv-map-s3": replace(config, device="cpu", kfac_batch_size=7)}, tmp_path / "t", resume=True)
    assert again == first  # how a run is computed (device, KFAC batch) is not its configuration


class _SilentServer:
    """A server on 127.0.0.1 that accepts connections and never answers (closed when the test ends)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        self.socket.close()
        for connection in self.held:
            connection.close()


def test_download_from_a_server_that_never_answers_times_out_with_a_message(tmp_path: Path) -> None:
    """Issue 30, first table: ``--download`` behind a connection that accepts and never answers. With a 2 s
    limit the command ends within seconds, saying whom it waited for and that nothing came."""
    server = _SilentServer()
    url = f"http://127.0.0.1:{server.port}/cifar-10-python.tar.gz"
    code = ("import runpy, sys, torchvision.datasets as d, ella.data.readers as r; "
            f"d.CIFAR10.url = {url!r}; r.DOWNLOAD_TIMEOUT = 2.0; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    command = [sys.executable, "-c", code, str(REPO / "experiments" / "cifar10.py"), "--layer", "conv", "--download",
               "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "run")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        server.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    waiting = f"downloading cifar10 from {url} into {tmp_path / 'data'} (waiting at most 2 s for each answer)"
    assert waiting in done.stderr
    assert (f"download of cifar10 into {tmp_path / 'data'} failed: no answer from {url} within 2 s (a firewall or "
            "proxy that lets the connection open but never answers?)") in done.stderr
