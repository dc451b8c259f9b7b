"""A run's output folder: atomic writes, two generations of checkpoints, and the checks made before a resume.

Every file is written beside its final name and renamed over it, so it holds either the old or the new version,
never half of one; a write that fails (a read-only folder, a full disk, an interrupt) leaves no ``.tmp`` behind
and raises :class:`OutputError` naming the file. A new checkpoint does not overwrite the last one: that one
becomes ``checkpoint.previous.pt``, so a damaged ``checkpoint.pt`` (truncated, emptied, overwritten) costs an
epoch, not the run. A checkpoint records its run's configuration, and :func:`open_run` reads the checkpoint and
compares the configurations before it writes anything into the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.previous.pt"  # the checkpoint before the last one
CONFIG = "config.json"
_AFTER_A_FAILED_WRITE = (
    "nothing there is half-written: make room or make the folder writable, then run the same command with --resume"
)


class OutputError(RuntimeError):
    """The output folder cannot be created, or a file in it cannot be written."""


class CheckpointError(RuntimeError):
    """No checkpoint in the output folder can be read, or the one read cannot be checked against the run."""


def write_atomically(path: Path, write: Callable[[Path], None], keep_previous: Path | None = None) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path`` (first moving an existing ``path`` to ``keep_previous``).

    On any failure ``tmp`` is removed; an ``OSError`` or ``RuntimeError`` (torch.save's way of reporting a full
    disk) becomes an :class:`OutputError` naming ``path``, anything else (an interrupt) is re-raised as it is.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            raise OutputError(f"cannot write {path}: {_reason(error, path.parent)}; {_AFTER_A_FAILED_WRITE}") from error
        raise


def write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`write_atomically`)."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(state: dict, out_dir: Path) -> None:
    """Save ``state`` as ``out_dir/checkpoint.pt``, keeping the one it replaces as ``checkpoint.previous.pt``."""
    write_atomically(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp), keep_previous=out_dir / PREVIOUS)


def _reason(error: BaseException, folder: Path) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # "No space left on device", "Permission denied", "Read-only file system", ...
    try:
        free = f"{shutil.disk_usage(folder).free / 2**10:,.0f} KiB free there"
    except OSError:
        free = "free space unknown"
    return f"{_first_line(error)} (a full disk? {free})"


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def make_folder(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents), or raise :class:`OutputError` saying why it cannot be."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        file = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{file} is a file, not a folder" if file is not None else error.strerror or str(error)
        raise OutputError(f"cannot create the output folder {out_dir} (--out): {reason}") from error


def read_checkpoint(out_dir: Path, keys: Collection[str]) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``out_dir`` (a dict holding ``keys``) and its file; ``None`` if there is
    none. A damaged one is passed over with a warning naming it; :class:`CheckpointError` if all are damaged."""
    damaged = []
    for path in (out_dir / CHECKPOINT, out_dir / PREVIOUS):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a damaged file raises any of RuntimeError, EOFError, UnpicklingError, ...
            damaged.append(f"{path} cannot be read ({type(error).__name__}: {_first_line(error)})")
            continue
        if not isinstance(state, dict) or not set(keys) <= state.keys():
            damaged.append(f"{path} is not a checkpoint of ella's training")
            continue
        if damaged:
            log.warning("%s; continuing from %s (epoch %d)", "; ".join(damaged), path, state["epoch"])
        return state, path
    if damaged:
        raise CheckpointError(
            f"cannot resume: {'; '.join(damaged)}, and there is no earlier checkpoint; "
            f"remove {out_dir} (or choose another --out) to start the run again"
        )
    return None


UNCHECKED = ("device", "capture", "kfac_batch_size", "download", "checkpoint_every")  # how a run is computed, not what it computes


def check_config(state: dict, path: Path, config: dict, defaults: dict, flags: dict[str, str]) -> None:
    """Raise unless the configuration saved with the checkpoint ``state`` (read from ``path``; for a checkpoint
    that predates that, ``config.json`` beside it) equals ``config`` except for the fields in :data:`UNCHECKED`.

    A field the saved configuration lacks (added after the run started) counts as its value in ``defaults``.
    The message names each differing field with its flag (``flags``: field -> flag) where it has one.
    """
    saved = state.get("config")
    if saved is None:
        path = path.with_name(CONFIG)
        if not path.is_file():
            raise CheckpointError(
                f"cannot check that {path.with_name(CHECKPOINT)} belongs to this configuration: it was written "
                f"before checkpoints recorded theirs and {path} is missing; restore that file or choose another --out"
            )
        saved = json.loads(path.read_text())
    changed = [
        f"{name}{f' ({flags[name]})' if name in flags else ''}: {saved.get(name, defaults.get(name))!r} saved, {value!r} now"
        for name, value in config.items()
        if name not in UNCHECKED and saved.get(name, defaults.get(name)) != value
    ]
    if changed:
        raise ValueError(f"--resume with a different configuration than {path}: {'; '.join(changed)}")


def open_run(out_dir: Path, config: dict, resume: bool, keys: Collection[str], defaults: dict,
             flags: dict[str, str]) -> dict | None:
    """Check ``out_dir`` for a run with ``config`` (a dict of its fields), then create it and write ``config.json``;
    return the checkpoint's state to continue from (``None`` for a new run).

    Without ``resume`` a folder that already holds a checkpoint is refused (``FileExistsError``). With it, the
    newest readable checkpoint (a dict holding ``keys``) is read and its configuration checked
    (:func:`check_config`) before anything is written. When that is ``checkpoint.previous.pt`` because
    ``checkpoint.pt`` is damaged, the damaged file is set aside as ``checkpoint.pt.damaged``, so that the next
    checkpoint keeps the good one as the previous one.
    """
    found = read_checkpoint(out_dir, keys) if resume else None
    if found is not None:
        check_config(found[0], found[1], config, defaults, flags)
    elif not resume and any((out_dir / name).exists() for name in (CHECKPOINT, PREVIOUS)):
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose --out")
    make_folder(out_dir)
    write_text(json.dumps(config, indent=2), out_dir / CONFIG)
    if found is not None and found[1].name == PREVIOUS and (out_dir / CHECKPOINT).exists():
        os.replace(out_dir / CHECKPOINT, out_dir / (CHECKPOINT + ".damaged"))
    return None if found is None else found[0]
