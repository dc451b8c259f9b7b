"""The GPU check (benchmarks/gpu_check.py) end to end on the CPU at a tiny size: the folder is prepared, every
stage runs in its own process, a failing and a hanging stage are recorded and the next stage still runs, and the
summary is written."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from script_utils import run_here
from test_symmetry_scripts import script_parsers, undocumented
from test_train import _write_tiny_cifar

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_gpu_check_prepares_runs_every_stage_and_goes_on_after_a_failure(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "source", n_train=1100, n_test=30)  # train_speed validates on 1,000
    folder = tmp_path / "check"
    prepared = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "prepare", str(folder), "--data-dir",
                               str(data), "--n-train", "1100", "--n-test", "30"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    assert (folder / "repo" / "ella" / "train.py").is_file() and (folder / "README.txt").is_file()

    out = folder / "results"
    # The limits are sized for a GPU; at tiny size on a busy CPU a stage can take longer than its limit.
    plan = [dataclasses.replace(stage, limit=max(stage.limit, 900))
            for stage in gpu_check.stages(folder, out, "cpu", tiny=True)]
    broken = gpu_check.Stage("broken", [sys.executable, "-c", "raise SystemExit('a stage that fails')"], 30)
    hanging = gpu_check.Stage("hanging", [sys.executable, "-c", "import time; time.sleep(60)"], 2)
    plan[1:1] = [broken, hanging]
    outcomes = {o.name: o for o in gpu_check.run_check(out, plan, budget=5000)}

    assert outcomes["broken"].status == "failed" and "a stage that fails" in outcomes["broken"].tail
    assert outcomes["hanging"].status == "timed out" and outcomes["hanging"].seconds < 10
    assert outcomes["cuda tests"].status == "skipped" and outcomes["resume"].status == "skipped"  # no GPU here
    for name in ("environment", "train speed", "gpu preset", "fc+conv"):
        assert outcomes[name].status == "passed", (name, outcomes[name].tail)
    assert outcomes["environment"].result["type"] == "cpu"
    assert outcomes["gpu preset"].result["training"]["steps"] == "plain loop"
    assert outcomes["fc+conv"].result["plain"]["seconds_per_step"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == [s.name for s in plan]
    text = (out / "summary.txt").read_text()
    assert "== broken: failed" in text and "== hanging: timed out" in text and "== fc+conv: passed" in text
    assert "marginal-likelihood round" in outcomes["train speed"].tail


def test_a_stage_without_time_left_is_not_run(tmp_path: Path) -> None:
    stage = gpu_check.Stage("late", [sys.executable, "-c", "pass"], 30)
    [outcome] = gpu_check.run_check(tmp_path, [stage], budget=0)
    assert outcome.status == "not run" and json.loads((tmp_path / "summary.json").read_text())["stages"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["prepare", "FOLDER", "--n-train", "-5"], "argument --n-train: must be an integer >= 1, got -5"),
        (["prepare", "FOLDER", "--n-test", "0"], "argument --n-test: must be an integer >= 1, got 0"),
        (["prepare", "FOLDER", "--n-train", "20000"],
         "--n-train 20000 and --n-test 1000 make 61.5 MiB of images, more than 40 MiB (at most 13653 images in all)"),
        (["run", "FOLDER", "--budget", "-1"], "argument --budget: must be a finite number > 0, got -1"),
        (["run", "FOLDER", "--budget", "1"],
         "FOLDER holds no data/cifar10.npz: write the folder first, where the data is, with python "
         "benchmarks/gpu_check.py prepare FOLDER"),
        (["fc-conv", "--json", "x.json", "--alpha", "0"], "argument --alpha: must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, flags: list[str], message: str,
                                                        capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(tmp_path / "check")
    code, _, err = run_here(SCRIPT, [folder if flag == "FOLDER" else flag for flag in flags], capsys, monkeypatch)
    assert code == 2 and message.replace("FOLDER", folder) in err and "Traceback" not in err
    assert not (tmp_path / "check").exists()


def test_the_help_lists_the_options_of_each_command_with_their_defaults(capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_here(SCRIPT, ["--help"], capsys, monkeypatch)
    assert code == 0 and "==SUPPRESS==" not in out
    for option in ("--data-dir", "--wheels", "--n-train", "--n-test", "--device", "--budget", "--tiny"):
        assert option in out
    assert [name for parser in script_parsers(SCRIPT, capsys, monkeypatch) for name in undocumented(parser)] == []
