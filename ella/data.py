"""Datasets for ella: MNIST / CIFAR-10 and their fixed-seed variants, splits and a fast tensor loader.

Every dataset is returned as float32 images ``(N, C, 32, 32)`` (normalised) and int64 labels ``(N,)``.

Where the data come from
    ``resolve_data_dir`` picks the folder (explicit argument, else ``$ELLA_DATA``, else ``./data``). Inside it
    the readers accept, in this order:

    1. the project's shared ``.npz`` files (``mnist.npz``, ``cifar10.npz``, ``cifar10_test10k_jpeg.npz``);
    2. torchvision's on-disk layout (``MNIST/raw/*-ubyte[.gz]``, ``cifar-10-batches-py/*``), parsed by our own
       code without checksum checks;
    3. only when ``download=True``: a torchvision download into that folder, then read as in 2.

Dataset variants (spec sections 2, 7.1, 7.3)
    ``mnist``, ``translated_mnist``, ``rotated_mnist``, ``quadrant_mnist`` (``task="digit"|"digit_quadrant"``),
    ``cifar10``, ``rotated_cifar10``. Geometric transforms act on the 0-1 pixel scale (zero fill = black /
    background), at the native resolution, before resizing to 32x32 (bilinear, no antialiasing) and
    normalising. The random transform of an image depends only on ``variant_seed`` and its index in the
    official order, so the same image gets the same transform whatever the split or subset.

Splits
    The validation split is carved from the training set (seeded); the test set is never used for selection.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
TRANSLATION_MAX_SHIFT = 8
CIFAR_MAX_SHIFT = 4

DATASETS = ("mnist", "translated_mnist", "rotated_mnist", "quadrant_mnist", "cifar10", "rotated_cifar10")
QUADRANT_TASKS = ("digit", "digit_quadrant")
CIFAR_TEST_CHOICES = ("exact", "jpeg10k")

_MNIST_RAW = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FOLDER = "cifar-10-batches-py"
_JPEG_TEST_FILE = "cifar10_test10k_jpeg.npz"
_VARIANT_KEYS = {name: i for i, name in enumerate(DATASETS)}
_CHUNK = 4096

RawArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset could not be found in any of the places looked at (the message lists them)."""


# ----------------------------------------------------------------------------------------------------------
# Locating data
# ----------------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$ELLA_DATA`` if set and non-empty, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("ELLA_DATA")
    if env:
        return Path(env).expanduser()
    return Path("data")


def _not_found(what: str, data_dir: Path, looked: list[str], extra: str = "") -> DatasetNotFoundError:
    lines = [f"Could not find {what} (data dir: {data_dir.resolve()}"
             + ("" if data_dir.is_dir() else ", which does not exist") + "). Looked at:"]
    lines += [f"  {p}" for p in looked]
    if extra:
        lines.append(extra)
    lines.append(
        "To fix this, point --data-dir or the ELLA_DATA environment variable at a folder holding mnist.npz / "
        "cifar10.npz (the project's shared format), or torchvision's layout (MNIST/raw/*-ubyte[.gz], "
        "cifar-10-batches-py/), or pass download=True on a machine with network access."
    )
    return DatasetNotFoundError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Raw readers (uint8 numpy arrays; MNIST (N, 28, 28), CIFAR (N, 32, 32, 3) HWC)
# ----------------------------------------------------------------------------------------------------------
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


def read_npz(path: str | Path, image_shape: tuple[int, ...], keys: tuple[str, ...] = tuple(_MNIST_RAW),
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


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (MNIST format; ``.gz`` is decompressed): big-endian header, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header announces shape {shape} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _mnist_raw_files(root: Path) -> dict[str, Path | None]:
    raw_dir = root / "MNIST" / "raw"
    found: dict[str, Path | None] = {}
    for key, name in _MNIST_RAW.items():
        found[key] = next((p for p in (raw_dir / name, raw_dir / f"{name}.gz") if p.is_file()), None)
    return found


def read_mnist_torchvision(root: str | Path) -> RawArrays:
    """Read MNIST from torchvision's layout ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (each also accepted as ``.gz``). Returns uint8 ``(x_train (N,28,28), y_train, x_test, y_test)``."""
    files = _mnist_raw_files(Path(root))
    missing = [_MNIST_RAW[k] for k, p in files.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{Path(root) / 'MNIST' / 'raw'}: missing {missing} (or their .gz)")
    arrays = [read_idx(files[k]) for k in _MNIST_RAW]
    for i in (0, 2):
        _check_pair(arrays[i], arrays[i + 1], (28, 28), str(files[list(_MNIST_RAW)[i]]), 10)
    return tuple(arrays)  # type: ignore[return-value]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain Python containers (refuses any other class)."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: missing 'data' or 'labels' (keys: {list(batch)})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW row-major -> HWC
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_cifar10_torchvision(root: str | Path) -> RawArrays:
    """Read CIFAR-10 from torchvision's layout ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.

    The batch files are pickles; they are only read from the local folder the caller chose, with an
    unpickler that rebuilds nothing but numpy arrays and Python containers. Returns uint8
    ``(x_train (N,32,32,3) HWC, y_train, x_test, y_test)``.
    """
    folder = Path(root) / _CIFAR_FOLDER
    names = (*_CIFAR_TRAIN_BATCHES, "test_batch")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing}")
    parts = [_read_cifar_batch(folder / n) for n in names]
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = np.concatenate([p[1] for p in parts[:-1]])
    x_test, y_test = parts[-1]
    _check_pair(x_train, y_train, (32, 32, 3), str(folder), 10)
    _check_pair(x_test, y_test, (32, 32, 3), str(folder / "test_batch"), 10)
    return x_train, y_train.astype(np.uint8), x_test, y_test.astype(np.uint8)


def _download(kind: str, root: Path) -> None:
    """Download MNIST or CIFAR-10 with torchvision into ``root``; network problems -> DatasetNotFoundError."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[kind]
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s with torchvision", kind, root)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError, OSError ... on network trouble
        raise DatasetNotFoundError(
            f"download of {kind} into {root.resolve()} failed ({type(err).__name__}: {err}). Without network "
            "access, put mnist.npz / cifar10.npz (or torchvision's layout) into a folder and point "
            "--data-dir or ELLA_DATA at it."
        ) from err


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
    looked = [str(npz.resolve())] + [f"{(raw_dir / n).resolve()}[.gz]" for n in _MNIST_RAW.values()]
    raise _not_found("MNIST", root, looked)


def read_cifar10(data_dir: str | Path | None = None, *, cifar_test: str = "exact",
                 download: bool = False) -> RawArrays:
    """CIFAR-10 as uint8 ``(x_train (50000,32,32,3) HWC RGB, y_train, x_test, y_test)``.

    Training images come from ``cifar10.npz``, else torchvision's ``cifar-10-batches-py``, else a download
    (only if ``download``). The test set depends on ``cifar_test``:

    - ``"exact"``: bit-exact official test images: the first 1,000 (``cifar10.npz``) or all 10,000
      (torchvision layout). Exact, but 1,000 images give a test-accuracy standard error of about 1.3 points.
    - ``"jpeg10k"``: all 10,000 test images from ``cifar10_test10k_jpeg.npz`` (lossy JPEG re-encodings, except
      1,000 exact ones; class-interleaved, non-official order). Lower-variance accuracy estimates, but the
      pixel statistics differ slightly from the training images (std ~0.002 lower): do not compare these
      numbers with exact-test-set numbers.
    """
    if cifar_test not in CIFAR_TEST_CHOICES:
        raise ValueError(f"cifar_test must be one of {CIFAR_TEST_CHOICES}, got {cifar_test!r}")
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
        looked = [str(npz.resolve()), str(folder.resolve()) + "/{data_batch_1..5,test_batch}"]
        raise _not_found("CIFAR-10", root, looked)
    if cifar_test == "jpeg10k":
        jpeg = root / _JPEG_TEST_FILE
        if not jpeg.is_file():
            raise _not_found("the CIFAR-10 JPEG test set", root, [str(jpeg.resolve())],
                             "cifar_test='jpeg10k' needs cifar10_test10k_jpeg.npz; use cifar_test='exact' "
                             "otherwise.")
        arrays = (*arrays[:2], *read_npz(jpeg, (32, 32, 3), keys=("x_test", "y_test")))
    return arrays  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Image operations (batched, vectorised; images (N, C, H, W))
# ----------------------------------------------------------------------------------------------------------
def shift_images(x: Tensor, shifts: Tensor, flips: Tensor | None = None, pad: int | None = None) -> Tensor:
    """Translate every image by its own integer shift with zero fill (optionally flipping it first).

    x: (N, C, H, W) of any dtype; shifts: (N, 2) integers ``(dy, dx)``, positive = down / right, i.e.
    ``out[n, :, i, j] = x'[n, :, i - dy, j - dx]`` (0 outside the image), where ``x'`` is ``x`` with the
    images selected by ``flips`` ((N,) bool, optional) mirrored left-right. One gather, no loop over samples.
    ``pad``: a bound on ``|shift|`` (default: the largest one, which reads the shifts back from the device;
    a given bound keeps the operation free of host synchronisation, e.g. inside a CUDA graph). Returns (N, C, H, W).
    """
    n, c, h, w = x.shape
    shifts = shifts.to(device=x.device, dtype=torch.long)
    m = pad if pad is not None else (int(shifts.abs().max()) if n else 0)
    padded = x.new_zeros(n, c, h + 2 * m, w + 2 * m)
    padded[..., m:m + h, m:m + w] = x
    rows = torch.arange(h, device=x.device) - shifts[:, :1]  # (N, H) source row
    cols = torch.arange(w, device=x.device) - shifts[:, 1:]  # (N, W) source column before flipping
    if flips is not None:
        cols = torch.where(flips.to(x.device).view(-1, 1), w - 1 - cols, cols)
    flat = ((rows[:, :, None] + m) * (w + 2 * m) + cols[:, None, :] + m).reshape(n, 1, h * w)
    return padded.flatten(2).gather(2, flat.expand(n, c, h * w)).reshape(n, c, h, w)


def rotate_images(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate every square image about its centre by its own angle (degrees, positive = counter-clockwise
    as displayed, so 90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))``); bilinear, zero fill.

    x: (N, C, H, H) floating; angles: (N,). Returns (N, C, H, H).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_images needs square images, got {tuple(x.shape[-2:])}")
    rad = torch.deg2rad(angles.to(device=x.device, dtype=torch.float64))
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # output (x, y) (image coords, y down) samples the input at (c x - s y, s x + c y)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_images(x: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Bilinear resize (no antialiasing, ``align_corners=False``) of (N, C, H, W) to (N, C, size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(x - mean) / std`` of (N, C, H, W) on the 0-1 scale."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def paste_in_quadrants(x: Tensor, quadrants: Tensor) -> Tensor:
    """Paste (N, C, H, W) images into one quadrant each of a zero (N, C, 2H, 2W) canvas.

    Quadrant q: 0 upper-left, 1 upper-right, 2 lower-left, 3 lower-right (row offset H*(q//2), column
    offset W*(q%2)).
    """
    n, c, h, w = x.shape
    q = quadrants.to(device=x.device, dtype=torch.long)
    canvas = x.new_zeros(n, c, 2, h, 2, w)  # (quadrant row, row, quadrant column, column)
    canvas[torch.arange(n, device=x.device), :, q // 2, :, q % 2, :] = x
    return canvas.view(n, c, 2 * h, 2 * w)


# ----------------------------------------------------------------------------------------------------------
# Dataset variants
# ----------------------------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _check_task(name: str, task: str | None) -> None:
    if name == "quadrant_mnist":
        if task not in QUADRANT_TASKS:
            raise ValueError(f"quadrant_mnist needs task in {QUADRANT_TASKS}, got {task!r}")
    elif task is not None:
        raise ValueError(f"task={task!r} only applies to quadrant_mnist, not {name!r}")


def n_classes_of(name: str, task: str | None = None) -> int:
    """Number of classes of dataset ``name`` (40 for quadrant_mnist with task='digit_quadrant')."""
    _check_name(name)
    _check_task(name, task)
    return 40 if task == "digit_quadrant" else 10


def variant_generator(variant_seed: int, name: str, split: str) -> torch.Generator:
    """CPU generator for the transforms of ``name``'s ``split`` ('train' or 'test'); independent streams."""
    _check_name(name)
    key = np.random.SeedSequence([variant_seed, _VARIANT_KEYS[name], ("train", "test").index(split)])
    return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> np.uint64(1)))


def sample_variant_params(name: str, n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Per-image transform parameters of variant ``name`` for ``n`` images (CPU tensors):
    ``shifts`` (N, 2) ints in [-8, 8] (translated_mnist), ``angles`` (N,) degrees ~ U(-180, 180)
    (rotated_*), ``quadrants`` (N,) in {0..3} (quadrant_mnist); empty for the plain datasets."""
    _check_name(name)
    if name == "translated_mnist":
        m = TRANSLATION_MAX_SHIFT
        return {"shifts": torch.randint(-m, m + 1, (n, 2), generator=generator)}
    if name.startswith("rotated_"):
        return {"angles": torch.rand(n, generator=generator, dtype=torch.float64) * 360.0 - 180.0}
    if name == "quadrant_mnist":
        return {"quadrants": torch.randint(0, 4, (n,), generator=generator)}
    return {}


def variant_labels(name: str, labels: Tensor, params: dict[str, Tensor],
                   task: str | None = None) -> tuple[Tensor, Tensor]:
    """Task labels and stratification labels (for class-balanced subsets), both int64 (N,).

    quadrant_mnist: label = digit (task 'digit') or digit + 10*quadrant ('digit_quadrant'); both tasks are
    stratified by digit + 10*quadrant, so their subsets hold the same images.
    """
    _check_task(name, task)
    labels = labels.long()
    if name != "quadrant_mnist":
        return labels, labels
    joint = labels + 10 * params["quadrants"].long()
    return (labels if task == "digit" else joint), joint


def render_variant(name: str, images: np.ndarray | Tensor, params: dict[str, Tensor],
                   chunk: int = _CHUNK) -> Tensor:
    """Render raw uint8 images as variant ``name``: float32 (N, C, 32, 32), normalised.

    images: MNIST (N, 28, 28) or CIFAR (N, 32, 32, 3) HWC uint8; params: from ``sample_variant_params``
    (rows matching ``images``). Transforms act on the 0-1 scale at native size, then resize, then normalise.
    """
    _check_name(name)
    x = torch.as_tensor(images)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if "cifar" in name else (MNIST_MEAN, MNIST_STD)
    out = torch.empty(x.shape[0], x.shape[1], IMAGE_SIZE, IMAGE_SIZE)
    for start in range(0, x.shape[0], chunk):
        sl = slice(start, start + chunk)
        xb = x[sl].float() / 255.0
        if "shifts" in params:
            xb = shift_images(xb, params["shifts"][sl])
        if "angles" in params:
            xb = rotate_images(xb, params["angles"][sl])
        if "quadrants" in params:
            xb = paste_in_quadrants(xb, params["quadrants"][sl])
        out[sl] = normalise(resize_images(xb), mean, std)
    return out


@dataclass(frozen=True)
class Variant:
    """A fully rendered split: x (N, C, 32, 32) float32, y (N,) int64, strata (N,) int64, params."""

    x: Tensor
    y: Tensor
    strata: Tensor
    params: dict[str, Tensor]


def make_variant(name: str, images: np.ndarray, labels: np.ndarray, generator: torch.Generator,
                 task: str | None = None) -> Variant:
    """Sample transform parameters from ``generator`` and render all ``images`` as variant ``name``."""
    params = sample_variant_params(name, len(images), generator)
    y, strata = variant_labels(name, torch.as_tensor(labels), params, task)
    return Variant(render_variant(name, images, params), y, strata, params)


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------
def _seeded(seed: int, purpose: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, purpose]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))


def split_train_valid(n: int, n_valid: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint split of ``range(n)``: (rest, valid) index tensors, each sorted ascending."""
    if not 0 <= n_valid < n:
        raise ValueError(f"n_valid must lie in [0, {n}), got {n_valid}")
    perm = torch.randperm(n, generator=_seeded(seed, 1))
    return perm[n_valid:].sort().values, perm[:n_valid].sort().values


def balanced_subset(indices: Tensor, strata: Tensor, n_train: int, seed: int) -> Tensor:
    """Seeded class-balanced subset of ``indices`` (sorted ascending) with ``n_train`` elements.

    Each class present in ``strata[indices]`` gets ``n_train // K`` elements; the remainder goes one each to
    randomly chosen classes. Raises ValueError when a class has too few elements.
    """
    if not 0 < n_train <= len(indices):
        raise ValueError(f"n_train must lie in [1, {len(indices)}], got {n_train}")
    gen = _seeded(seed, 2)
    labels = strata[indices]
    classes = labels.unique()
    base, rem = divmod(n_train, len(classes))
    extra = torch.zeros(len(classes), dtype=torch.long)
    extra[torch.randperm(len(classes), generator=gen)[:rem]] = 1
    chosen = []
    for c, k in zip(classes.tolist(), (base + extra).tolist()):
        members = indices[labels == c]
        if k > len(members):
            raise ValueError(f"class {c} has {len(members)} training examples, {k} needed for n_train={n_train}")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values


# ----------------------------------------------------------------------------------------------------------
# Bundle
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    """Everything a run needs. ``train``/``valid``/``test``: (x (N, C, 32, 32) float32, y (N,) int64) on the
    requested device. ``train_index``/``valid_index``: CPU int64 positions in the full official training set.
    ``augment``: the training augmentation suited to this dataset (``cifar_augment`` for CIFAR variants, None
    for MNIST variants); the caller decides whether to use it. Never augment the marginal-likelihood data."""

    name: str
    train: tuple[Tensor, Tensor]
    valid: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    n_classes: int
    in_channels: int
    train_index: Tensor
    valid_index: Tensor
    task: str | None = None
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def load_dataset(name: str, data_dir: str | Path | None = None, *, task: str | None = None,
                 n_train: int | None = None, n_valid: int | None = None, valid_fraction: float = 0.1,
                 seed: int = 0, variant_seed: int = 0, download: bool = False, cifar_test: str = "exact",
                 device: str | torch.device = "cpu") -> DataBundle:
    """Load dataset ``name`` (one of ``DATASETS``) as a ``DataBundle``.

    The validation set is ``n_valid`` (default ``round(valid_fraction * N_train_full)``) seeded examples of
    the official training set; ``n_train`` (default: all the rest) takes a seeded class-balanced subset of
    the rest. ``seed`` drives the split and subset; ``variant_seed`` drives the per-image transforms
    (fixed by default, so the benchmark is the same for every run seed). ``task`` is required for
    ``quadrant_mnist`` ('digit' or 'digit_quadrant'). ``cifar_test``: see ``read_cifar10``.
    """
    _check_name(name)
    n_classes = n_classes_of(name, task)
    cifar = "cifar" in name
    if cifar:
        x_tr, y_tr, x_te, y_te = read_cifar10(data_dir, cifar_test=cifar_test, download=download)
    else:
        x_tr, y_tr, x_te, y_te = read_mnist(data_dir, download=download)
    n_full = len(x_tr)

    params = sample_variant_params(name, n_full, variant_generator(variant_seed, name, "train"))
    y_all, strata = variant_labels(name, torch.as_tensor(y_tr), params, task)
    n_valid = round(valid_fraction * n_full) if n_valid is None else n_valid
    rest, valid_idx = split_train_valid(n_full, n_valid, seed)
    train_idx = rest if n_train is None else balanced_subset(rest, strata, n_train, seed)

    def render(idx: Tensor) -> tuple[Tensor, Tensor]:
        sub = {k: v[idx] for k, v in params.items()}
        return render_variant(name, x_tr[idx.numpy()], sub).to(device), y_all[idx].to(device)

    test = make_variant(name, x_te, y_te, variant_generator(variant_seed, name, "test"), task)
    test_source = "exact" if not cifar or cifar_test == "exact" else "jpeg10k (lossy, non-official order)"
    log.info("%s: %d train, %d valid, %d test (%s)", name, len(train_idx), len(valid_idx), len(x_te), test_source)
    return DataBundle(
        name=name, train=render(train_idx), valid=render(valid_idx), test=(test.x.to(device), test.y.to(device)),
        n_classes=n_classes, in_channels=3 if cifar else 1, train_index=train_idx, valid_index=valid_idx,
        task=task, augment=cifar_augment if cifar else None,
        info={"test_source": test_source, "n_train_full": n_full, "seed": seed, "variant_seed": variant_seed},
    )


# ----------------------------------------------------------------------------------------------------------
# Augmentation and loader
# ----------------------------------------------------------------------------------------------------------
def sample_flip_shift(n: int, generator: torch.Generator | None,
                      max_shift: int = CIFAR_MAX_SHIFT) -> tuple[Tensor, Tensor]:
    """Per-sample augmentation parameters: flips (N,) bool with p=0.5, shifts (N, 2) ints in
    [-max_shift, max_shift] (drawn in that order from ``generator``)."""
    flips = torch.rand(n, generator=generator) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    return flips, shifts


def apply_flip_shift(x: Tensor, flips: Tensor, shifts: Tensor) -> Tensor:
    """Horizontally flip the images where ``flips`` is True, then shift them (zero fill) by ``shifts``.

    x: (N, C, H, W); flips: (N,) bool; shifts: (N, 2) ``(dy, dx)``. A shift (dy, dx) equals a crop of the
    4-zero-padded image at offset (4 - dy, 4 - dx).
    """
    return shift_images(x, shifts, flips)


@dataclass(frozen=True)
class FlipShift:
    """Per-sample random horizontal flip (p=0.5) and random shift by up to ``max_shift`` px with zero padding
    (= pad-``max_shift`` random crop): ``augment(x (B, C, H, W), generator) -> (B, C, H, W)``.

    Drawing the parameters (``sample``, from a CPU generator) and applying them (``apply``, on the images'
    device, free of host synchronisation) are separate, so that a whole epoch's parameters can be drawn
    ahead and applied inside a captured CUDA graph (:mod:`ella.static_step`).
    """

    max_shift: int = CIFAR_MAX_SHIFT

    def sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(flips (n,) bool, shifts (n, 2) int64)``, drawn as :func:`sample_flip_shift` draws them."""
        return sample_flip_shift(n, generator, self.max_shift)

    def apply(self, x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        flips, shifts = params
        return shift_images(x, shifts, flips, pad=self.max_shift)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], generator))


cifar_augment = FlipShift()  # the CIFAR training augmentation (flip, shift by up to 4 px)


class TensorLoader:
    """Minimal loader over on-device tensors yielding ``(x[batch], y[batch])``.

    With ``shuffle`` every epoch draws a new permutation from ``generator`` (a CPU ``torch.Generator``;
    default: seeded with 0, so runs are reproducible). ``augment(x_batch, generator)`` is applied to each
    batch and must act per sample. ``dataset`` and ``batch_size`` are provided for laplace-torch.

    Sharding (``world_size > 1``) follows ``torch.utils.data.DistributedSampler``: every rank draws the same
    epoch permutation (give all ranks identically seeded generators), pads it by wrapping around to a multiple
    of ``world_size`` and takes every ``world_size``-th position starting at ``rank``, so all ranks see the same
    number of batches. ``pad_shards=False`` instead gives an exact partition (shards differ by at most one
    sample; for sums over the data set such as KFAC). Sharded augmentation uses a fresh generator per batch,
    seeded from ``generator`` plus ``rank``, so ranks augment differently but ``generator`` stays in step on
    all of them (its state, saved by rank 0, resumes every rank).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 generator: torch.Generator | None = None, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pad_shards: bool = True) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.x, self.y = x, y
        self.dataset = TensorDataset(x, y)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_last = drop_last
        self.rank, self.world_size, self.pad_shards = rank, world_size, pad_shards

    def num_samples(self) -> int:
        """Samples this rank sees per epoch (all of them when unsharded; padded shards are equal)."""
        n = len(self.x)
        if self.world_size == 1:
            return n
        if self.pad_shards:
            return -(-n // self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def shard(self, order: Tensor) -> Tensor:
        """This rank's positions ``(num_samples(),)`` out of an epoch order ``(N,)`` (see the class docstring)."""
        if self.pad_shards and len(order) % self.world_size:
            total = self.num_samples() * self.world_size
            order = order.repeat(-(-total // len(order)))[:total]
        return order[self.rank::self.world_size]

    def epoch_order(self) -> Tensor | None:
        """Draw this epoch's sample positions for this rank, ``(num_samples(),)`` on the data's device (None:
        the plain order ``0..N-1``). Iterating the loader draws it first, then each batch's augmentation."""
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if self.world_size > 1:
            order = self.shard(torch.arange(n) if order is None else order)
        return None if order is None else order.to(self.x.device)

    def augment_generator(self) -> torch.Generator:
        """The generator the next batch's augmentation draws from (see the class docstring)."""
        if self.world_size == 1:
            return self.generator
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        return torch.Generator().manual_seed(seed + self.rank)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.epoch_order()
        n_local = self.num_samples()
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n_local)
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                xb, yb = self.x[order[lo:hi]], self.y[order[lo:hi]]
            if self.augment is not None:
                xb = self.augment(xb, self.augment_generator())
            yield xb, yb
