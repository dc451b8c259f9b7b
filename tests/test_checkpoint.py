"""A run's output folder when things go wrong: damaged checkpoints, a changed configuration, an output folder that
cannot be written, a disk that fills, two runs on one folder, a resume on other data. Each case ends with one
clear message (checked here), loses nothing that was saved, and leaves no ``.tmp`` file. Also when checkpoints
are written (by time, with a fake clock) and that the metrics files are appended to."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ella.checkpoint as checkpoint_module
import ella.train as train_module
from ella.checkpoint import CHECKPOINT, LOCK, PREVIOUS, CheckpointError, OutputError, open_run, read_checkpoint
from ella.train import Interrupted, Trainer, train
from test_cli import REPO, run_cifar10
from test_train import _Interrupt, _raise_in_epoch, _tiny_config, _without_timing, _write_tiny_cifar


def _rows(out: Path) -> list[dict]:
    return _without_timing([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(os.urandom(2048))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_checkpoint_without_an_earlier_one_is_a_clear_error(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1, "model": {}}, out / CHECKPOINT)
    _damage(out / CHECKPOINT, how)
    with pytest.raises(CheckpointError, match=f"{out / CHECKPOINT} cannot be read .*no earlier checkpoint"):
        read_checkpoint(out, keys=("epoch", "model"))
    # the command says so before it loads any data or writes anything, and says how to start again
    code, err = run_cifar10(["--layer", "conv", "--out", str(out), "--resume", "--data-dir", str(tmp_path / "none")],
                            monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"cannot resume: {out / CHECKPOINT} cannot be read" in err
    assert "choose another output folder (--out, out_dir= in Python)" in err
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]


def test_resume_continues_from_the_previous_checkpoint_when_the_last_is_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=3)
    train(config, tmp_path / "reference")
    out = tmp_path / "run"
    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, out)  # checkpoint.pt holds epoch 2, checkpoint.previous.pt epoch 1
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert torch.load(out / PREVIOUS, weights_only=False)["epoch"] == 1
    _damage(out / CHECKPOINT, "truncated")
    with caplog.at_level("WARNING", logger="ella.checkpoint"):
        trainer = Trainer(config, out, resume=True)
    assert f"{out / CHECKPOINT} cannot be read" in caplog.text
    assert f"continuing from {out / PREVIOUS} (epoch 1)" in caplog.text
    assert trainer.epoch == 1
    assert (out / (CHECKPOINT + ".damaged")).is_file() and not (out / CHECKPOINT).exists()
    trainer.run()
    assert torch.load(out / PREVIOUS, weights_only=False)["epoch"] == 2  # rotated as usual from here on
    assert _rows(out) == _rows(tmp_path / "reference")  # epochs 2 and 3 again, bit for bit


def test_resume_checks_the_configuration_before_it_writes_anything(tmp_path: Path) -> None:
    """config.json deleted, then --resume with another layer: refused from the checkpoint's own record, and
    config.json is not rewritten; a checkpoint too old to hold one needs config.json."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=1, laplace=False)
    out = tmp_path / "run"
    train(config, out)
    (out / "config.json").unlink()
    before = (out / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=r"different configuration than .*checkpoint.pt: layer: 'conv' saved, 'fc' now"):
        train(replace(config, layer="fc"), out, resume=True)
    with pytest.raises(ValueError, match=r"lr \(--lr\): 0.01 saved, 0.5 now"):
        train(replace(config, lr=0.5), out, resume=True)
    assert not (out / "config.json").exists() and (out / CHECKPOINT).read_bytes() == before

    state = torch.load(out / CHECKPOINT, weights_only=False)
    del state["config"], state["checksum"]  # as written before checkpoints recorded their configuration
    torch.save(state, out / CHECKPOINT)
    missing = r"config.json is missing; restore that file or choose another output folder \(--out, out_dir= in Python\)"
    with pytest.raises(CheckpointError, match=missing):
        train(config, out, resume=True)
    (out / "config.json").write_text(json.dumps(asdict(config)))
    assert train(config, out, resume=True)["epochs"] == 1
    with pytest.raises(ValueError, match="layer: 'conv' saved, 'fc' now"):  # now checked against config.json
        train(replace(config, layer="fc"), out, resume=True)


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_output_folder_that_is_not_a_folder_is_a_clear_error(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes").write_text("a file")
    out = tmp_path / "notes" / "run" if where == "under a file" else tmp_path / "notes"
    code, err = run_cifar10(["--layer", "conv", "--out", str(out), "--data-dir", str(tmp_path / "none")],
                            monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert (f"cannot create the output folder {out} (--out, out_dir= in Python): {tmp_path / 'notes'} is a file, "
            "not a folder") in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; this needs a regular user")
def test_read_only_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write {out / LOCK}: Permission denied"):  # the first file
            train(_tiny_config(tmp_path / "data"), out)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
     (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "(a full disk? ")],
)
def test_disk_full_at_a_checkpoint_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception, reason: str
) -> None:
    """The disk fills while the checkpoint of epoch 2 is written (as an OSError, or as torch.save's RuntimeError):
    one message naming the file, no .tmp left, and --resume later continues from epoch 1 to the same result."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=3)
    reference = train(config, tmp_path / "reference")
    real_save = torch.save

    def fills_at_epoch_2(state: dict, path: Path) -> None:
        if state["epoch"] == 2:
            Path(path).write_bytes(b"partial")
            raise failure
        real_save(state, path)

    monkeypatch.setattr(checkpoint_module.torch, "save", fills_at_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(OutputError) as error:
        train(config, out)
    assert str(error.value).startswith(f"cannot write {out / CHECKPOINT}: ") and reason in str(error.value)
    assert "then run it again with --resume (resume=True in Python)" in str(error.value)
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train(config, out, resume=True)["test"] == reference["test"]
    assert _rows(out) == _rows(tmp_path / "reference")


# ----------------------------------------------------------------------------------------------------------
# one run per folder
# ----------------------------------------------------------------------------------------------------------
def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that locks ``out`` (as a run does when it starts) and keeps it until killed."""
    code = ("import sys, time; from pathlib import Path; from ella.checkpoint import lock_folder; "
            "lock_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_runs_lock_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 30, first row: two runs on one --out. The second is refused naming the folder and the process that
    holds it, and writes nothing there; once that process is killed (its lock file left behind), a run starts."""
    data = _write_tiny_cifar(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        code, err = run_cifar10(["--layer", "conv", "--out", str(out), "--data-dir", str(data)], monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err
        assert (f"error: {out} (--out, out_dir= in Python) is in use by another run (process {holder.pid} on "
                f"{socket.gethostname()}, started 20") in err
        assert "wait until it ends, or choose another output folder" in err
        assert [p.name for p in out.iterdir()] == [LOCK]  # no config.json
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).is_file()  # left by the killed process: it does not block
    final = train(_tiny_config(data, epochs=1, laplace=False), out)
    assert final["epochs"] == 1 and not (out / LOCK).exists()  # released when the run ends


def test_a_run_refused_after_it_locked_its_folder_leaves_nothing_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code, err = run_cifar10(["--layer", "conv", "--out", str(out), "--data-dir", str(tmp_path / "none")],
                            monkeypatch, capsys)
    assert code == 2 and "Could not find CIFAR-10" in err
    assert list(out.iterdir()) == []  # neither config.json nor the lock
    train(_tiny_config(_write_tiny_cifar(tmp_path / "data"), epochs=1, laplace=False), out)  # not "in use"


def test_a_folder_that_holds_a_run_is_refused_naming_the_choices_in_python_and_on_the_command_line(
    tmp_path: Path
) -> None:
    """A second ``ella.learn(..., out_dir=out)`` (or command) on a folder that holds a run is told how to go on in
    both spellings: the message once named only the flags, which a library user does not pass."""
    (tmp_path / CHECKPOINT).write_bytes(b"")
    with pytest.raises(FileExistsError) as error:
        open_run(tmp_path, {}, resume=False, keys=(), defaults={}, flags={})
    assert str(error.value) == (f"{tmp_path} already holds a run; pass --resume (resume=True in Python) to continue "
                                "it or choose another output folder (--out, out_dir= in Python)")
    assert not (tmp_path / LOCK).exists()  # unlocked again


# ----------------------------------------------------------------------------------------------------------
# a resume continues only the run that was started
# ----------------------------------------------------------------------------------------------------------
def test_resume_on_other_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30, first table: ``--resume`` after ELLA_DATA was pointed at other data is refused, naming the data
    that differ; pointed back, the run continues."""
    _write_tiny_cifar(tmp_path / "a")
    other = _write_tiny_cifar(tmp_path / "b")
    with np.load(other / "cifar10.npz") as arrays:
        np.savez(other / "cifar10.npz", **{**arrays, "x_train": 255 - arrays["x_train"]})  # the same test images
    monkeypatch.setenv("ELLA_DATA", str(tmp_path / "a"))
    config = replace(_tiny_config(tmp_path / "a", epochs=2, laplace=False), data_dir=None)
    out = tmp_path / "run"
    _raise_in_epoch(monkeypatch, 2, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, out)
    monkeypatch.undo()
    monkeypatch.setenv("ELLA_DATA", str(other))
    before = (out / "config.json").read_bytes()
    with pytest.raises(ValueError, match=rf"^--resume \(resume=True in Python\) on other data than the run in "
                                         rf"{out} was trained on: the training and validation data differ .*ELLA_DATA"):
        train(config, out, resume=True)
    assert (out / "config.json").read_bytes() == before and not (out / LOCK).exists()
    monkeypatch.setenv("ELLA_DATA", str(tmp_path / "a"))
    assert train(config, out, resume=True)["epochs"] == 2


def test_a_run_resumes_from_a_copy_of_its_data_in_another_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--data-dir may change on --resume (the data moved to a scratch disk, say): the data fingerprints, not the
    folder's name, decide whether they are the run's; other data in the new folder are refused."""
    _write_tiny_cifar(tmp_path / "a")
    config = _tiny_config(tmp_path / "a", epochs=2, laplace=False)
    out = tmp_path / "run"
    _raise_in_epoch(monkeypatch, 2, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, out)
    monkeypatch.undo()
    other = _write_tiny_cifar(tmp_path / "other")
    with np.load(other / "cifar10.npz") as arrays:
        np.savez(other / "cifar10.npz", **{**arrays, "x_train": 255 - arrays["x_train"]})
    with pytest.raises(ValueError, match="on other data than the run"):
        train(replace(config, data_dir=str(other)), out, resume=True)
    moved = tmp_path / "scratch" / "data"
    shutil.copytree(tmp_path / "a", moved)
    assert train(replace(config, data_dir=str(moved)), out, resume=True)["epochs"] == 2


def _flip_bits_in_a_tensor(path: Path) -> None:
    """Flip a few bits inside the largest tensor's stored bytes (torch.load does not check the zip's CRC)."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(raw[member.header_offset + k: member.header_offset + k + 2], "little")
                                 for k in (26, 28))
    start = member.header_offset + 30 + name_length + extra_length
    for offset in (3, 101, 202):
        raw[start + offset] ^= 0b00010000
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_flipped_bits_is_treated_as_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 30, first table: a few flipped bits in checkpoint.pt's tensors. It does not match its checksum, so
    the run continues from checkpoint.previous.pt with a warning naming the file, and ends as the uninterrupted
    one; without an earlier checkpoint, a clear error."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=3)
    train(config, tmp_path / "reference")
    out = tmp_path / "run"
    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, out)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    _flip_bits_in_a_tensor(out / CHECKPOINT)
    assert torch.load(out / CHECKPOINT, weights_only=False)["epoch"] == 2  # loads without complaint
    with caplog.at_level("WARNING", logger="ella.checkpoint"):
        train(config, out, resume=True)
    assert (f"{out / CHECKPOINT} does not match its checksum (damaged on disk); continuing from {out / PREVIOUS} "
            "(epoch 1)") in caplog.text
    assert _rows(out) == _rows(tmp_path / "reference")

    lone = tmp_path / "lone"
    lone.mkdir()
    (out / CHECKPOINT).rename(lone / CHECKPOINT)
    _flip_bits_in_a_tensor(lone / CHECKPOINT)
    with pytest.raises(CheckpointError, match=f"cannot resume: {lone / CHECKPOINT} does not match its checksum"):
        read_checkpoint(lone, keys=("epoch",))


# ----------------------------------------------------------------------------------------------------------
# when checkpoints are written, and the metrics files
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("save_seconds", "changes", "saved"),
    [
        (10.0, {}, [1, 4, 7, 8]),  # every 300 s (--checkpoint-minutes 5): 10 s of writing per 310 s
        (1.0, {}, [1, 2, 3, 4, 5, 6, 7, 8]),  # a cheap checkpoint: every 50 x 1 s, so every epoch of 100 s
        (10.0, {"checkpoint_minutes": 2.0}, [1, 3, 5, 7, 8]),
        (10.0, {"checkpoint_every": 3}, [3, 6, 8]),  # by epochs when asked
    ],
)
def test_checkpoints_by_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_seconds: float, changes: dict,
                             saved: list[int]) -> None:
    """A fake clock: every epoch takes 100 s, every checkpoint ``save_seconds``. By default a checkpoint is written
    after the first epoch, then when the last one is older than --checkpoint-minutes or than 50 times its write
    time, and after the last epoch."""
    written = _fake_clock(monkeypatch, save_seconds)
    config = _tiny_config(_write_tiny_cifar(tmp_path / "data"), epochs=8, laplace=False,
                          **{"checkpoint_every": None, **changes})
    train(config, tmp_path / "run")
    assert written == saved


def _fake_clock(monkeypatch: pytest.MonkeyPatch, save_seconds: float) -> list[int]:
    """Every epoch takes 100 s of the checkpoints' clock, every checkpoint ``save_seconds``; returns the list of
    the epochs saved, filled as the run goes."""
    now = [0.0]
    monkeypatch.setattr(train_module, "_clock", lambda: now[0])
    original_epoch, original_save = Trainer.train_epoch, train_module.save_checkpoint
    written: list[int] = []

    def epoch(self) -> float:
        now[0] += 100.0
        return original_epoch(self)

    def save(state: dict, out_dir: Path) -> None:
        now[0] += save_seconds
        written.append(state["epoch"])
        original_save(state, out_dir)

    monkeypatch.setattr(Trainer, "train_epoch", epoch)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    return written


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler during the test, as in a terminal; the inherited one afterwards. A process
    started from a background shell (``cmd &``) inherits SIGINT ignored, and a run leaves an ignored Ctrl-C alone."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize(("signals", "message", "saved"), [
    (1, "interrupted after epoch 3 of 8; the checkpoint in {out} holds epoch 3", [1, 3]),
    (2, "interrupted in epoch 3 of 8; the checkpoint in {out} holds epoch 1", [1]),
])
def test_ctrl_c_stops_after_the_epoch_in_progress_once_it_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signals: int, message: str, saved: list[int], python_ctrl_c: None
) -> None:
    """By time (100 s epochs, 10 s checkpoints) epochs 2 and 3 would not be saved. Ctrl-C in epoch 3 lets that
    epoch end, saves it and stops, and the resumed run ends as the uninterrupted one; a second Ctrl-C stops at
    once, losing the epochs since the last checkpoint."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=8, laplace=False, checkpoint_every=None)
    train(config, tmp_path / "reference")
    written = _fake_clock(monkeypatch, save_seconds=10.0)
    timed_epoch = Trainer.train_epoch

    def ctrl_c_in_epoch_3(self) -> float:
        if self.epoch == 2:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return timed_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_epoch_3)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stop:
        train(config, out)
    assert str(stop.value) == message.format(out=out) and written == saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    monkeypatch.setattr(Trainer, "train_epoch", timed_epoch)
    train(config, out, resume=True)
    assert _rows(out) == _rows(tmp_path / "reference")


def test_metrics_are_appended_and_a_resume_drops_the_rows_after_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process writes the metrics files whole once (and again when the first round adds its column), then
    appends one row per epoch; a run interrupted in epoch 5 with the checkpoint of epoch 3 holds rows 1-4, and
    its resume computes epoch 4 again without repeating its row: both files end as the uninterrupted run's."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, epochs=6, burn_in=4, marglik_every=2, checkpoint_every=3)
    train(config, tmp_path / "reference")
    whole, appended = [], []
    real_write, real_append = train_module.write_text, train_module.append_text
    monkeypatch.setattr(train_module, "write_text",
                        lambda text, path: (whole.append(path.name), real_write(text, path)))
    monkeypatch.setattr(train_module, "append_text",
                        lambda text, path: (appended.append(path.name), real_append(text, path)))
    out = tmp_path / "run"
    original = _raise_in_epoch(monkeypatch, 5, _Interrupt)
    with pytest.raises(_Interrupt):
        train(config, out)
    assert [row["epoch"] for row in _rows(out)] == [1, 2, 3, 4]
    assert whole.count("metrics.jsonl") == 2 and appended.count("metrics.jsonl") == 2  # epoch 1, 4 (round); 2, 3
    monkeypatch.setattr(Trainer, "train_epoch", original)
    whole.clear(), appended.clear()
    train(config, out, resume=True)
    assert whole.count("metrics.jsonl") == whole.count("metrics.csv") == 1  # epoch 4: rows 1-3 and 4
    assert appended.count("metrics.jsonl") == appended.count("metrics.csv") == 2  # epochs 5, 6
    assert _rows(out) == _rows(tmp_path / "reference")
    assert _csv_without_timing(out) == _csv_without_timing(tmp_path / "reference")


def _csv_without_timing(out: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name != "seconds"]
    return [[row[i] for i in keep] for row in rows]
