"""Options that are dataclass fields: one field per option, from which its command-line flag and its check follow.

A field made by :func:`option` carries its help text and its allowed values (a :class:`Range` or a tuple of
choices) in its metadata. :mod:`ella.cli` turns every such field of :class:`~ella.train.TrainConfig` into the flag
``--<name-with-dashes>`` (a boolean into a switch: ``--<name>`` when it defaults to False, ``--no-<name>`` when it
defaults to True), and :meth:`~ella.train.TrainConfig.check` validates a config against the same metadata, so
adding a training option is adding one field. Fields made by plain ``field`` or a bare default are not flags.
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import Field, field
from typing import Any

import numpy as np


class Range:
    """The allowed values of a numeric option: ``kind`` (``int`` or ``float``; floats must be finite), at least
    ``low`` (more than ``low`` with ``above=True``) and less than ``below`` (bounds left ``None`` are open).

    Called on a flag's text it is an argparse ``type``: it converts and checks, and argparse reports a bad value
    as ``argument --flag: must be an integer >= 1, got 0``.
    """

    def __init__(self, kind: type = int, low: float | None = None, above: bool = False, below: float | None = None) -> None:
        self.kind, self.low, self.above, self.below = kind, low, above, below

    def __str__(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.below is not None:
            return f"{noun} in {'(' if self.above else '['}{self.low:g}, {self.below:g})"
        if self.low is not None:
            return f"{noun} {'>' if self.above else '>='} {self.low:g}"
        return f"{noun} < {self.below:g}" if self.below is not None else noun

    def allows(self, value: object) -> bool:
        """True when ``value`` is of this range's kind (any ``numbers.Integral`` for ``int``, such as numpy's
        integers; any ``numbers.Real`` for ``float``; never a bool) and within its bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.below is None or value < self.below

    def check(self, value: object, name: str) -> int | float:
        """``value`` as a plain ``int`` or ``float`` (of this range's kind), or a ValueError naming ``name`` (say,
        the flag) unless :meth:`allows` ``value``."""
        if not self.allows(value):
            raise ValueError(f"{name} must be {self}, got {value!r}")
        return self.kind(value)

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}") from None
        if not self.allows(value):
            raise argparse.ArgumentTypeError(f"must be {self}, got {text}")
        return value


COUNT = Range(int, 1)  # sizes and counts that must be at least one
OPTIONAL_COUNT = Range(int, 0)  # counts that may be zero
POSITIVE = Range(float, 0, above=True)  # rates, scales, precisions


def check_switch(value: object, name: str) -> bool:
    """``value`` as a plain bool (a numpy bool converted), or a ValueError naming ``name`` unless it is one (a
    string such as ``"False"`` is refused: it would count as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def option(default: Any = None, help: str = "", values: Range | tuple[str, ...] | None = None,
           default_factory: Any = None) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring).

    ``help`` says what the option does (the command line appends its default); ``values`` is a :class:`Range`
    for numbers, a tuple of the allowed strings for a choice, or ``None`` for free text and switches.
    """
    metadata = {"help": help, "values": values}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def is_option(item: Field) -> bool:
    """True for a dataclass field made by :func:`option`."""
    return "help" in item.metadata


def flag(item: Field) -> str:
    """The flag the user types for the option ``item``: ``--lr-min``; ``--no-augment`` for a switch that is on
    by default."""
    dashed = item.name.replace("_", "-")
    return f"--no-{dashed}" if item.default is True else f"--{dashed}"
