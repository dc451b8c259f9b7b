"""Training runs end to end on tiny data in the real on-disk format: outputs, resume, and interruption."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from ella import distributed
from ella.marglik import effective_parameters
from ella.report import path_reports
from ella.train import Learner, TrainConfig, Trainer, train
from kfac import fit_kfac
from script_utils import run_here

REPO = Path(__file__).resolve().parents[1]


def _write_tiny_cifar(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(
        root / "cifar10.npz",
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=(np.arange(n_train) % 10).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=(np.arange(n_test) % 10).astype(np.uint8),
    )
    return root


def _tiny_config(data_dir: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        layer="conv", dataset="cifar10", alpha=1, epochs=4, batch_size=16, laplace=True, burn_in=2,
        marglik_every=1, hyper_steps=3, kfac_batch_size=25, n_train=40, n_valid=10, seed=3,
        data_dir=str(data_dir), device="cpu", checkpoint_every=1,  # the tests interrupt and resume at set epochs
    )
    return replace(config, **changes)


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


class _Interrupt(Exception):
    pass


def _raise_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, error: type[BaseException],
                    cls: type[Learner] = Trainer) -> Callable:
    """Make ``cls.train_epoch`` raise ``error`` as epoch ``epoch`` starts; returns the original method."""
    original = cls.train_epoch

    def raising(self: Learner) -> float:
        if self.epoch == epoch - 1:
            raise error
        return original(self)

    monkeypatch.setattr(cls, "train_epoch", raising)
    return original


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data)
    reference = train(config, tmp_path / "reference")

    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    monkeypatch.setattr(Trainer, "train_epoch", original)

    resumed = train(config, tmp_path / "run", resume=True)
    assert resumed["test"] == reference["test"] and resumed["precisions"] == reference["precisions"]
    ours = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert _without_timing(ours) == _without_timing(theirs)
    assert [row["epoch"] for row in ours] == [1, 2, 3, 4]
    assert "neg_log_marglik" in ours[1] and "neg_log_marglik" not in ours[0]  # burn-in of 2 epochs
    assert ours[1]["relative_n_eff"] == {f"blocks.{i}.conv": 1.0 for i in range(8)}  # one path per layer


def test_checkpoints_every_few_epochs_resume_from_the_last_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --checkpoint-every 2, an interruption in epoch 4 resumes from epoch 2: epoch 3 (in the metrics, not
    in a checkpoint) is computed again, and the run ends as the uninterrupted one."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, checkpoint_every=2)
    reference = train(config, tmp_path / "reference")
    original = _raise_in_epoch(monkeypatch, 4, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = train(config, tmp_path / "run", resume=True)
    assert resumed["test"] == reference["test"] and resumed["precisions"] == reference["precisions"]
    ours = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in ours] == [1, 2, 3, 4]


def test_resumed_run_keeps_the_eigenvalues_of_unchanged_factors(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint holds the eigenvalue memo: after a resume, the first round takes the eigenvalues of F-FC's
    first input factors (the unaugmented images, equal in every round) from it as the uninterrupted run does, and
    the run ends as that one."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, layer="ffc_conv", epochs=3)
    reference = Trainer(config, tmp_path / "reference")
    reference_final = reference.run()
    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, tmp_path / "run")
    monkeypatch.setattr(Trainer, "train_epoch", original)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["eigen_memo"]
    assert "block blocks.0.paths.fc.stage_u.weight (input-side factor)" in saved
    resumed = Trainer(config, tmp_path / "run", resume=True)
    final = resumed.run()
    # the round after epoch 3 (the final report takes its fit): block 0's input factors, unchanged since epoch 2
    assert resumed.eigen_memo.hits == reference.eigen_memo.hits == 1
    assert final["test"] == reference_final["test"] and final["precisions"] == reference_final["precisions"]


@pytest.mark.parametrize(("marglik_every", "kept"), [(1, True), (2, False)])
def test_the_final_report_takes_the_fit_of_a_round_after_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marglik_every: int, kept: bool
) -> None:
    """Three epochs. Rounds after epochs 2 and 3: the report takes the last round's fit, equal to a fresh fit of
    the final parameters. A round after epoch 2 alone: the report fits the final parameters itself."""
    data = _write_tiny_cifar(tmp_path / "data")
    calls = []
    original = Trainer.laplace_fit
    monkeypatch.setattr(Trainer, "laplace_fit", lambda self: calls.append(self.epoch) or original(self))
    trainer = Trainer(_tiny_config(data, epochs=3, layer="ffc_conv", marglik_every=marglik_every), tmp_path / "run")
    trainer.run()
    assert calls == ([1, 2] if kept else [1, 3])  # Trainer.epoch counts the epochs finished before the round
    assert (trainer._last_epoch_fit is not None) == kept
    fresh = original(trainer)
    if kept:
        assert torch.equal(trainer._last_epoch_fit.decomposition.eigenvalues(), fresh.decomposition.eigenvalues())
    report = json.loads((tmp_path / "run" / "effective_parameters.json").read_text())
    rows = path_reports(trainer.prior, effective_parameters(fresh, trainer.prior), fresh.n_params)
    assert [r["n_eff"] for r in report["paths"]] == [r.n_eff for r in rows]


def test_run_writes_metrics_report_and_figure(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    out = tmp_path / "run"
    final = train(_tiny_config(data, epochs=2), out)
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "final.json",
                 "effective_parameters.txt", "effective_parameters.json", "figures/relative_effective_parameters.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "effective_parameters.json").read_text())
    assert len([r for r in report["paths"] if r["path"] is not None]) == 8
    assert [r["output_share"] for r in report["paths"]] == [1.0] * 8 + [None, None]  # one path per layer; heads
    assert set(final["effective_layer_types"].values()) == {"CONV"}
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "valid_nll", "valid_acc", "test_nll", "test_acc", "neg_log_marglik"} <= set(header)


def test_existing_run_needs_resume_and_the_same_config(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=1, laplace=False)
    train(config, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path / "run")
    with pytest.raises(ValueError, match="different configuration"):
        train(replace(config, lr=0.5), tmp_path / "run", resume=True)
    # a run saved before an option existed resumes when the option has its default, and not otherwise
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["kfac_approx"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="kfac_approx"):
        train(replace(config, kfac_approx="reduce"), tmp_path / "run", resume=True)
    train(config, tmp_path / "run", resume=True)


def test_output_folders_may_be_given_as_strings(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=1, laplace=False)
    train(config, str(tmp_path / "run"), figure_dir=str(tmp_path / "figures"))
    assert (tmp_path / "run" / "final.json").is_file() and (tmp_path / "figures" / "learning_curves.png").is_file()
    train(config, str(tmp_path / "run"), resume=True)  # a finished run resumes to its saved result


def test_resume_without_a_checkpoint_says_it_starts_a_new_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    with caplog.at_level("WARNING", logger="ella.train"):
        Trainer(_tiny_config(data), tmp_path / "run", resume=True)
    assert "no checkpoint" in caplog.text and "starts a new run" in caplog.text


@pytest.mark.parametrize(
    ("layer", "option", "chosen", "other"),
    [("conv", "kfac_approx", "reduce", "expand"), ("ffc", "grouped_mode", "reference", "per_group")],
)
def test_kfac_options_reach_the_laplace_fit(tmp_path: Path, layer: str, option: str, chosen: str, other: str) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    trainer = Trainer(_tiny_config(data, layer=layer, **{option: chosen}), tmp_path / "run")
    logdet = trainer.laplace_fit().decomposition.logdet(torch.tensor(1.0))
    for value, same in ((chosen, True), (other, False)):
        expected = fit_kfac(trainer.model, trainer.marglik_loader, **{option: value}).decompose()
        assert torch.allclose(logdet, expected.logdet(torch.tensor(1.0))) == same
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        TrainConfig(**{option: "sum"}).check()


def _as_from_a_terminal() -> None:
    """In a child before it runs: Ctrl-C's default action, which a background shell (``cmd &``) sets to ignore."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_two_epochs(command: list[str], env: dict, out: Path) -> subprocess.Popen:
    """Start ``command`` as from a terminal (SIGINT not ignored, whatever this process inherited) and return once
    ``out/metrics.jsonl`` holds two epochs (or it ended, or 120 s passed)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_as_from_a_terminal)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    return process


def test_killed_script_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL the real command mid-run, re-run it with --resume, and it finishes without redoing epochs."""
    data = _write_tiny_cifar(tmp_path / "data", n_train=200)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "experiments" / "cifar10.py"), "--layer", "conv", "--laplace", "--preset", "cpu",
        "--alpha", "1", "--epochs", "24", "--n-train", "100", "--n-valid", "20", "--burn-in", "1",
        "--marglik-every", "1", "--hyper-steps", "2", "--cifar-test", "exact", "--data-dir", str(data), "--device", "cpu",
        "--out", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = _start_and_wait_for_two_epochs(command, env, out)
    metrics = out / "metrics.jsonl"
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(metrics.read_text().splitlines())
    assert 2 <= done_before < 24

    result = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, 25))
    assert (out / "effective_parameters.txt").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layer", "conv", "--data-dir", "MISSING"], "Could not find CIFAR-10"),
        (["--layer", "conv", "--combine", "avg"], "invalid choice: 'avg'"),
        (["--layer", "convv"], "invalid choice: 'convv'"),
        (["--layer", "conv", "--device", "tpu"], "device 'tpu' cannot be used here"),
        (["--layer", "conv", "--prior-init", "nan"], "argument --prior-init: must be a finite number > 0, got nan"),
    ],
)
def test_bad_input_ends_with_a_message_not_a_traceback(tmp_path: Path, flags: list[str], message: str,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    flags = [str(tmp_path / "missing") if flag == "MISSING" else flag for flag in flags]
    code, _, err = run_here(REPO / "experiments" / "cifar10.py", [*flags, "--out", str(tmp_path / "run")], capsys,
                            monkeypatch, env={"ELLA_DATA": str(tmp_path / "missing")})
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("benchmarks/scaling.py", ["--layer", "convv"], "invalid choice: 'convv'"),
        ("examples/mnist_symmetries.py", ["--epochs", "1"], "--epochs must be at least 2: the first marginal-"),
        ("benchmarks/scaling.py", ["--n-images", "8"], "Could not find CIFAR-10"),
        ("benchmarks/kfac_speed.py", ["--device", "tpu"], "device 'tpu' cannot be used here"),
        ("benchmarks/kfac_speed.py", ["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
        ("experiments/msr_synthetic.py", ["--outer-steps", "0"], "--outer-steps: must be an integer >= 1, got 0"),
        ("experiments/compare_msr.py", ["--rounds", "-1"], "--rounds: must be an integer >= 1, got -1"),
        ("experiments/compare_msr.py", ["--hyper-steps", "-3"], "--hyper-steps: must be an integer >= 0, got -3"),
        ("experiments/count_params.py", ["--alpha", "0"], "--alpha: must be an integer >= 1, got 0"),
        ("experiments/known_symmetry.py", ["--noise", "0"], "--noise: must be a finite number > 0, got 0"),
        ("experiments/known_symmetry.py", ["--teachers", "gconv"], "invalid choice: 'gconv'"),
    ],
)
def test_other_scripts_reject_bad_input_with_a_message(
    tmp_path: Path, script: str, flags: list[str], message: str, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = run_here(REPO / script, flags, capsys, monkeypatch, env={"ELLA_DATA": str(tmp_path / "missing")})
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("error", [FloatingPointError("training loss became nan in epoch 3"), FileExistsError("x")])
def test_run_script_turns_user_errors_into_a_message(
    error: Exception, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ella.cli import run_script

    def main() -> None:
        raise error

    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(main)
    assert stop.value.code == 2
    assert f"error: {error}" in capsys.readouterr().err


def test_existing_run_without_resume_ends_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    script = REPO / "experiments" / "cifar10.py"
    command = [sys.executable, str(script), "--layer", "conv", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ELLA_DATA": str(tmp_path / "missing")})
    assert result.returncode == 2
    assert "already holds a run; pass --resume" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device 'cuda' cannot be used here"):
        distributed.parse_device("cuda")
    assert distributed.parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "experiments").glob("*.py")))
def test_every_experiment_script_imports_and_prints_its_help(script: str, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_here(REPO / "experiments" / script, ["--help"], capsys, monkeypatch)
    assert code == 0, err
    assert "usage:" in out


def test_help_lists_every_flag() -> None:
    """In a fresh interpreter, as a user starts it."""
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "cifar10.py"), "--help"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0
    for flag in ("--layer", "--laplace", "--preset", "--resume", "--device", "--data-dir", "--epochs"):
        assert flag in result.stdout


def test_failed_marglik_round_is_skipped_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ella.train as train_module
    from ella.marglik import MarglikError

    data = _write_tiny_cifar(tmp_path / "data")
    real_fit = train_module.fit_laplace
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MarglikError("simulated non-finite marginal likelihood")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit_laplace", failing_once)
    final = train(_tiny_config(data, epochs=3), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["neg_log_marglik"] is None and rows[2]["neg_log_marglik"] is not None
    assert final["neg_log_marglik"] == rows[2]["neg_log_marglik"]


def test_combine_option_reaches_every_relaxed_layer(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    trainer = Trainer(_tiny_config(data, layer="ffc_conv", combine="sum"), tmp_path / "run")
    assert {block.combine for block in trainer.model.blocks} == {"sum"}


def test_experiment_figures_go_under_figures() -> None:
    from ella.cli import figure_dir

    assert figure_dir(Path("runs/cifar10/a-run")) == Path("figures/cifar10/a-run")
    assert figure_dir(Path("/tmp/elsewhere")) == Path("/tmp/elsewhere/figures")


def test_progress_bars_follow_the_kfac_pass_the_hyper_steps_and_the_final_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ella.progress as progress_module

    bars: list[_RecordedBar] = []

    class _RecordedBar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            self.postfixes: list[str] = []
            bars.append(self)

        def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
            self.postfixes.append(text)
            super().set_postfix_str(text, refresh)

    monkeypatch.setattr(progress_module, "tqdm", _RecordedBar)
    data = _write_tiny_cifar(tmp_path / "data")
    # one round, after epoch 2 of 3 (a round after the last epoch would lend the report its fit)
    trainer = Trainer(_tiny_config(data, epochs=3, burn_in=2, marglik_every=2, hyper_steps=3), tmp_path / "run")
    trainer.run()
    batches = len(trainer.marglik_loader)
    assert batches == 2  # 40 training images in KFAC batches of 25
    fits = {bar.desc: bar for bar in bars if bar.desc in ("marginal likelihood", "final report")}
    assert fits.keys() == {"marginal likelihood", "final report"}
    assert (fits["marginal likelihood"].n, fits["marginal likelihood"].total) == (batches + 3, batches + 3)
    assert fits["marginal likelihood"].postfixes == ["eigendecomposition"] + ["hyper-steps"] * 3
    assert (fits["final report"].n, fits["final report"].total) == (batches, batches)
    assert trainer.marglik_loader.bar is None and not trainer.hyper_optimizer._optimizer_step_post_hooks


def test_run_bar_shows_an_eta_at_once_after_a_resume() -> None:
    from ella.progress import RunBar

    bar = RunBar(total=10, initial=4, seconds_per_epoch=3.0, file=io.StringIO(), disable=False)
    assert "4/10 [00:00<00:18," in str(bar)  # 6 epochs left at 3 s each
    assert "4/10 [00:00<?," in str(tqdm(total=10, initial=4, file=io.StringIO()))  # what tqdm alone shows


def test_ctrl_c_says_where_the_run_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ella.train import Interrupted

    _raise_in_epoch(monkeypatch, 3, KeyboardInterrupt)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=f"^interrupted in epoch 3 of 4; the checkpoint in {out} holds epoch 2$"):
        train(_tiny_config(_write_tiny_cifar(tmp_path / "data")), out)
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_between_epochs_also_says_what_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt outside an epoch's own handler (here while the bar moves on after epoch 2; under
    torchrun, its SIGTERM while a lost process's error is handled) still ends with where the run stopped."""
    from ella.progress import RunBar
    from ella.train import Interrupted

    original, updates = RunBar.update, []

    def update(self: RunBar, n: int = 1) -> None:
        updates.append(n)
        if len(updates) == 2:
            raise KeyboardInterrupt
        original(self, n)

    monkeypatch.setattr(RunBar, "update", update)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=f"^interrupted after epoch 2 of 4; the checkpoint in {out} holds epoch 2$"):
        train(_tiny_config(_write_tiny_cifar(tmp_path / "data")), out)


def test_sigterm_in_one_process_saves_the_epoch_in_progress_and_stops(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch scheduler's SIGTERM (a Ctrl-C, as ella.cli.run_script makes it) during epoch 3: the epoch is
    finished and saved, and the run stops there; the resumed run ends as an uninterrupted one."""
    from ella.train import Interrupted

    data = _write_tiny_cifar(tmp_path / "data")
    config = replace(_tiny_config(data), checkpoint_every=None, checkpoint_minutes=60.0)  # saved only on stopping
    original = Trainer.train_epoch

    def terminated_in_epoch_3(self: Trainer) -> float:
        loss = original(self)
        if self.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_epoch", terminated_in_epoch_3)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match="^interrupted after epoch 3 of 4; the checkpoint in .* holds epoch 3$"):
            train(config, tmp_path / "run")
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    resumed, plain = Trainer(config, tmp_path / "run", resume=True), Trainer(config, tmp_path / "plain")
    final, plain_final = resumed.run(), plain.run()
    assert final["test"] == plain_final["test"] and final["precisions"] == plain_final["precisions"]
    assert _without_timing(resumed.history) == _without_timing(plain.history)


def test_ctrl_c_on_the_command_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    """SIGINT the real command mid-run: one line, status 130, and the command it prints finishes the run."""
    data = _write_tiny_cifar(tmp_path / "data", n_train=200)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "experiments" / "cifar10.py"), "--layer", "conv", "--alpha", "1", "--epochs", "30",
        "--n-train", "100", "--n-valid", "40", "--cifar-test", "exact", "--data-dir", str(data), "--device", "cpu",
        "--out", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = _start_and_wait_for_two_epochs(command, env, out)
    metrics = out / "metrics.jsonl"
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(("interrupted in epoch ", "interrupted after epoch "))
    resume = err.strip().split("; continue with: ")[1]
    assert resume == shlex.join(["python", *command[1:], "--resume"])
    result = subprocess.run([sys.executable, *shlex.split(resume)[1:]], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(1, 31))


def test_single_class_training_data_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    with np.load(data / "cifar10.npz") as arrays:
        np.savez(data / "cifar10.npz", **{**arrays, "y_train": np.full_like(arrays["y_train"], 7)})
    with caplog.at_level("WARNING", logger="ella.data"):
        Trainer(_tiny_config(data), tmp_path / "run")
    assert "the training data hold a single class (label 7 in all 40 images)" in caplog.text
    assert caplog.text.count("single class") == 1


def test_paper_tables_runs_a_set_and_writes_one_table(tmp_path: Path) -> None:
    """The launcher end to end at tiny size: two members of the CIFAR-10 set, one table with the learned
    model's per-block shares; a name outside the set is a clear error."""
    data = _write_tiny_cifar(tmp_path / "data")
    command = [sys.executable, str(REPO / "experiments" / "paper_tables.py"), "cifar10", "--preset", "cpu",
               "--only", "conv-map", "ffc_conv-laplace", "--seeds", "5", "--epochs", "2", "--alpha", "1",
               "--n-train", "40", "--n-valid", "10", "--burn-in", "2", "--marglik-every", "1", "--hyper-steps", "2",
               "--cifar-test", "exact", "--data-dir", str(data), "--device", "cpu", "--out", str(tmp_path / "t")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "t" / "table.json").read_text())
    assert [row["run"] for row in rows] == ["conv-map-s5", "ffc_conv-laplace-s5"]
    conv, learned = rows
    assert conv["paper_acc"] == 82.81 and learned["paper_acc"] == 83.92
    assert conv["neg_log_marglik"] is None and learned["neg_log_marglik"] is not None
    for kind in ("F-FC", "CONV"):  # eight relaxed blocks each
        assert len(learned[f"rel {kind}"].split()) == len(learned[f"out {kind}"].split()) == 8
    shares = zip(learned["rel F-FC"].split(), learned["rel CONV"].split())
    assert all(abs(float(a) + float(b) - 1) < 0.011 for a, b in shares)  # the relative shares of a block add up
    assert all(row["minutes"] > 0 for row in rows) and "| ffc_conv-laplace-s5 |" in done.stdout
    wrong = subprocess.run(command[:3] + ["--only", "conv-laplace"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "conv-laplace not in the cifar10 set" in wrong.stderr
