"""The output folder of the MSR experiments (experiments/msr_synthetic.py, experiments/compare_msr.py).

A run is a list of rows, one per method and problem, computed one after the other. Each row is saved as it
finishes: ``results.json`` and ``results.csv`` are rewritten with every finished row, each atomically
(:func:`ella.cli.write_table`), so an interrupted run loses at most the row in progress, and
``--resume`` computes only the rows still missing. ``config.json`` records the flags the rows were computed with
(a script refuses a resume with other flags by :func:`ella.cli.check_same_settings` before it gets here); a new
run into a folder that already holds files is refused. The folder is locked while a run writes to it
(:func:`ella.checkpoint.lock_folder`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ella.checkpoint import (
    CONFIG,
    LOCK,
    OUT,
    RESUME,
    CheckpointError,
    lock_folder,
    make_folder,
    state_checksum,
    unlock_folder,
    write_config,
)
from ella.cli import write_table
from ella.train import Interrupted

RESULTS = "results"
# Flags that say how a run is carried out, not what it computes: a resume may change them, and they do not name
# the default output folder
HOW = ("out", "resume", "no_progress", "threads", "device")
Job = tuple[dict, Callable[[], dict]]  # the fields that name a row, and the function that computes the rest


def add_output_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """``--out`` (default :func:`default_out` under ``runs/<script>``), ``--resume`` and ``--no-progress``."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: runs/{script}/<preset>-<hash of the flags that change the "
                             "results>, so that the same command continues there with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out, given the same flags: compute only the rows it has not "
                             "finished (default: a new run, refused where --out holds files)")
    parser.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars (default: shown)")


def default_out(root: str, preset: str, settings: dict) -> Path:
    """``<root>/<preset>-<hash>``, the hash (8 hex digits) of the flags that change results: the same command
    always writes to the same folder, so that it continues there with ``--resume``, and other flags elsewhere."""
    compared = {name: value for name, value in settings.items() if name not in HOW}
    return Path(root) / f"{preset}-{state_checksum(compared)[:8]}"


def run_rows(jobs: list[Job], out: Path, config: dict, resume: bool) -> list[dict]:
    """Every job's row, in order (see the module docstring): on ``resume`` the rows ``out`` holds already are
    reused, the others computed and saved as each finishes. A new run records ``config`` (the flags and what
    they imply) in ``config.json``. Ctrl-C raises :class:`ella.train.Interrupted` saying how many rows are
    saved."""
    done = open_results(out, config, resume)
    rows: list[dict] = []
    try:
        for key, compute in jobs:
            row = next((row for row in done if all(row.get(name) == value for name, value in key.items())), None)
            if row is None:
                row = {**key, **compute()}
                write_table([*rows, row], out, RESULTS)
            rows.append(row)
        return rows
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {len(rows)} of {len(jobs)} rows finished and saved in {out}") from None
    finally:
        unlock_folder(out)


def open_results(out: Path, config: dict, resume: bool) -> list[dict]:
    """Create and lock ``out``; return the rows it holds already (none for a new run). Refused: a new run into a
    folder that holds files (FileExistsError naming --resume), a resume from one without ``config.json``
    (CheckpointError). A refused folder is unlocked and left as it was. A new run writes ``config``
    as ``config.json``; a resumed one keeps the one its first rows were computed with."""
    make_folder(out)
    lock_folder(out)
    try:
        found = sorted(path.name for path in out.iterdir() if path.name != LOCK)
        if found and not resume:
            raise FileExistsError(f"{out} ({OUT}) already holds files ({', '.join(found)}); pass {RESUME} to "
                                  "continue the run there, or choose another output folder")
        if not found:
            write_config(config, out)
            return []
        if CONFIG not in found:
            raise CheckpointError(f"cannot resume: {out} holds no {CONFIG} of a run to continue; choose another "
                                  f"output folder ({OUT})")
        path = out / f"{RESULTS}.json"
        return json.loads(path.read_text()) if path.exists() else []
    except BaseException:
        unlock_folder(out)
        raise
