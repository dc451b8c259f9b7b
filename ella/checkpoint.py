"""A run's output folder: atomic writes, two generations of checkpoints, and the checks made before a resume.

Every file is written beside its final name and renamed over it, so it holds either the old or the new version,
never half of one; a write that fails (a read-only folder, a full disk, an interrupt) leaves no ``.tmp`` behind
and raises :class:`OutputError` naming the file. A new checkpoint does not overwrite the last one: that one
becomes ``checkpoint.previous.pt``, so a damaged ``checkpoint.pt`` (truncated, emptied, overwritten) costs an
epoch, not the run. A checkpoint records its run's configuration, and :func:`open_run` reads the checkpoint and
compares the configurations before it writes anything into the folder.

A folder holds one run at a time: :func:`open_run` locks it (:func:`lock_folder`, an ``flock`` on ``.lock`` that
the operating system releases when the process ends, however it ends), and a second run on the same folder is
refused with the holder's process id, host and start time. A checkpoint carries a checksum of its contents
(:func:`state_checksum`); one that does not match is treated like a damaged file: the previous generation is
used, with a warning naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.previous.pt"  # the checkpoint before the last one
CONFIG = "config.json"
LOCK = ".lock"  # held (flock) by the process running in the folder; names it
# How the messages name the two choices of a run, for the command line and for Python (ella.learn, Trainer) alike
RESUME = "--resume (resume=True in Python)"
OUT = "--out, out_dir= in Python"
_AFTER_A_FAILED_WRITE = (
    f"nothing there is half-written: make room or make the folder writable, then run it again with {RESUME}"
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


def append_text(text: str, path: Path) -> None:
    """Append ``text`` to ``path`` in one write; a failure is an :class:`OutputError` naming ``path`` (a row half
    appended is rewritten when the run resumes)."""
    try:
        with path.open("a") as handle:
            handle.write(text)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error, path.parent)}; {_AFTER_A_FAILED_WRITE}") from error


def save_checkpoint(state: dict, out_dir: Path) -> None:
    """Save ``state`` with its checksum (:func:`state_checksum`, key ``"checksum"``) as ``out_dir/checkpoint.pt``,
    keeping the one it replaces as ``checkpoint.previous.pt``."""
    state = {**state, "checksum": state_checksum(state)}
    write_atomically(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp), keep_previous=out_dir / PREVIOUS)


def state_checksum(state: object) -> str:
    """SHA-256 (hex) of ``state``'s contents but a ``"checksum"`` key: every tensor's dtype, shape and bytes and
    every other value's ``repr``, in the order of the nested dicts, lists and tuples (which loading keeps)."""
    digest = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {data.dtype} {tuple(value.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            items = [(key, item) for key, item in value.items() if key != "checksum"]
            digest.update(f"dict {len(items)};".encode())
            for key, item in items:
                digest.update(f"{key!r}:".encode())
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{value!r};".encode())

    feed(state)
    return digest.hexdigest()


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
        raise OutputError(f"cannot create the output folder {out_dir} ({OUT}): {reason}") from error


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
        if "checksum" in state and state["checksum"] != state_checksum(state):  # older checkpoints have none
            damaged.append(f"{path} does not match its checksum (damaged on disk)")
            continue
        if damaged:
            log.warning("%s; continuing from %s (epoch %d)", "; ".join(damaged), path, state["epoch"])
        return state, path
    if damaged:
        raise CheckpointError(
            f"cannot resume: {'; '.join(damaged)}, and there is no earlier checkpoint; "
            f"remove {out_dir} or choose another output folder ({OUT}) to start the run again"
        )
    return None


# How a run is computed, not what it computes; and where its data are read from (``data_dir``: a copy of the same
# data in another folder continues the run, while other data are refused by the checkpoint's data fingerprints)
UNCHECKED = ("device", "capture", "kfac_batch_size", "download", "checkpoint_every",
             "checkpoint_minutes", "process_timeout", "data_dir")


def config_changes(saved: dict, config: dict, defaults: dict, flags: dict[str, str]) -> list[str]:
    """The fields of ``config`` (but :data:`UNCHECKED`) whose value differs from ``saved``'s, each as ``name
    (--flag): saved value saved, value now``; a field ``saved`` lacks (added after it was written) counts as its
    value in ``defaults``, and ``flags`` maps a field to its flag where it has one."""
    changed = []
    for name, value in config.items():
        before = saved.get(name, defaults.get(name))
        if name not in UNCHECKED and before != value:
            changed.append(f"{name}{f' ({flags[name]})' if name in flags else ''}: {before!r} saved, {value!r} now")
    return changed


def check_config(state: dict, path: Path, config: dict, defaults: dict, flags: dict[str, str]) -> None:
    """Raise unless the configuration saved with the checkpoint ``state`` (read from ``path``; for a checkpoint
    that predates that, ``config.json`` beside it) equals ``config`` except for the fields in :data:`UNCHECKED`
    (see :func:`config_changes`)."""
    saved = state.get("config")
    if saved is None:
        path = path.with_name(CONFIG)
        if not path.is_file():
            raise CheckpointError(
                f"cannot check that {path.with_name(CHECKPOINT)} belongs to this configuration: it was written "
                f"before checkpoints recorded theirs and {path} is missing; restore that file or choose another output "
                f"folder ({OUT})"
            )
        saved = json.loads(path.read_text())
    changed = config_changes(saved, config, defaults, flags)
    if changed:
        raise ValueError(f"{RESUME} with a different configuration than {path}: {'; '.join(changed)}")


def check_world_size(state: dict, path: Path, world_size: int) -> None:
    """Raise unless the checkpoint ``state`` (read from ``path``) was written by a run of ``world_size``
    processes (one that predates the record was a single process or is not checked)."""
    saved = state.get("world_size")
    if saved is not None and saved != world_size:
        def processes(n: int) -> str:
            return "1 process" if n == 1 else f"{n} processes (torchrun --nproc_per_node={n})"

        raise ValueError(
            f"--resume with {processes(world_size)}, but {path} was written by a run of {processes(saved)}: the "
            f"batches and the result depend on it; continue with {processes(saved)} or choose another output "
            f"folder ({OUT})"
        )


_HELD: dict[Path, tuple[int, int]] = {}  # folder -> (process id, open lock file) for the locks this process holds


def lock_folder(out_dir: Path) -> None:
    """Lock ``out_dir`` (which must exist) for this process, or raise :class:`OutputError` naming the process that
    holds it (process id, host, start time). The lock is an ``flock`` on ``out_dir/.lock``, so the operating
    system releases it when its process ends, however it ends: a crashed or killed run leaves no lock behind.
    Taking a lock this process already holds is a no-op; :func:`unlock_folder` releases it."""
    key = out_dir.resolve()
    if key in _HELD and _HELD[key][0] == os.getpid():
        return
    path = out_dir / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot write {path}: {_reason(error, out_dir)}") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise OutputError(
                f"{out_dir} ({OUT}) is in use by another run ({holder}); wait until it ends, or choose another output "
                "folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(handle).st_ino == os.stat(path).st_ino:  # not a lock file its holder has just removed
                break
        os.close(handle)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(handle, 0)
    os.write(handle, f"process {os.getpid()} on {socket.gethostname()}, started {started}".encode())
    _HELD[key] = (os.getpid(), handle)


def _read_holder(handle: int) -> str:
    text = os.pread(handle, 1000, 0).decode(errors="replace").strip()
    return text or "a process that has not yet written its name"


def unlock_folder(out_dir: Path) -> None:
    """Release this process's lock on ``out_dir`` (taken by :func:`lock_folder`) and remove the lock file; a
    no-op without one."""
    held = _HELD.pop(out_dir.resolve(), None)
    if held is None or held[0] != os.getpid():
        return
    with contextlib.suppress(OSError):
        (out_dir / LOCK).unlink()
    os.close(held[1])


def open_run(out_dir: Path, config: dict, resume: bool, keys: Collection[str], defaults: dict,
             flags: dict[str, str], world_size: int = 1) -> dict | None:
    """Lock ``out_dir`` for a run with ``config`` (a dict of its fields) and check it; return the checkpoint's
    state to continue from (``None`` for a new run). The caller writes ``config.json`` once the run has started
    (:func:`write_config`) and unlocks the folder when it ends (:func:`unlock_folder`).

    The folder is created and locked (:func:`lock_folder`; another run there is refused). Without ``resume`` a
    folder that already holds a checkpoint is refused (``FileExistsError``). With it, the newest readable
    checkpoint (a dict holding ``keys``) is read and its configuration (:func:`check_config`) and number of
    processes (``world_size``, :func:`check_world_size`) checked. When that is ``checkpoint.previous.pt``
    because ``checkpoint.pt`` is damaged, the damaged file is set aside as ``checkpoint.pt.damaged``, so that the
    next checkpoint keeps the good one as the previous one. On a refusal the folder is unlocked, and nothing
    else is written into it.
    """
    make_folder(out_dir)
    lock_folder(out_dir)
    try:
        found = read_checkpoint(out_dir, keys) if resume else None
        if found is not None:
            check_config(found[0], found[1], config, defaults, flags)
            check_world_size(found[0], found[1], world_size)
        elif not resume and any((out_dir / name).exists() for name in (CHECKPOINT, PREVIOUS)):
            raise FileExistsError(f"{out_dir} already holds a run; pass {RESUME} to continue it or choose another "
                                  f"output folder ({OUT})")
    except BaseException:
        unlock_folder(out_dir)
        raise
    if found is not None and found[1].name == PREVIOUS and (out_dir / CHECKPOINT).exists():
        os.replace(out_dir / CHECKPOINT, out_dir / (CHECKPOINT + ".damaged"))
    return None if found is None else found[0]


def write_config(config: dict, out_dir: Path) -> None:
    """Write the run's configuration as ``out_dir/config.json`` (atomically)."""
    write_text(json.dumps(config, indent=2), out_dir / CONFIG)
