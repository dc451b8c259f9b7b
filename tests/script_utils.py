"""Run an experiment or benchmark script inside the test process, as ``python SCRIPT FLAGS`` would run it.

Starting an interpreter and importing torch costs about 3.5 s per case on a 2-core machine; the checks of a
script's help and of its messages for bad input need neither. :func:`run_here` runs the script as ``__main__``
(its folder first on ``sys.path``, as the interpreter puts it) and returns the exit status and what it printed.
An exception that escapes the script, which a user would see as a traceback, fails the calling test. What the
scripts set for the whole process (the exception hook, logging, torch's thread count, signal handlers) is
restored afterwards, so later tests run as before. Tests of what only a separate process shows (exit statuses
of a real interpreter, signals, torchrun) keep using ``subprocess``.
"""

from __future__ import annotations

import logging
import runpy
import signal
import sys
from pathlib import Path

import pytest
import torch


def run_here(script: Path, flags: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
             env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``python script *flags`` with the environment variables ``env`` set."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [str(script), *flags])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    message = ""
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as stop:  # the interpreter prints a message given as the status and exits with 1
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        message = "" if stop.code is None or isinstance(stop.code, int) else f"{stop.code}\n"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
        for s, handler in signals.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    return code, out, err + message
