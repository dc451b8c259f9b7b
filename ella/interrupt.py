"""Ctrl-C while an experiment script is still loading torch and ella: one line and exit status 130, as
:func:`ella.cli.run_script` ends an interrupted run later, instead of a traceback through the imports. This module
imports nothing heavy, so a script calls :func:`quiet_interrupts` before its other imports."""

from __future__ import annotations

import sys
from types import TracebackType


def _hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)  # Python still ends with status 130 for the KeyboardInterrupt
    else:
        sys.__excepthook__(kind, error, trace)


def quiet_interrupts() -> None:
    """Report a KeyboardInterrupt that reaches the top of the program as the one line ``interrupted``."""
    sys.excepthook = _hook
