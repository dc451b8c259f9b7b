"""The command lines of the symmetry experiments (experiments/known_symmetry.py, experiments/layerwise_symmetry.py)
and of the small scripts beside them (experiments/count_params.py, benchmarks/scaling.py): flags a run would
ignore and bad values are refused before anything is written, a rerun into an --out of other settings is refused
and one of the same settings continues, Ctrl-C says how to continue, and --help names every flag's default.
Each runs in the test process (tests/script_utils.py), at a size of a few seconds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import ella.teacher
from script_utils import run_here

REPO = Path(__file__).resolve().parents[1]
KNOWN = REPO / "experiments" / "known_symmetry.py"
LAYERWISE = REPO / "experiments" / "layerwise_symmetry.py"
TINY_KNOWN = ["--teachers", "conv", "--rounds", "1", "--hyper-steps", "1", "--n", "8", "--channels", "1",
              "--size", "2", "--profile", "0"]
TINY_LAYERWISE = ["--structures", "C", "--seeds", "0", "--rounds", "1", "--map-iter", "1", "--final-map-iter", "1",
                  "--hyper-steps", "1", "--n", "8", "--channels", "1", "--size", "2"]


def script_parsers(script: Path, capsys: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    """The parser of ``script`` and those of its sub-commands, caught where the script parses (nothing runs)."""
    caught = []

    def catch(parser: argparse.ArgumentParser, args=None, namespace=None):
        caught.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    code, _, err = run_here(script, [], capsys, monkeypatch)
    assert code == 0 and len(caught) == 1, err
    commands = [action.choices.values() for action in caught[0]._actions
                if isinstance(action, argparse._SubParsersAction)]
    return [caught[0], *(parser for group in commands for parser in group)]


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments of ``parser`` without a help text, or, for a flag that takes a value and may be left out,
    without its default in it."""
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        takes_default = action.option_strings and action.nargs != 0 and not action.required
        if not action.help or (takes_default and "default" not in action.help):
            missing.append(f"{parser.prog} {action.option_strings[0] if action.option_strings else action.dest}")
    return missing


@pytest.mark.parametrize("script", ["experiments/known_symmetry.py", "experiments/layerwise_symmetry.py",
                                    "experiments/count_params.py", "benchmarks/scaling.py"])
def test_the_help_names_every_flags_default(script: str, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert [name for parser in script_parsers(REPO / script, capsys, monkeypatch)
            for name in undocumented(parser)] == []


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        (KNOWN, ["--methods", "alternation", "--ray-min-scale", "0.7"],
         "argument --ray-min-scale: acts on the ray method only, which --methods alternation leaves out"),
        (KNOWN, ["--methods", "ray", "--hyper-lr", "0.5"],
         "argument --hyper-lr: acts on the alternation method only, which --methods ray leaves out"),
        (KNOWN, ["--profile"], "argument --profile: expected at least one argument"),
        (KNOWN, ["--profile", "0", "1000"], "argument --profile: must be a finite number in [-30, 30), got 1000"),
        (LAYERWISE, ["--method", "alternation", "--ray-min-scale", "0.5"],
         "argument --ray-min-scale: acts on the ray method only, which --method alternation leaves out"),
        (LAYERWISE, ["--hyper-lr", "0.3"],
         "argument --hyper-lr: acts on the alternation method only, which --method ray leaves out"),
        (LAYERWISE, ["--seeds", "0", "-1"], "argument --seeds: must be an integer >= 0, got -1"),
    ],
)
def test_a_flag_the_run_would_ignore_or_a_bad_value_is_refused_before_anything_is_written(
    tmp_path: Path, script: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tiny = TINY_KNOWN if script == KNOWN else TINY_LAYERWISE  # a refusal that fails runs a few seconds, not hours
    code, _, err = run_here(script, [*tiny, *flags, "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()[-1]) < 300
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("script", "tiny", "finished", "reused"), [
    (KNOWN, TINY_KNOWN, "conv/ray/profile.json", "teacher conv, ray: reused the finished results in"),
    (LAYERWISE, TINY_LAYERWISE, "cells/C_0.json", "reused 1 finished cell(s) of an earlier run with the same settings"),
])
def test_a_rerun_with_the_same_settings_continues_and_one_with_others_is_refused(
    tmp_path: Path, script: Path, tiny: list[str], finished: str, reused: str, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    assert run_here(script, [*tiny, "--out", str(out)], capsys, monkeypatch)[0] == 0
    config, result = (out / "config.json").read_text(), (out / finished).read_text()

    code, stdout, err = run_here(script, [*tiny, "--out", str(out)], capsys, monkeypatch)
    assert code == 0 and reused in stdout, err
    assert (out / finished).read_text() == result

    code, _, err = run_here(script, [*tiny, "--rounds", "2", "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and f"{out} holds a run with other settings (--rounds 1 there, 2 now): choose another --out" in err
    assert (out / "config.json").read_text() == config and (out / finished).read_text() == result


def test_a_layerwise_cell_of_other_settings_is_refused_not_recomputed(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert run_here(LAYERWISE, [*TINY_LAYERWISE, "--out", str(out)], capsys, monkeypatch)[0] == 0
    cell = out / "cells" / "C_0.json"
    stale = json.loads(cell.read_text())
    stale["settings"]["rounds"] = 5  # say, a cell left by an older version of the script
    cell.write_text(json.dumps(stale))
    code, _, err = run_here(LAYERWISE, [*TINY_LAYERWISE, "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and f"{cell} was computed with other settings than this run's: choose another --out" in err
    assert json.loads(cell.read_text()) == stale


@pytest.mark.parametrize(("script", "tiny", "finished", "message"), [
    (KNOWN, TINY_KNOWN, 1, "reusing the results finished in"),  # one student per method
    (LAYERWISE, [*TINY_LAYERWISE, "--structures", "C", "CC"], 3, "reusing the cells finished in"),  # C: 3 students
])
def test_ctrl_c_keeps_what_is_finished_and_says_that_the_same_command_continues(
    tmp_path: Path, script: Path, tiny: list[str], finished: int, message: str, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C once the first method (known) or cell (layerwise) is finished; the rerun reuses it."""
    learn, calls = ella.teacher.learn_precisions, []

    def interrupted_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > finished:
            raise KeyboardInterrupt
        return learn(*args, **kwargs)

    monkeypatch.setattr(ella.teacher, "learn_precisions", interrupted_later)
    out = tmp_path / "out"
    code, _, err = run_here(script, [*tiny, "--out", str(out)], capsys, monkeypatch)
    assert code == 130 and f"interrupted; the same command continues the run, {message} {out}" in err
    monkeypatch.setattr(ella.teacher, "learn_precisions", learn)
    code, stdout, err = run_here(script, [*tiny, "--out", str(out)], capsys, monkeypatch)
    assert code == 0 and "reused" in stdout, err
