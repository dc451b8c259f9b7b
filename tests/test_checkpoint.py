"""A run's output folder when things go wrong: damaged checkpoints, a changed configuration, an output folder that
cannot be written, a disk that fills. Each case ends with one clear message (checked here), loses nothing that
was saved, and leaves no ``.tmp`` file."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import ella.checkpoint as checkpoint_module
from ella.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError, OutputError, read_checkpoint
from ella.train import Trainer, train
from test_cli import run_cifar10
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
    assert f"cannot resume: {out / CHECKPOINT} cannot be read" in err and "choose another --out" in err
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
    del state["config"]  # as written before checkpoints recorded their configuration
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(CheckpointError, match="config.json is missing; restore that file or choose another --out"):
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
    assert f"cannot create the output folder {out} (--out): {tmp_path / 'notes'} is a file, not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; this needs a regular user")
def test_read_only_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write {out / 'config.json'}: Permission denied"):
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
    assert "run the same command with --resume" in str(error.value)
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train(config, out, resume=True)["test"] == reference["test"]
    assert _rows(out) == _rows(tmp_path / "reference")
