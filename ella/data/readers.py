"""Raw readers: MNIST and CIFAR-10 as uint8 numpy arrays, from the project's ``.npz`` files or torchvision's layout.

MNIST comes back as ``(x_train (N, 28, 28), y_train (N,), x_test, y_test)`` with 0 = background, CIFAR-10 as
``(x_train (N, 32, 32, 3) HWC RGB, y_train, x_test, y_test)``; labels are uint8 in ``[0, 10)``. In the folder that
``resolve_data_dir`` picks, the readers take the first of

1. the project's shared ``.npz`` files (``mnist.npz``, ``cifar10.npz``, ``cifar10_test10k_jpeg.npz``);
2. torchvision's layout (``MNIST/raw/*-ubyte[.gz]``, ``cifar-10-batches-py/``), read by ``torchvision.datasets``
   with its checks: every CIFAR-10 file must match the official MD5 before torchvision unpickles it, and an MNIST
   file present only as ``.gz`` must match torchvision's MD5 before it is decompressed beside itself (as
   torchvision's own download does). Uncompressed MNIST files have no checksum in torchvision;
3. only when asked (``download=True``, the flag ``--download``): a torchvision download into that folder, where
   every wait for the server ends after :data:`DOWNLOAD_TIMEOUT` seconds without an answer.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import socket
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ella.data.locate import DatasetNotFoundError, not_found, resolve_data_dir

log = logging.getLogger(__name__)

CIFAR_TEST_CHOICES = ("auto", "exact", "jpeg10k")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR_FOLDER = "cifar-10-batches-py"
_JPEG_TEST_FILE = "cifar10_test10k_jpeg.npz"
# what torchvision raises on a file it cannot parse (failed asserts, bad shapes and dtypes, bad pickles, ...)
_PARSE_ERRORS = (AssertionError, KeyError, IndexError, TypeError, ValueError, RuntimeError, EOFError,
                 pickle.UnpicklingError)

RawArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
DOWNLOAD_TIMEOUT = 60.0  # seconds a download waits for each answer of the server


def _check_pair(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, ...], where: str, n_classes: int) -> None:
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim != 1 + len(image_shape) or tuple(x.shape[1:]) != image_shape:
        raise ValueError(f"{where}: images must have shape (N, {', '.join(map(str, image_shape))}), "
                         f"got {tuple(x.shape)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be a 1-d integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != len(x):
        raise ValueError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{where}: labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")


def read_npz(path: str | Path, image_shape: tuple[int, ...], keys: tuple[str, ...] = NPZ_KEYS,
             n_classes: int = 10) -> tuple[np.ndarray, ...]:
    """Read arrays ``keys`` (pairs of images and labels) from a shared-format ``.npz`` and validate them.

    Images must be uint8 ``(N, *image_shape)``, labels 1-d integers in ``[0, n_classes)`` (returned as uint8).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (not a zip file); replace it with a good copy")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ValueError(f"{path}: missing key(s) {missing}; expected {list(keys)}, found {data.files}")
            arrays = [data[k] for k in keys]
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ValueError(f"{path} is damaged ({error}); replace it with a good copy") from error
    for i in range(0, len(keys), 2):
        _check_pair(arrays[i], arrays[i + 1], image_shape, f"{path} [{keys[i]}, {keys[i + 1]}]", n_classes)
        arrays[i + 1] = arrays[i + 1].astype(np.uint8)
    return tuple(arrays)


def _read_torchvision_splits(cls: Any, root: Path, image_shape: tuple[int, ...],
                             unreadable: Callable[[bool], str]) -> RawArrays:
    """Train and test split of torchvision dataset class ``cls`` in ``root`` (never downloading), as validated
    uint8 arrays; a file torchvision cannot read is a ValueError that starts with ``unreadable(train)``."""
    arrays: list[np.ndarray] = []
    for train in (True, False):
        try:
            split = cls(str(root), train=train, download=False)
        except _PARSE_ERRORS as error:
            raise ValueError(f"{unreadable(train)} ({type(error).__name__}: {error})") from error
        x, y = np.ascontiguousarray(np.asarray(split.data)), np.asarray(split.targets)
        _check_pair(x, y, image_shape, f"{cls.__name__} in {root} ({'train' if train else 'test'} split)", 10)
        arrays += [x, y.astype(np.uint8)]
    return tuple(arrays)  # type: ignore[return-value]


def _mnist_raw_files(root: Path) -> dict[str, Path | None]:
    """Each of torchvision's four MNIST files in ``root/MNIST/raw``: the file, else its ``.gz``, else None."""
    raw_dir = root / "MNIST" / "raw"
    return {name: next((p for p in (raw_dir / name, raw_dir / f"{name}.gz") if p.is_file()), None)
            for name in MNIST_FILES}


def _decompress_checked(gz: Path, md5: str) -> None:
    """Check ``gz`` against torchvision's MD5 of the official file, then decompress it beside itself (atomically)."""
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(gz, md5):
        raise ValueError(f"{gz} does not match torchvision's MD5 checksum of the official file: it is damaged, or "
                         "another compression of the data; replace it with the official file, or put the "
                         "decompressed file beside it")
    target = gz.with_suffix("")
    tmp = target.with_name(target.name + ".tmp")
    log.info("decompressing %s", gz)
    try:
        with gzip.open(gz, "rb") as source, open(tmp, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.replace(tmp, target)
    except OSError as error:
        raise DatasetNotFoundError(f"cannot decompress {gz} into {gz.parent} ({error}); decompress it there "
                                   "yourself or point --data-dir at a writable copy of the folder") from error
    finally:
        if tmp.is_file():
            tmp.unlink()


def read_mnist_torchvision(root: str | Path) -> RawArrays:
    """Read MNIST from torchvision's layout ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with
    ``torchvision.datasets.MNIST``; a file present only as ``.gz`` is first checked against torchvision's MD5 and
    decompressed beside itself. Returns uint8 ``(x_train (N, 28, 28), y_train, x_test, y_test)``."""
    import torchvision.datasets as tvd

    root = Path(root)
    raw_dir = root / "MNIST" / "raw"
    files = _mnist_raw_files(root)
    missing = [name for name, path in files.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{raw_dir}: missing {missing} (or their .gz)")
    md5 = {Path(gz).stem: checksum for gz, checksum in tvd.MNIST.resources}
    for name, path in files.items():
        if path is not None and path.suffix == ".gz":
            _decompress_checked(path, md5[name])

    def unreadable(train: bool) -> str:
        prefix = raw_dir / ("train" if train else "t10k")
        return (f"torchvision could not read {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte: damaged, "
                "or not IDX files of unsigned bytes; replace them with a good copy")

    return _read_torchvision_splits(tvd.MNIST, root, (28, 28), unreadable)


def _cifar_checksum_failures(folder: Path) -> list[str]:
    """The files in ``folder`` that do not match torchvision's MD5 checksums of the official CIFAR-10 files."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    expected = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return [name for name, md5 in expected if not check_integrity(folder / name, md5)]


def read_cifar10_torchvision(root: str | Path) -> RawArrays:
    """Read CIFAR-10 from torchvision's layout ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
    with ``torchvision.datasets.CIFAR10``, which unpickles a file only after its MD5 matched the official one.
    Returns uint8 ``(x_train (N, 32, 32, 3) HWC, y_train, x_test, y_test)``."""
    import torchvision.datasets as tvd

    root = Path(root)
    folder = root / _CIFAR_FOLDER
    missing = [n for n in CIFAR_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing}")

    def unreadable(train: bool) -> str:
        bad = _cifar_checksum_failures(folder)
        if bad:
            return (f"{folder}: {bad} do not match torchvision's MD5 checksums of the official CIFAR-10 files "
                    "(damaged, or not the official files; torchvision unpickles nothing that fails this check): "
                    "replace them with a good copy, or delete the folder and pass --download")
        return f"torchvision could not read CIFAR-10 from {folder}; replace it with a good copy"

    return _read_torchvision_splits(tvd.CIFAR10, root, (32, 32, 3), unreadable)


def _download(kind: str, root: Path) -> None:
    """Download MNIST or CIFAR-10 with torchvision into ``root``, waiting at most :data:`DOWNLOAD_TIMEOUT`
    seconds for each answer; network problems (a time-out too) -> DatasetNotFoundError naming the server."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[kind]
    sources = " or ".join(getattr(cls, "mirrors", None) or [cls.url])
    root.mkdir(parents=True, exist_ok=True)
    log.warning("downloading %s from %s into %s (waiting at most %g s for each answer)", kind, sources, root,
                DOWNLOAD_TIMEOUT)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torchvision's urlopen takes no timeout of its own
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError, OSError ... on network trouble
        what = (f"no answer from {sources} within {DOWNLOAD_TIMEOUT:g} s (a firewall or proxy that lets the "
                "connection open but never answers?)" if _timed_out(err) else f"{type(err).__name__}: {err}")
        raise DatasetNotFoundError(
            f"download of {kind} into {root.resolve()} failed: {what}. Without network access, put mnist.npz / "
            "cifar10.npz (or torchvision's layout) into a folder and point --data-dir or ELLA_DATA at it."
        ) from err
    finally:
        socket.setdefaulttimeout(before)


def _timed_out(error: BaseException | None) -> bool:
    """True when ``error``, an exception it wraps (``reason``, its cause or context) or its text is a time-out."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TimeoutError) or "timed out" in str(error):
            return True
        reason = getattr(error, "reason", None)
        error = reason if isinstance(reason, BaseException) else (error.__cause__ or error.__context__)
    return False


def read_mnist(data_dir: str | Path | None = None, *, download: bool = False) -> RawArrays:
    """MNIST as uint8 ``(x_train (60000,28,28), y_train, x_test (10000,28,28), y_test)`` (0 = background).

    Looks for ``mnist.npz``, then torchvision's ``MNIST/raw`` layout, then downloads if ``download``.
    """
    root = resolve_data_dir(data_dir)
    npz = root / "mnist.npz"
    if npz.is_file():
        return read_npz(npz, (28, 28))  # type: ignore[return-value]
    if all(p is not None for p in _mnist_raw_files(root).values()):
        return read_mnist_torchvision(root)
    if download:
        _download("mnist", root)
        return read_mnist_torchvision(root)
    raw_dir = root / "MNIST" / "raw"
    looked = [str(npz.resolve())] + [f"{(raw_dir / n).resolve()}[.gz]" for n in MNIST_FILES]
    raise not_found("MNIST", root, looked)


OFFICIAL_TEST_SIZE = 10_000  # images in CIFAR-10's official test_batch


def read_cifar10(data_dir: str | Path | None = None, *, cifar_test: str = "auto",
                 download: bool = False) -> RawArrays:
    """CIFAR-10 as uint8 ``(x_train (50000,32,32,3) HWC RGB, y_train, x_test, y_test)``; see
    :func:`read_cifar10_with_source`, which also says which test set was taken."""
    return read_cifar10_with_source(data_dir, cifar_test=cifar_test, download=download)[0]


def read_cifar10_with_source(data_dir: str | Path | None = None, *, cifar_test: str = "auto",
                             download: bool = False) -> tuple[RawArrays, str]:
    """CIFAR-10 as uint8 ``(x_train (50000,32,32,3) HWC RGB, y_train, x_test, y_test)`` and a description of the
    test set taken (for logs and ``final.json``).

    Training images come from ``cifar10.npz``, else torchvision's ``cifar-10-batches-py``, else a download
    (only if ``download``). The test set depends on ``cifar_test`` (the flag ``--cifar-test``):

    - ``"auto"`` (the default): the official 10,000 bit-exact test images where the folder has them
      (torchvision's layout, or an ``.npz`` whose ``x_test`` holds 10,000 images); where it has fewer exact ones
      (this project's shared ``cifar10.npz`` holds the first 1,000), the 10,000 JPEG copies of
      ``cifar10_test10k_jpeg.npz`` if present, else those exact images; a warning says which when it is not
      the official 10,000.
    - ``"exact"``: the bit-exact official test images the folder has: all 10,000 (torchvision layout) or the
      first 1,000 (``cifar10.npz``), which give a test-accuracy standard error of about 1.5 points.
    - ``"jpeg10k"``: all 10,000 test images from ``cifar10_test10k_jpeg.npz`` (lossy JPEG re-encodings, except
      1,000 exact ones; class-interleaved, non-official order). Lower-variance accuracy estimates than 1,000
      exact images, but the pixel statistics differ slightly from the training images (std ~0.002 lower): do
      not compare these numbers with exact-test-set numbers.
    """
    if cifar_test not in CIFAR_TEST_CHOICES:
        raise ValueError(f"--cifar-test must be one of {', '.join(CIFAR_TEST_CHOICES)}, got {cifar_test!r}")
    root = resolve_data_dir(data_dir)
    npz = root / "cifar10.npz"
    folder = root / _CIFAR_FOLDER
    if npz.is_file():
        arrays = read_npz(npz, (32, 32, 3))
    elif (folder / "test_batch").is_file():
        arrays = read_cifar10_torchvision(root)
    elif download:
        _download("cifar10", root)
        arrays = read_cifar10_torchvision(root)
    else:
        looked = [str(npz.resolve()), str(folder.resolve()) + "/{data_batch_1..5,test_batch,batches.meta}"]
        raise not_found("CIFAR-10", root, looked)
    n_exact = len(arrays[2])
    exact = f"exact ({n_exact:,} official test images)"
    held = npz if npz.is_file() else folder / "test_batch"
    jpeg = root / _JPEG_TEST_FILE
    if cifar_test == "exact" or (cifar_test == "auto" and n_exact >= OFFICIAL_TEST_SIZE):
        return arrays, exact  # type: ignore[return-value]
    if cifar_test == "auto" and not jpeg.is_file():
        log.warning("CIFAR-10 test set: %s holds only %d exact test images and there is no %s beside it, so the "
                    "test set is those %d (standard error ~%.1f points); the official test_batch (torchvision's "
                    "cifar-10-batches-py/) has all 10,000", held, n_exact, _JPEG_TEST_FILE, n_exact,
                    50 / max(n_exact, 1) ** 0.5)
        return arrays, exact  # type: ignore[return-value]
    if not jpeg.is_file():
        raise not_found("the CIFAR-10 JPEG test set", root, [str(jpeg.resolve())],
                        f"--cifar-test jpeg10k needs {_JPEG_TEST_FILE} in the data folder (--data-dir or "
                        "ELLA_DATA); use --cifar-test exact otherwise.")
    if cifar_test == "auto":
        log.warning("CIFAR-10 test set: %s holds only %d exact test images, so the test set is the 10,000 lossy "
                    "JPEG copies in %s (--cifar-test exact takes the %d exact ones; the official test_batch, "
                    "torchvision's cifar-10-batches-py/, has all 10,000 exact)", held, n_exact, jpeg, n_exact)
    jpeg_arrays = read_npz(jpeg, (32, 32, 3), keys=("x_test", "y_test"))
    return (*arrays[:2], *jpeg_arrays), "jpeg10k (10,000 lossy JPEG copies, non-official order)"  # type: ignore[return-value]
