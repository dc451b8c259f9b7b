"""Where the data live: the data folder, and the error that says where it looked and how to fix that."""
from __future__ import annotations

import os
from pathlib import Path

# the usual way out of a missing MNIST / CIFAR-10, in the flags a user types
FIX_HINT = (
    "To fix this, point --data-dir or the ELLA_DATA environment variable at a folder holding mnist.npz / "
    "cifar10.npz (the project's shared format), or torchvision's layout (MNIST/raw/*-ubyte[.gz], "
    "cifar-10-batches-py/), or, on a machine with network access, pass --download to a training experiment (download=True to "
    "ella.data.load_dataset)."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset could not be found in any of the places looked at (the message lists them)."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$ELLA_DATA`` if set and non-empty, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("ELLA_DATA")
    if env:
        return Path(env).expanduser()
    return Path("data")


def not_found(what: str, data_dir: Path, looked: list[str], fix: str = FIX_HINT) -> DatasetNotFoundError:
    """The error for ``what`` missing from ``data_dir``: the folder, every path ``looked`` at, then ``fix``."""
    state = "" if data_dir.is_dir() else ", which is a file, not a folder" if data_dir.exists() else ", which does not exist"
    lines = [f"Could not find {what} (data dir: {data_dir.resolve()}{state}). Looked at:"]
    lines += [f"  {p}" for p in looked]
    lines.append(fix)
    return DatasetNotFoundError("\n".join(lines))
