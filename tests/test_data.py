"""Tests for ella.data: readers (shared npz + torchvision layouts), variants, splits, augmentation, loader."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ella import data as D

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = torch.tensor([125.3, 123.0, 113.9], dtype=torch.float64).view(1, 3, 1, 1) / 255
CIFAR_STD = torch.tensor([63.0, 62.1, 66.7], dtype=torch.float64).view(1, 3, 1, 1) / 255


# ---------------------------------------------------------------------------------------------------- helpers
def tiny_mnist(n_train: int = 40, n_test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), (np.arange(n_train) % 10).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), (np.arange(n_test) % 10).astype(np.uint8))


def tiny_cifar(n_train: int = 50, n_test: int = 10, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), (np.arange(n_train) % 10).astype(np.uint8),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), (np.arange(n_test) % 10).astype(np.uint8))


def save_npz(path: Path, arrays, **extra) -> None:
    np.savez_compressed(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)), **extra)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape) + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_torchvision(root: Path, arrays, compress: bool) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name, arr in zip(names, arrays):
        write_idx(raw / name, arr, compress)


def write_cifar_torchvision(root: Path, arrays) -> None:
    """The official files' structure: dicts with str keys (the Python 2 pickles load so), plus batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x_tr, y_tr, x_te, y_te = arrays
    chunks = np.array_split(np.arange(len(x_tr)), 5)
    parts = [(f"data_batch_{i + 1}", x_tr[c], y_tr[c]) for i, c in enumerate(chunks)] + [("test_batch", x_te, y_te)]
    for name, x, y in parts:
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # CHW, row-major, as in the official files
        batch = {"batch_label": name, "data": flat, "labels": [int(v) for v in y]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_fixture_checksums(monkeypatch, root: Path) -> None:
    """Make torchvision expect the MD5s of the tiny fixture files instead of the official ones.

    The fixtures cannot match the official checksums, so this registers the checksums of the files as written;
    torchvision's integrity checks then run for real: a file changed afterwards fails them.
    """
    import torchvision.datasets as tvd

    raw = root / "MNIST" / "raw"
    if raw.is_dir():
        resources = [(f"{name}.gz", md5_of(raw / f"{name}.gz") if (raw / f"{name}.gz").is_file() else "none")
                     for name in D.readers.MNIST_FILES]
        monkeypatch.setattr(tvd.MNIST, "resources", resources)
    folder = root / "cifar-10-batches-py"
    if folder.is_dir():
        monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5_of(folder / f"data_batch_{i}")]
                                                        for i in range(1, 6)])
        monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5_of(folder / "test_batch")]])
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5_of(folder / "batches.meta")}
        monkeypatch.setattr(tvd.CIFAR10, "meta", meta)


def mnist_expected(x_u8: np.ndarray) -> torch.Tensor:
    """Independent float64 reference: (x/255 - mean)/std, bilinear resize 28 -> 32."""
    x = torch.from_numpy(x_u8).double().unsqueeze(1) / 255
    return F.interpolate((x - MNIST_MEAN) / MNIST_STD, size=(32, 32), mode="bilinear", align_corners=False)


def cifar_expected(x_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x_u8).double().permute(0, 3, 1, 2) / 255
    return (x - CIFAR_MEAN) / CIFAR_STD


# ---------------------------------------------------------------------------------------------------- locating
def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ELLA_DATA", str(tmp_path / "env"))
    assert D.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert D.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("ELLA_DATA")
    assert D.resolve_data_dir(None) == Path("data")


def test_missing_dataset_lists_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("ELLA_DATA", raising=False)
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str((tmp_path / "mnist.npz").resolve()) in msg
    assert str((tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").resolve()) in msg
    assert "ELLA_DATA" in msg and "--data-dir" in msg and "--download" in msg
    assert "download=True to ella.data.load_dataset" in msg
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_dataset("rotated_cifar10", tmp_path / "nowhere")
    assert str((tmp_path / "nowhere" / "cifar10.npz").resolve()) in str(err.value)
    assert "cifar-10-batches-py" in str(err.value) and "does not exist" in str(err.value)


def test_missing_jpeg_test_set(tmp_path):
    save_npz(tmp_path / "cifar10.npz", tiny_cifar())
    with pytest.raises(D.DatasetNotFoundError, match="cifar10_test10k_jpeg.npz") as err:
        D.read_cifar10(tmp_path, cifar_test="jpeg10k")
    msg = str(err.value)
    assert "--cifar-test jpeg10k needs" in msg and "use --cifar-test exact" in msg and "cifar_test" not in msg
    assert "--download" not in msg  # torchvision cannot download this file
    with pytest.raises(ValueError, match=r"--cifar-test must be one of auto, exact, jpeg10k, got 'jpeg'"):
        D.read_cifar10(tmp_path, cifar_test="jpeg")


# ---------------------------------------------------------------------------------------------------- readers
def test_mnist_npz_roundtrip(tmp_path, monkeypatch):
    arrays = tiny_mnist()
    save_npz(tmp_path / "mnist.npz", arrays)
    for got, want in zip(D.read_mnist(tmp_path), arrays):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.uint8
    monkeypatch.setenv("ELLA_DATA", str(tmp_path))  # found through the environment variable
    b = D.load_dataset("mnist", n_valid=4)
    assert b.train[0].shape == (36, 1, 32, 32) and b.train[0].dtype == torch.float32
    assert (b.n_classes, b.in_channels, b.augment) == (10, 1, None)
    ref = mnist_expected(arrays[0])
    torch.testing.assert_close(b.train[0].double(), ref[b.train_index], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.valid[0].double(), ref[b.valid_index], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.test[0].double(), mnist_expected(arrays[2]), atol=1e-5, rtol=0)
    assert torch.equal(b.train[1], torch.from_numpy(arrays[1]).long()[b.train_index])
    assert b.train[1].dtype == torch.int64


def test_cifar_npz_roundtrip_and_jpeg_choice(tmp_path):
    arrays = tiny_cifar()
    save_npz(tmp_path / "cifar10.npz", arrays, label_names=np.array([f"c{i}" for i in range(10)]))
    rng = np.random.default_rng(5)
    x_jpeg = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y_jpeg = (np.arange(20) % 10).astype(np.uint8)
    np.savez(tmp_path / "cifar10_test10k_jpeg.npz", x_test=x_jpeg, y_test=y_jpeg)
    for got, want in zip(D.read_cifar10(tmp_path, cifar_test="exact"), arrays):
        np.testing.assert_array_equal(got, want)
    b = D.load_dataset("cifar10", tmp_path, n_valid=5, cifar_test="exact")
    torch.testing.assert_close(b.train[0].double(), cifar_expected(arrays[0])[b.train_index], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.test[0].double(), cifar_expected(arrays[2]), atol=1e-5, rtol=0)
    assert b.augment is D.cifar_augment and b.in_channels == 3
    bj = D.load_dataset("cifar10", tmp_path, n_valid=5, cifar_test="jpeg10k")
    torch.testing.assert_close(bj.test[0].double(), cifar_expected(x_jpeg), atol=1e-5, rtol=0)
    assert torch.equal(bj.train[0], b.train[0]) and "jpeg" in bj.info["test_source"]
    auto = D.load_dataset("cifar10", tmp_path, n_valid=5)  # 10 exact test images only: the JPEG copies
    assert torch.equal(auto.test[0], bj.test[0]) and auto.info["test_source"] == bj.info["test_source"]


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_torchvision_idx_roundtrip(tmp_path, monkeypatch, compress):
    arrays = tiny_mnist()
    write_mnist_torchvision(tmp_path, arrays, compress)
    trust_fixture_checksums(monkeypatch, tmp_path)
    for got, want in zip(D.read_mnist(tmp_path), arrays):
        np.testing.assert_array_equal(got, want)
    # a .gz is decompressed beside itself, as torchvision's download does, and nothing half-written is left
    raw = sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir())
    assert raw == sorted(D.readers.MNIST_FILES + tuple(f"{n}.gz" for n in D.readers.MNIST_FILES) * compress)
    b = D.load_dataset("mnist", tmp_path, n_valid=0)
    torch.testing.assert_close(b.train[0].double(), mnist_expected(arrays[0]), atol=1e-5, rtol=0)


def test_damaged_idx_files_are_reported_by_name(tmp_path):
    write_mnist_torchvision(tmp_path, tiny_mnist(), compress=False)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(struct.pack(">IIII", 2051, 3, 28, 28) + b"\0" * 10)  # the header promises more than it holds
    with pytest.raises(ValueError, match=r"shape '\[3, 28, 28\]' is invalid") as err:
        D.read_mnist(tmp_path)
    assert str(images) in str(err.value) and "damaged" in str(err.value)
    floats = np.zeros((3, 28, 28), ">f4")
    images.write_bytes(struct.pack(">IIII", 0x0D03, 3, 28, 28) + floats.tobytes())  # a valid IDX of float32
    with pytest.raises(ValueError, match="not IDX files of unsigned bytes.*torch.float32"):
        D.read_mnist(tmp_path)
    images.write_text("<html>an error page saved under the data's name</html>")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*damaged"):
        D.read_mnist(tmp_path)


def test_mnist_gz_failing_its_checksum_is_not_decompressed(tmp_path, monkeypatch):
    write_mnist_torchvision(tmp_path, tiny_mnist(), compress=True)
    trust_fixture_checksums(monkeypatch, tmp_path)
    gz = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gz.read_bytes())
    data[-12] ^= 0xFF  # inside the compressed stream
    gz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match torchvision's MD5 checksum") as err:
        D.read_mnist(tmp_path)
    assert str(gz) in str(err.value)
    assert not (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()


def test_mnist_gz_that_cannot_be_decompressed_in_place(tmp_path, monkeypatch):
    write_mnist_torchvision(tmp_path, tiny_mnist(), compress=True)
    trust_fixture_checksums(monkeypatch, tmp_path)
    blocker = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    blocker.mkdir()  # a folder where the decompressed file must go (as good as a read-only folder, even for root)
    with pytest.raises(D.DatasetNotFoundError, match="cannot decompress .*train-labels-idx1-ubyte.gz") as err:
        D.read_mnist(tmp_path)
    assert "--data-dir" in str(err.value)
    assert not any(p.name.endswith(".tmp") for p in blocker.parent.iterdir())


def test_cifar_torchvision_pickle_roundtrip_and_hwc(tmp_path, monkeypatch):
    arrays = list(tiny_cifar())
    marker = np.zeros((32, 32, 3), np.uint8)
    marker[0, 1, 2] = 255  # row 0, column 1, blue: CHW flat position 2*1024 + 0*32 + 1
    arrays[0][0] = marker
    write_cifar_torchvision(tmp_path, arrays)
    trust_fixture_checksums(monkeypatch, tmp_path)
    flat = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())["data"][0]
    assert flat[2 * 1024 + 1] == 255 and flat.sum() == 255  # the file really is CHW row-major
    got = D.read_cifar10(tmp_path)
    for g, w in zip(got, arrays):
        np.testing.assert_array_equal(g, w)
    b = D.load_dataset("cifar10", tmp_path, n_valid=0)
    img = b.train[0][0] * torch.tensor(D.CIFAR10_STD).view(3, 1, 1) + torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    assert (img > 0.5).nonzero().tolist() == [[2, 0, 1]]
    torch.testing.assert_close(b.test[0].double(), cifar_expected(arrays[2]), atol=1e-5, rtol=0)


class _MakesFolderWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_cifar_file_failing_its_checksum_is_reported_and_never_unpickled(tmp_path, monkeypatch):
    write_cifar_torchvision(tmp_path, tiny_cifar())
    folder = tmp_path / "cifar-10-batches-py"
    # not the official files: every one fails torchvision's checksums, and the message lists them
    with pytest.raises(ValueError, match="do not match torchvision's MD5 checksums") as err:
        D.read_cifar10(tmp_path)
    assert "'data_batch_1'" in str(err.value) and "'batches.meta'" in str(err.value)
    assert "--download" in str(err.value) and str(folder) in str(err.value)

    trust_fixture_checksums(monkeypatch, tmp_path)
    touched = tmp_path / "unpickled"
    payload = pickle.dumps({"data": _MakesFolderWhenUnpickled(touched)})
    pickle.loads(payload)  # the payload is live: unpickling it makes the folder
    assert touched.is_dir()
    touched.rmdir()
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=r"\['test_batch'\] do not match torchvision's MD5 checksums"):
        D.read_cifar10(tmp_path)
    assert not touched.exists()


def test_official_test_batch_beside_a_small_npz_is_the_test_set(tmp_path, monkeypatch, caplog):
    """A cifar10.npz with few exact test images next to torchvision's checked test_batch: auto and exact take
    the test_batch's images (not the JPEG copies, not the npz's few); the training images stay the npz's."""
    small = tiny_cifar(n_test=10)
    save_npz(tmp_path / "cifar10.npz", small)
    official = tiny_cifar(n_test=30, seed=2)
    write_cifar_torchvision(tmp_path, official)
    jpeg = tiny_cifar(n_test=20, seed=3)
    np.savez(tmp_path / "cifar10_test10k_jpeg.npz", x_test=jpeg[2], y_test=jpeg[3])
    trust_fixture_checksums(monkeypatch, tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    for mode in ("auto", "exact"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ella.data"):
            arrays, source = D.read_cifar10_with_source(tmp_path, cifar_test=mode)
        for got, want in zip(arrays, (*small[:2], *official[2:])):
            np.testing.assert_array_equal(got, want)
        assert source == "exact (30 official test images)" and f"read from {test_batch}" in caplog.text
    np.testing.assert_array_equal(D.read_cifar10(tmp_path, cifar_test="jpeg10k")[2], jpeg[2])  # asked for
    test_batch.write_bytes(test_batch.read_bytes()[:-1])  # no longer the file whose checksum is trusted
    with pytest.raises(ValueError, match="does not match torchvision's MD5 checksum of the official CIFAR-10 "
                                         "test_batch") as err:
        D.read_cifar10(tmp_path)
    assert str(test_batch) in str(err.value)


def test_mnist_reads_the_raw_files_not_a_legacy_processed_copy(tmp_path, caplog):
    """torchvision's MNIST class would read MNIST/processed/*.pt where they exist: the raw IDX files win, and the
    warning names the processed copy as ignored."""
    arrays = tiny_mnist()
    write_mnist_torchvision(tmp_path, arrays, compress=False)
    stale = tiny_mnist(n_train=20, n_test=5, seed=3)
    (tmp_path / "MNIST" / "processed").mkdir()
    for name, x, y in (("training.pt", *stale[:2]), ("test.pt", *stale[2:])):
        torch.save((torch.from_numpy(x), torch.from_numpy(y).long()), tmp_path / "MNIST" / "processed" / name)
    with caplog.at_level(logging.WARNING, logger="ella.data"):
        got = D.read_mnist(tmp_path)
    for g, w in zip(got, arrays):
        np.testing.assert_array_equal(g, w)
    assert f"ignoring {tmp_path / 'MNIST' / 'processed'}" in caplog.text


def test_log_names_the_files_read_and_warns_about_ignored_copies(tmp_path, monkeypatch, caplog):
    save_npz(tmp_path / "mnist.npz", tiny_mnist())
    write_mnist_torchvision(tmp_path, tiny_mnist(n_train=20, seed=4), compress=False)
    save_npz(tmp_path / "cifar10.npz", tiny_cifar())
    write_cifar_torchvision(tmp_path, tiny_cifar(seed=4))
    trust_fixture_checksums(monkeypatch, tmp_path)
    with caplog.at_level(logging.INFO, logger="ella.data"):
        assert len(D.read_mnist(tmp_path)[0]) == 40
        D.read_cifar10(tmp_path)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if "more than one format" in r.getMessage()]
    npz, raw, folder = tmp_path / "mnist.npz", tmp_path / "MNIST" / "raw", tmp_path / "cifar-10-batches-py"
    assert f"MNIST: training images read from {npz}, test images from {npz}" in infos
    assert f"CIFAR-10: training images read from {tmp_path / 'cifar10.npz'}" in infos
    assert len(warnings) == 2
    assert f"reading {npz}, ignoring {raw} " in warnings[0]
    assert f"reading {tmp_path / 'cifar10.npz'}, ignoring {folder / 'data_batch_1..5'} " in warnings[1]


def test_test_set_descriptions_say_the_real_count_and_source(tmp_path, monkeypatch):
    save_npz(tmp_path / "cifar10.npz", tiny_cifar())
    x_jpeg = np.random.default_rng(5).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_test10k_jpeg.npz", x_test=x_jpeg, y_test=(np.arange(20) % 10).astype(np.uint8))
    b = D.load_dataset("cifar10", tmp_path, n_valid=5, cifar_test="jpeg10k")
    assert b.info["test_source"] == "jpeg10k (20 lossy JPEG copies, non-official order)"
    save_npz(tmp_path / "mnist.npz", tiny_mnist(n_test=10))
    assert D.load_dataset("mnist", tmp_path, n_valid=4).info["test_source"] == "10 test images from mnist.npz"
    raw_only = tmp_path / "raw"
    write_mnist_torchvision(raw_only, tiny_mnist(n_test=20), compress=False)
    assert (D.load_dataset("mnist", raw_only, n_valid=4).info["test_source"]
            == "20 test images from MNIST/raw/t10k-images-idx3-ubyte")


def test_binarised_uint8_images_are_refused(tmp_path):
    """Images saved as uint8 0/1 (``x > 127``) would normalise to near-blank inputs: a clear error instead."""
    x_tr, y_tr, x_te, y_te = tiny_mnist()
    save_npz(tmp_path / "mnist.npz", ((x_tr > 127).astype(np.uint8), y_tr, x_te, y_te))
    with pytest.raises(ValueError, match=r"x_train.*look like 0/1 .*expects uint8 pixels from 0 to 255.*\* 255"):
        D.read_mnist(tmp_path)
    x_tr[:] = 0
    x_tr[:, 3, 3] = 2  # a faint image, but 0-255 pixels
    save_npz(tmp_path / "mnist.npz", (x_tr, y_tr, x_te, y_te))
    assert D.read_mnist(tmp_path)[0].max() == 2


def test_bad_npz_gives_clear_errors(tmp_path):
    x_tr, y_tr, x_te, y_te = tiny_mnist()
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te)
    with pytest.raises(ValueError, match="y_test"):
        D.read_mnist(tmp_path)
    save_npz(tmp_path / "mnist.npz", (x_tr[:, :, :27], y_tr, x_te, y_te))
    with pytest.raises(ValueError, match=r"shape \(N, 28, 28\)"):
        D.read_mnist(tmp_path)
    save_npz(tmp_path / "mnist.npz", (x_tr.astype(np.float32), y_tr, x_te, y_te))
    with pytest.raises(ValueError, match="uint8"):
        D.read_mnist(tmp_path)
    save_npz(tmp_path / "mnist.npz", (x_tr, y_tr[:-1], x_te, y_te))
    with pytest.raises(ValueError, match="labels"):
        D.read_mnist(tmp_path)
    save_npz(tmp_path / "cifar10.npz", tiny_mnist())
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        D.read_cifar10(tmp_path)


def test_damaged_or_foreign_npz_files_give_clear_errors(tmp_path):
    (tmp_path / "mnist.npz").write_text("an HTML error page saved under the data's name")
    with pytest.raises(ValueError, match="not an .npz archive"):
        D.read_mnist(tmp_path)
    x_tr, y_tr, x_te, y_te = tiny_mnist()
    np.savez_compressed(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    data = bytearray((tmp_path / "mnist.npz").read_bytes())
    data[100:400] = bytes(b ^ 0x5A for b in data[100:400])  # inside the first member's compressed bytes
    (tmp_path / "mnist.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged"):
        D.read_mnist(tmp_path)


def test_unknown_name_and_task(tmp_path):
    with pytest.raises(ValueError) as err:
        D.load_dataset("svhn", tmp_path)
    assert all(name in str(err.value) for name in D.DATASETS)
    save_npz(tmp_path / "mnist.npz", tiny_mnist())
    with pytest.raises(ValueError, match="digit_quadrant"):
        D.load_dataset("quadrant_mnist", tmp_path)
    with pytest.raises(ValueError, match="only applies"):
        D.load_dataset("mnist", tmp_path, task="digit")


def test_download_failure_and_success(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(self):
        calls.append(self.root)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(D.DatasetNotFoundError, match="download of mnist") as err:
        D.read_mnist(tmp_path / "dl", download=True)
    assert "--data-dir" in str(err.value) and len(calls) == 1
    with pytest.raises(D.DatasetNotFoundError):  # never downloads unless asked
        D.read_mnist(tmp_path / "dl2")
    assert len(calls) == 1

    arrays = tiny_mnist()

    def fake_download(self):  # what torchvision's download leaves behind: the .gz files and their contents
        calls.append(self.root)
        if not Path(self.raw_folder).is_dir():
            write_mnist_torchvision(Path(self.root), arrays, compress=True)
            write_mnist_torchvision(Path(self.root) / "copy", arrays, compress=False)
            for path in (Path(self.root) / "copy" / "MNIST" / "raw").iterdir():
                path.rename(Path(self.raw_folder) / path.name)

    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    for got, want in zip(D.read_mnist(tmp_path / "dl3", download=True), arrays):
        np.testing.assert_array_equal(got, want)
    assert len(calls) == 3  # once per split



def test_download_flag_reaches_the_readers(tmp_path, monkeypatch):
    import argparse

    import torchvision.datasets as tvd

    from ella.cli import add_training_arguments, config_from_args
    from ella.train import Trainer

    parser = argparse.ArgumentParser()
    add_training_arguments(parser, {"cpu": {}})
    empty = tmp_path / "empty"
    configs = {flag: config_from_args(parser.parse_args(["--data-dir", str(empty), "--device", "cpu", *flag]),
                                      {"cpu": {}}, layer="conv", dataset="mnist") for flag in ((), ("--download",))}
    assert [c.download for c in configs.values()] == [False, True]
    roots = []

    def offline(self):
        roots.append(self.root)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(D.DatasetNotFoundError, match="Could not find MNIST"):
        Trainer(configs[()], tmp_path / "run")
    assert roots == []
    with pytest.raises(D.DatasetNotFoundError, match="download of mnist into .* failed"):
        Trainer(configs[("--download",)], tmp_path / "run2")
    assert roots == [str(empty)]


# ---------------------------------------------------------------------------------------------------- image ops
def test_shift_images_matches_padded_slicing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 9, 7, generator=g, dtype=torch.float64)
    shifts = torch.tensor([[0, 0], [3, -2], [-9, 1], [8, 8], [-1, 6], [2, -7]])
    out = D.shift_images(x, shifts)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        ref = torch.zeros(2, 9 + 20, 7 + 20, dtype=torch.float64)
        ref[:, 10 + dy:10 + dy + 9, 10 + dx:10 + dx + 7] = x[n]
        assert torch.equal(out[n], ref[:, 10:19, 10:17]), (dy, dx)


@pytest.mark.parametrize("size", [7, 8])
def test_rotation_matches_rot90(size):
    x = torch.rand(3, 2, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    for angle, k in ((90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3), (0.0, 0)):
        out = D.rotate_images(x, torch.full((3,), angle))
        torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-12, rtol=0)


def test_rotation_per_sample_angles():
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = D.rotate_images(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------- variants
def one_pixel_digits(n: int) -> np.ndarray:
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 14, 13] = 255
    return x


def test_translated_moves_bright_pixel_by_recorded_shift():
    x = one_pixel_digits(60)
    v = D.make_variant("translated_mnist", x, np.arange(60) % 10, torch.Generator().manual_seed(4))
    shifts = v.params["shifts"]
    assert shifts.min() >= -8 and shifts.max() <= 8 and shifts.abs().max() == 8 and len(shifts.unique(dim=0)) > 30
    shifted = D.shift_images(torch.from_numpy(x).unsqueeze(1), shifts)
    pos = shifted.flatten(1).argmax(1)
    assert torch.equal(torch.stack([pos // 28, pos % 28], 1), torch.tensor([14, 13]) + shifts)
    rolled = np.stack([np.roll(x[i], tuple(s), axis=(0, 1)) for i, s in enumerate(shifts.tolist())])  # no wrap here
    torch.testing.assert_close(v.x.double(), mnist_expected(rolled), atol=1e-5, rtol=0)


def test_quadrant_placement_and_labels():
    n = 80
    x, digits = one_pixel_digits(n), np.arange(n) % 10
    vq = D.make_variant("quadrant_mnist", x, digits, torch.Generator().manual_seed(0), task="digit_quadrant")
    vd = D.make_variant("quadrant_mnist", x, digits, torch.Generator().manual_seed(0), task="digit")
    assert torch.equal(vq.x, vd.x) and torch.equal(vd.y, torch.from_numpy(digits).long())
    q = vq.params["quadrants"]
    assert torch.equal(vq.y, torch.from_numpy(digits).long() + 10 * q) and set(q.tolist()) == {0, 1, 2, 3}
    assert vq.x.shape == (n, 1, 32, 32)
    img = vq.x[:, 0] * MNIST_STD + MNIST_MEAN  # back to the 0-1 scale
    mass = torch.stack([img[:, :16, :16], img[:, :16, 16:], img[:, 16:, :16], img[:, 16:, 16:]], 1).sum((2, 3))
    assert torch.equal(mass.argmax(1), vq.y // 10)
    assert (mass.max(1).values > 0.1).all() and (mass.sum(1) - mass.max(1).values).abs().max() < 1e-6


def test_quadrant_tasks_share_images_and_subsets(tmp_path):
    save_npz(tmp_path / "mnist.npz", tiny_mnist(n_train=400))
    bq = D.load_dataset("quadrant_mnist", tmp_path, task="digit_quadrant", n_train=80, n_valid=40)
    bd = D.load_dataset("quadrant_mnist", tmp_path, task="digit", n_train=80, n_valid=40)
    assert torch.equal(bq.train[0], bd.train[0]) and torch.equal(bq.train[1] % 10, bd.train[1])
    assert bq.n_classes == 40 and bd.n_classes == 10
    assert bq.train[1].bincount(minlength=40).tolist() == [2] * 40  # stratified by digit + 10 * quadrant


def test_rotated_variant_angles_and_rendering():
    x = tiny_cifar(n_train=12)[0]
    v = D.make_variant("rotated_cifar10", x, np.arange(12) % 10, torch.Generator().manual_seed(0))
    angles = v.params["angles"]
    assert angles.dtype == torch.float64 and angles.min() >= -180 and angles.max() <= 180 and angles.std() > 30
    ref = D.rotate_images(torch.from_numpy(x).double().permute(0, 3, 1, 2) / 255, angles)
    torch.testing.assert_close(v.x.double(), (ref - CIFAR_MEAN) / CIFAR_STD, atol=1e-5, rtol=0)
    xq = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
    quarter = D.rotate_images(xq, torch.full((12,), 90.0))
    torch.testing.assert_close(quarter, torch.rot90(xq, 1, dims=(-2, -1)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["translated_mnist", "rotated_mnist", "quadrant_mnist"])
def test_variants_deterministic(tmp_path, name):
    save_npz(tmp_path / "mnist.npz", tiny_mnist(n_train=60))
    task = "digit_quadrant" if name == "quadrant_mnist" else None
    a = D.load_dataset(name, tmp_path, task=task, n_valid=6)
    b = D.load_dataset(name, tmp_path, task=task, n_valid=6)
    c = D.load_dataset(name, tmp_path, task=task, n_valid=6, variant_seed=1)
    plain = D.load_dataset("mnist", tmp_path, n_valid=6)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert not torch.equal(getattr(a, split)[0], getattr(c, split)[0])
        assert not torch.equal(getattr(a, split)[0], getattr(plain, split)[0])
    assert torch.equal(a.train_index, c.train_index)  # variant_seed does not move the split


def test_variant_generators_independent():
    draws = {(n, s): D.sample_variant_params("rotated_mnist", 5, D.variant_generator(0, n, s))["angles"]
             for n in ("rotated_mnist", "rotated_cifar10") for s in ("train", "test")}
    values = list(draws.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i))


# ---------------------------------------------------------------------------------------------------- splits
def test_split_disjoint_and_balanced(tmp_path):
    arrays = list(tiny_mnist(n_train=300))
    arrays[1] = np.random.default_rng(0).permutation(np.arange(300) % 10).astype(np.uint8)
    save_npz(tmp_path / "mnist.npz", arrays)
    b = D.load_dataset("mnist", tmp_path, n_train=50, n_valid=30, seed=3)
    tr, va = set(b.train_index.tolist()), set(b.valid_index.tolist())
    assert len(tr) == 50 and len(va) == 30 and not tr & va
    assert b.train[1].bincount(minlength=10).tolist() == [5] * 10
    assert torch.equal(b.train[1], torch.from_numpy(arrays[1]).long()[b.train_index])
    b2 = D.load_dataset("mnist", tmp_path, n_train=50, n_valid=30, seed=4)
    assert not torch.equal(b.valid_index, b2.valid_index) and not torch.equal(b.train_index, b2.train_index)
    full = D.load_dataset("mnist", tmp_path, seed=3)  # default: 10 % validation, the rest for training
    assert len(full.valid_index) == 30
    assert sorted(full.train_index.tolist() + full.valid_index.tolist()) == list(range(300))
    uneven = D.balanced_subset(torch.arange(300), torch.from_numpy(arrays[1]).long(), 57, seed=0)
    counts = torch.from_numpy(arrays[1]).long()[uneven].bincount(minlength=10)
    assert counts.sum() == 57 and counts.max() - counts.min() == 1
    with pytest.raises(ValueError, match="--n-train 10 needs 5 training images of class 1, but only 2 are left"):
        D.balanced_subset(torch.arange(20), torch.tensor([0] * 18 + [1] * 2), 10, seed=0)


def test_split_sizes_out_of_range_name_the_flags(tmp_path):
    save_npz(tmp_path / "mnist.npz", tiny_mnist(n_train=40))
    for n_valid in (40, -1):
        with pytest.raises(ValueError, match=rf"--n-valid must lie in \[0, 40\) for 40 training images, got {n_valid}"):
            D.load_dataset("mnist", tmp_path, n_valid=n_valid)
    for fraction, held in ((1.0, 40), (-0.5, -20)):
        with pytest.raises(ValueError, match=rf"--valid-fraction {fraction} holds out {held} of the 40 training"):
            D.load_dataset("mnist", tmp_path, valid_fraction=fraction)
    for n_train in (0, 37):
        with pytest.raises(ValueError, match=rf"--n-train must lie in \[1, 36\] .* got {n_train}"):
            D.load_dataset("mnist", tmp_path, n_valid=4, n_train=n_train)


def test_single_class_training_data_is_warned_about(tmp_path, caplog):
    save_npz(tmp_path / "mnist.npz", tiny_mnist(n_train=40))
    with caplog.at_level(logging.WARNING, logger="ella.data"):
        D.load_dataset("mnist", tmp_path, n_valid=4, n_train=10)
        assert "single class" not in caplog.text
        b = D.load_dataset("mnist", tmp_path, n_valid=4, n_train=1)
    label = int(b.train[1][0])
    assert f"single class (label {label} in all 1 images)" in caplog.text and "--n-train" in caplog.text


def test_missing_classes_are_warned_about(tmp_path, caplog):
    """A class-balanced subset smaller than the number of classes drops classes; so does data without a class."""
    save_npz(tmp_path / "cifar10.npz", tiny_cifar(n_train=100))
    with caplog.at_level(logging.WARNING, logger="ella.data"):
        D.load_dataset("cifar10", tmp_path, n_valid=10, n_train=10)
        assert "training data hold" not in caplog.text
        b = D.load_dataset("cifar10", tmp_path, n_valid=10, n_train=5)
    missing = sorted(set(range(10)) - set(b.train[1].tolist()))
    assert f"5 of the 10 classes (5 missing: {missing})" in caplog.text
    assert "stratified (class-balanced), but --n-train 5 is too small" in caplog.text
    assert "--n-train 10 or more" in caplog.text
    caplog.clear()
    x_tr, y_tr, x_te, y_te = tiny_cifar(n_train=100)
    save_npz(tmp_path / "cifar10.npz", (x_tr, y_tr % 9, x_te, y_te))  # no image of class 9
    with caplog.at_level(logging.WARNING, logger="ella.data"):
        D.load_dataset("cifar10", tmp_path, n_valid=10)
    assert "9 of the 10 classes (1 missing: [9])" in caplog.text and "classes [9] are absent" in caplog.text
    assert "--n-train" not in caplog.text


def test_a_validation_split_that_misses_classes_is_warned_about(tmp_path, caplog):
    save_npz(tmp_path / "cifar10.npz", tiny_cifar(n_train=100))
    with caplog.at_level(logging.WARNING, logger="ella.data"):
        b = D.load_dataset("cifar10", tmp_path, n_valid=4, n_train=20)
        missing = sorted(set(range(10)) - set(b.valid[1].tolist()))
        assert f"the 4 validation images hold no image of classes {missing}" in caplog.text
        caplog.clear()
        b = D.load_dataset("cifar10", tmp_path, n_valid=60, n_train=20)
    assert set(b.valid[1].tolist()) == set(range(10)) and "validation images hold" not in caplog.text


# ---------------------------------------------------------------------------------------------------- augmentation
def reference_augment(x: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: optional torch.flip, then crop of the 4-zero-padded image at (4 - dy, 4 - dx)."""
    out = []
    for xi, f, (dy, dx) in zip(x, flips.tolist(), shifts.tolist()):
        xi = torch.flip(xi, dims=[-1]) if f else xi
        padded = F.pad(xi, (4, 4, 4, 4))
        out.append(padded[:, 4 - dy:4 - dy + 32, 4 - dx:4 - dx + 32])
    return torch.stack(out)


def test_cifar_augment_equals_flip_and_padded_crop():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = D.cifar_augment(x, torch.Generator().manual_seed(7))
    flips, shifts = D.sample_flip_shift(64, torch.Generator().manual_seed(7))
    assert 0 < flips.sum() < 64 and shifts.min() == -4 and shifts.max() == 4
    assert torch.equal(out, reference_augment(x, flips, shifts))
    all_flip = D.apply_flip_shift(x, torch.ones(64, dtype=torch.bool), torch.zeros(64, 2, dtype=torch.long))
    assert torch.equal(all_flip, torch.flip(x, dims=[-1]))


def test_cifar_augment_is_per_sample():
    one = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = one.expand(2, 3, 32, 32)
    differs = [not torch.equal(*D.cifar_augment(x, torch.Generator().manual_seed(s))) for s in range(10)]
    assert sum(differs) >= 5
    # a batch-global augmentation would treat every sample alike
    out = D.cifar_augment(one.expand(128, 3, 32, 32), torch.Generator().manual_seed(0))
    assert len(out.flatten(1).unique(dim=0)) > 50


# ---------------------------------------------------------------------------------------------------- loader
def test_tensor_loader_epochs_and_reproducibility():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.arange(10)
    loader = D.TensorLoader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3 and len(loader.dataset) == 10 and loader.batch_size == 4
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])
    again = D.TensorLoader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([yb for _, yb in again]), epochs[0])
    for xb, yb in loader:
        assert torch.equal(xb.view(-1).long(), yb)
    plain = D.TensorLoader(x, y, batch_size=4, drop_last=True)
    assert len(plain) == 2 and torch.equal(torch.cat([yb for _, yb in plain]), torch.arange(8))


def test_tensor_loader_applies_augment_per_batch():
    x = torch.rand(1, 3, 32, 32).expand(20, 3, 32, 32).contiguous()
    calls = []

    def augment(xb, gen):
        calls.append(len(xb))
        return D.cifar_augment(xb, gen)

    loader = D.TensorLoader(x, torch.zeros(20, dtype=torch.long), 8, augment=augment)
    batches = [xb for xb, _ in loader]
    assert calls == [8, 8, 4] and not torch.equal(batches[0][0], batches[0][1])


# ---------------------------------------------------------------------------------------------------- real data
def real_data_dir() -> Path | None:
    env = os.environ.get("ELLA_DATA")
    if env and (Path(env) / "mnist.npz").is_file() and (Path(env) / "cifar10.npz").is_file():
        return Path(env)
    return None


@pytest.mark.skipif(real_data_dir() is None, reason="ELLA_DATA does not point at the real mnist.npz/cifar10.npz")
def test_real_files_statistics():
    x_tr, y_tr, x_te, y_te = D.read_mnist(real_data_dir())
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    n = x_tr.size * 255.0
    s = int(x_tr.sum(dtype=np.int64))
    s2 = int((x_tr.astype(np.int64) ** 2).sum())
    mean = s / n
    std = (s2 / (n * 255.0) - mean ** 2) ** 0.5
    assert abs(mean - 0.1306604762738429) < 1e-9 and abs(std - 0.3081078038564626) < 1e-9
    assert np.bincount(y_tr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    cx_tr, cy_tr, cx_te, cy_te = D.read_cifar10(real_data_dir(), cifar_test="exact")
    assert cx_tr.shape == (50000, 32, 32, 3) and cx_te.shape == (1000, 32, 32, 3)
    assert np.bincount(cy_tr).tolist() == [5000] * 10


@pytest.mark.slow
@pytest.mark.skipif(real_data_dir() is None, reason="ELLA_DATA does not point at the real files")
@pytest.mark.parametrize("name", D.DATASETS)
def test_real_variants_load(name):
    task = "digit_quadrant" if name == "quadrant_mnist" else None
    b = D.load_dataset(name, real_data_dir(), task=task, n_train=1000, n_valid=500)
    channels = 3 if "cifar" in name else 1
    assert b.train[0].shape == (1000, channels, 32, 32) and b.valid[0].shape == (500, channels, 32, 32)
    assert b.test[0].shape[1:] == (channels, 32, 32) and torch.isfinite(b.test[0]).all()
    if name in ("mnist", "cifar10"):
        assert b.train[0].mean().abs() < 0.1 and (b.train[0].std() - 1).abs() < 0.1
