"""Raw readers: MNIST and CIFAR-10 as uint8 numpy arrays, from the project's ``.npz`` files or torchvision's layout.

MNIST comes back as ``(x_train (N, 28, 28), y_train (N,), x_test, y_test)`` with 0 = background, CIFAR-10 as
``(x_train (N, 32, 32, 3) HWC RGB, y_train, x_test, y_test)``; labels are uint8 in ``[0, 10)``. In the folder that
``resolve_data_dir`` picks, the readers take the first of

1. the project's shared ``.npz`` files (``mnist.npz``, ``cifar10.npz``, ``cifar10_test10k_jpeg.npz``);
2. torchvision's layout (``MNIST/raw/*-ubyte[.gz]``, ``cifar-10-batches-py/``), read by torchvision's readers
   with its checks: every CIFAR-10 file must match the official MD5 before it is unpickled, and an MNIST file
   present only as ``.gz`` must match torchvision's MD5 before it is decompressed beside itself (as torchvision's
   own download does). Uncompressed MNIST files have no checksum in torchvision; its legacy
   ``MNIST/processed/*.pt`` copies are never read;
3. only when asked (``download=True``, the flag ``--download``): a torchvision download into that folder, where
   every wait for the server ends after :data:`DOWNLOAD_TIMEOUT` seconds without an answer.

The log names the files read, and a warning says when the folder holds a dataset in more than one format. For
CIFAR-10's test set, see :func:`read_cifar10_with_source`.
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
    """Raise a ValueError naming ``where`` unless ``x`` holds uint8 0-255 images ``(N, *image_shape)`` and ``y``
    their ``N`` integer labels in ``[0, n_classes)``."""
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim != 1 + len(image_shape) or tuple(x.shape[1:]) != image_shape:
        raise ValueError(f"{where}: images must have shape (N, {', '.join(map(str, image_shape))}), "
                         f"got {tuple(x.shape)}")
    if x.size and x.max() <= 1:
        raise ValueError(f"{where}: every pixel is 0 or 1, so these look like 0/1 (binarised) or [0, 1] images, but "
                         "the loader expects uint8 pixels from 0 to 255; save them as (x * 255).astype(np.uint8) "
                         "(from floats in [0, 1]: np.round(x * 255).astype(np.uint8))")
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


def _read_splits(load: Callable[[bool], tuple[Any, Any]], image_shape: tuple[int, ...], where: str,
                 unreadable: Callable[[bool], str]) -> RawArrays:
    """Train and test split, ``load(train) -> (images, labels)`` (torchvision's readers), as validated uint8
    arrays; a file torchvision cannot read is a ValueError that starts with ``unreadable(train)``."""
    arrays: list[np.ndarray] = []
    for train in (True, False):
        try:
            data, targets = load(train)
        except _PARSE_ERRORS as error:
            raise ValueError(f"{unreadable(train)} ({type(error).__name__}: {error})") from error
        x, y = np.ascontiguousarray(np.asarray(data)), np.asarray(targets)
        _check_pair(x, y, image_shape, f"{where} ({'train' if train else 'test'} split)", 10)
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
    torchvision's IDX readers; a file present only as ``.gz`` is first checked against torchvision's MD5 and
    decompressed beside itself. Returns uint8 ``(x_train (N, 28, 28), y_train, x_test, y_test)``.

    These raw files are what is read even where torchvision's legacy ``MNIST/processed/{training,test}.pt`` exist
    (which ``torchvision.datasets.MNIST`` would read instead, unchecked)."""
    import torchvision.datasets as tvd
    from torchvision.datasets.mnist import read_image_file, read_label_file

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

    def load(train: bool) -> tuple[Any, Any]:
        prefix = "train" if train else "t10k"
        return (read_image_file(str(raw_dir / f"{prefix}-images-idx3-ubyte")),
                read_label_file(str(raw_dir / f"{prefix}-labels-idx1-ubyte")))

    return _read_splits(load, (28, 28), f"MNIST in {raw_dir}", unreadable)


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

    def load(train: bool) -> tuple[Any, Any]:
        split = tvd.CIFAR10(str(root), train=train, download=False)
        return split.data, split.targets

    return _read_splits(load, (32, 32, 3), f"CIFAR10 in {root}", unreadable)


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


def _warn_if_several_formats(name: str, used: Path, present: list[Path]) -> None:
    """Warn when the data folder holds dataset ``name``'s training images in more than one of the formats
    ``present``, naming ``used`` (the one read) and the ignored others."""
    ignored = [str(path) for path in present if path != used]
    if ignored:
        log.warning("%s: the data folder holds the training images in more than one format: reading %s, ignoring %s "
                    "(remove the copy you do not want, or point --data-dir at a folder holding one)", name, used,
                    ", ".join(ignored))


def _mnist_formats(root: Path) -> list[Path]:
    """The formats of MNIST in ``root``: ``mnist.npz``, torchvision's ``MNIST/raw`` (any of its files) and its
    legacy ``MNIST/processed`` (``training.pt`` or ``test.pt``), those present."""
    npz, processed = root / "mnist.npz", root / "MNIST" / "processed"
    present = {npz: npz.is_file(),
               root / "MNIST" / "raw": any(path is not None for path in _mnist_raw_files(root).values()),
               processed: any((processed / name).is_file() for name in ("training.pt", "test.pt"))}
    return [path for path, here in present.items() if here]


def read_mnist(data_dir: str | Path | None = None, *, download: bool = False) -> RawArrays:
    """MNIST as uint8 ``(x_train (60000,28,28), y_train, x_test (10000,28,28), y_test)`` (0 = background); see
    :func:`read_mnist_with_source`, which also says where the test set came from."""
    return read_mnist_with_source(data_dir, download=download)[0]


def read_mnist_with_source(data_dir: str | Path | None = None, *,
                           download: bool = False) -> tuple[RawArrays, str]:
    """MNIST as uint8 ``(x_train (60000,28,28), y_train, x_test (10000,28,28), y_test)`` (0 = background) and a
    description of the test set taken (for logs and ``final.json``).

    Looks for ``mnist.npz``, then torchvision's ``MNIST/raw`` layout, then downloads if ``download``. Logs the files
    read, and warns when the folder holds MNIST in more than one format (torchvision's legacy
    ``MNIST/processed/*.pt`` is never read).
    """
    root = resolve_data_dir(data_dir)
    npz = root / "mnist.npz"
    raw_dir = root / "MNIST" / "raw"
    if npz.is_file():
        arrays, used = read_npz(npz, (28, 28)), npz
    elif all(p is not None for p in _mnist_raw_files(root).values()):
        arrays, used = read_mnist_torchvision(root), raw_dir
    elif download:
        _download("mnist", root)
        arrays, used = read_mnist_torchvision(root), raw_dir
    else:
        looked = [str(npz.resolve())] + [f"{(raw_dir / n).resolve()}[.gz]" for n in MNIST_FILES]
        raise not_found("MNIST", root, looked)
    train_file, test_file = (npz, npz) if used == npz else (raw_dir / MNIST_FILES[0], raw_dir / MNIST_FILES[2])
    log.info("MNIST: training images read from %s, test images from %s", train_file, test_file)
    _warn_if_several_formats("MNIST", used, _mnist_formats(root))
    return arrays, f"{len(arrays[2]):,} test images from {test_file.relative_to(root)}"  # type: ignore[return-value]


OFFICIAL_TEST_SIZE = 10_000  # images in CIFAR-10's official test_batch


def read_cifar10(data_dir: str | Path | None = None, *, cifar_test: str = "auto",
                 download: bool = False) -> RawArrays:
    """CIFAR-10 as uint8 ``(x_train (50000,32,32,3) HWC RGB, y_train, x_test, y_test)``; see
    :func:`read_cifar10_with_source`, which also says which test set was taken."""
    return read_cifar10_with_source(data_dir, cifar_test=cifar_test, download=download)[0]


def _read_cifar_test_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's test split from torchvision's ``cifar-10-batches-py/test_batch`` alone, as uint8 HWC images and
    labels; the file is unpickled only after it matched torchvision's MD5 checksum of the official file."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    ((_, md5),) = CIFAR10.test_list
    if not check_integrity(path, md5):
        raise ValueError(f"{path} does not match torchvision's MD5 checksum of the official CIFAR-10 test_batch "
                         "(damaged, or not the official file; it was not unpickled): replace it with a good copy, or "
                         "remove it to test on the other test images in the data folder (see --cifar-test)")
    with open(path, "rb") as file:
        entry = pickle.load(file, encoding="latin1")
    x = np.ascontiguousarray(np.asarray(entry["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    y = np.asarray(entry["labels"])
    _check_pair(x, y, (32, 32, 3), str(path), 10)
    return x, y.astype(np.uint8)


def _exact_cifar_test(root: Path, arrays: RawArrays, held: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """The exact CIFAR-10 test images to take: those of ``arrays`` (read from ``held``), unless ``held`` is an
    ``.npz`` with fewer than the official 10,000 and torchvision's ``cifar-10-batches-py/test_batch`` lies beside
    it; then that file's. Returns the images, labels and the file they come from."""
    test_batch = root / _CIFAR_FOLDER / "test_batch"
    if held != test_batch and len(arrays[2]) < OFFICIAL_TEST_SIZE and test_batch.is_file():
        return (*_read_cifar_test_batch(test_batch), test_batch)
    return arrays[2], arrays[3], held


def _jpeg_cifar_test(root: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The JPEG copies of the CIFAR-10 test set in ``cifar10_test10k_jpeg.npz``: images, labels, description."""
    jpeg = root / _JPEG_TEST_FILE
    if not jpeg.is_file():
        raise not_found("the CIFAR-10 JPEG test set", root, [str(jpeg.resolve())],
                        f"--cifar-test jpeg10k needs {_JPEG_TEST_FILE} in the data folder (--data-dir or "
                        "ELLA_DATA); use --cifar-test exact otherwise.")
    x, y = read_npz(jpeg, (32, 32, 3), keys=("x_test", "y_test"))
    return x, y, f"jpeg10k ({len(x):,} lossy JPEG copies, non-official order)"


def _choose_cifar_test(root: Path, arrays: RawArrays, held: Path, cifar_test: str
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    """The CIFAR-10 test images, labels and description that ``cifar_test`` takes (see
    :func:`read_cifar10_with_source`), given the ``arrays`` read from ``held``; logs the file they come from."""
    if cifar_test == "jpeg10k":
        x_test, y_test, source = _jpeg_cifar_test(root)
        log.info("CIFAR-10 test set: %s, read from %s", source, root / _JPEG_TEST_FILE)
        return x_test, y_test, source
    x_test, y_test, held = _exact_cifar_test(root, arrays, held)
    n_exact = len(x_test)
    exact = f"exact ({n_exact:,} official test images)"
    official = held == root / _CIFAR_FOLDER / "test_batch" or n_exact >= OFFICIAL_TEST_SIZE  # the whole test set
    if cifar_test == "exact" or official:
        log.info("CIFAR-10 test set: %s, read from %s", exact, held)
        return x_test, y_test, exact
    jpeg = root / _JPEG_TEST_FILE
    if not jpeg.is_file():
        log.warning("CIFAR-10 test set: %s holds only %d exact test images and there is no %s beside it, so the "
                    "test set is those %d (standard error ~%.1f points); the official test_batch (torchvision's "
                    "cifar-10-batches-py/test_batch, put into the data folder) has all 10,000", held, n_exact,
                    _JPEG_TEST_FILE, n_exact, 50 / max(n_exact, 1) ** 0.5)
        return x_test, y_test, exact
    x_jpeg, y_jpeg, source = _jpeg_cifar_test(root)
    log.warning("CIFAR-10 test set: %s holds only %d exact test images, so the test set is the %d lossy JPEG copies "
                "in %s (--cifar-test exact takes the %d exact ones; the official test_batch, torchvision's "
                "cifar-10-batches-py/test_batch put into the data folder, has all 10,000 exact)", held, n_exact,
                len(x_jpeg), jpeg, n_exact)
    return x_jpeg, y_jpeg, source


def read_cifar10_with_source(data_dir: str | Path | None = None, *, cifar_test: str = "auto",
                             download: bool = False) -> tuple[RawArrays, str]:
    """CIFAR-10 as uint8 ``(x_train (50000,32,32,3) HWC RGB, y_train, x_test, y_test)`` and a description of the
    test set taken (for logs and ``final.json``).

    Training images come from ``cifar10.npz``, else torchvision's ``cifar-10-batches-py``, else a download
    (only if ``download``); the log names the files read, and a warning says when the folder holds both. The test
    set depends on ``cifar_test`` (the flag ``--cifar-test``):

    - ``"auto"`` (the default): the official 10,000 bit-exact test images where the folder has them
      (torchvision's ``cifar-10-batches-py/test_batch``, also beside a ``cifar10.npz``, or an ``.npz`` whose
      ``x_test`` holds 10,000 images); where it has fewer exact ones (this project's shared ``cifar10.npz`` holds
      the first 1,000), the JPEG copies of ``cifar10_test10k_jpeg.npz`` if present, else those exact images; a
      warning says which when it is not the official 10,000.
    - ``"exact"``: the bit-exact official test images the folder has: all 10,000 (torchvision's ``test_batch``,
      also beside a ``cifar10.npz``) or the first 1,000 (``cifar10.npz`` alone), which give a test-accuracy
      standard error of about 1.5 points.
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
    batches = folder / "data_batch_1..5"  # how the log names torchvision's training files
    if npz.is_file():
        arrays, used = read_npz(npz, (32, 32, 3)), npz
    elif (folder / "test_batch").is_file():
        arrays, used = read_cifar10_torchvision(root), batches
    elif download:
        _download("cifar10", root)
        arrays, used = read_cifar10_torchvision(root), batches
    else:
        looked = [str(npz.resolve()), str(folder.resolve()) + "/{data_batch_1..5,test_batch,batches.meta}"]
        raise not_found("CIFAR-10", root, looked)
    log.info("CIFAR-10: training images read from %s", used)
    _warn_if_several_formats("CIFAR-10", used, [path for path, here in (
        (npz, npz.is_file()), (batches, any((folder / name).is_file() for name in CIFAR_FILES[:5]))) if here])
    x_test, y_test, source = _choose_cifar_test(root, arrays, npz if used == npz else folder / "test_batch",
                                                cifar_test)
    return (*arrays[:2], x_test, y_test), source  # type: ignore[return-value]
