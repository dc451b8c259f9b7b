"""The paper's dataset variants: names, fixed-seed per-image transform parameters, labels and rendering.

``mnist``, ``translated_mnist``, ``rotated_mnist``, ``quadrant_mnist`` (``task="digit"|"digit_quadrant"``),
``cifar10``, ``rotated_cifar10``. Geometric transforms act on the 0-1 pixel scale (zero fill = black /
background), at the native resolution, before resizing to 32x32 (bilinear, no antialiasing) and normalising.
The random transform of an image depends only on ``variant_seed`` and its index in the official order, so the
same image gets the same transform whatever the split or subset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ella.data.images import IMAGE_SIZE, normalise, paste_in_quadrants, resize_images, rotate_images, shift_images

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
TRANSLATION_MAX_SHIFT = 8

DATASETS = ("mnist", "translated_mnist", "rotated_mnist", "quadrant_mnist", "cifar10", "rotated_cifar10")
QUADRANT_TASKS = ("digit", "digit_quadrant")
_VARIANT_KEYS = {name: i for i, name in enumerate(DATASETS)}
_CHUNK = 4096


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
