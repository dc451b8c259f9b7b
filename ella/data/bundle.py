"""One call from a dataset name to everything a run needs: rendered train / valid / test splits on the device."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ella.data.augment import cifar_augment
from ella.data.readers import read_cifar10_with_source, read_mnist_with_source
from ella.data.splits import balanced_subset, split_train_valid
from ella.data.variants import (
    make_variant, n_classes_of, render_variant, sample_variant_params, variant_generator, variant_labels,
)

log = logging.getLogger(__name__)


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


def _warn_if_classes_missing(labels: Tensor, pool: Tensor, pool_strata: Tensor, n_classes: int) -> None:
    """Log a warning when the training labels ``(N,)`` miss some of the ``n_classes`` classes (the network can
    never learn to predict those), saying why: the stratified subset of the training pool (labels ``pool``,
    strata ``pool_strata``) was too small to give every stratum an image, or the pool lacks them."""
    present = labels.unique()
    if len(present) == n_classes:
        return
    missing = sorted(set(range(n_classes)) - set(present.tolist()))
    what = (f"a single class (label {int(present[0])} in all {len(labels)} images), so the network can only learn "
            "to predict that label" if len(present) == 1 else
            f"{len(present)} of the {n_classes} classes ({len(missing)} missing: {missing}), so the network can "
            "never learn to predict the missing ones")
    absent = sorted(set(missing) - set(pool.tolist()))
    reasons = []
    if len(absent) < len(missing):
        reasons.append(f"the training subset is stratified (class-balanced), but --n-train {len(labels)} is too "
                       f"small to give each class an image: --n-train {len(pool_strata.unique())} or more does")
    if absent:
        reasons.append(f"classes {absent} are absent from the training images left after the validation split: "
                       "lower --n-valid, or check the labels of the data in --data-dir")
    log.warning("the training data hold %s; %s", what, "; ".join(reasons))


def _warn_if_valid_misses_classes(labels: Tensor, n_classes: int) -> None:
    """Log a warning when the validation labels ``(N_valid,)`` miss some of the ``n_classes`` classes: the split is
    a seeded random draw, not stratified, so a small one can."""
    missing = sorted(set(range(n_classes)) - set(labels.unique().tolist()))
    if missing:
        log.warning("the %d validation images hold no image of classes %s (the validation split is a random draw, "
                    "not class-balanced), so the validation accuracy and NLL say nothing about them: a larger "
                    "--n-valid makes this unlikely", len(labels), missing)


def load_dataset(name: str, data_dir: str | Path | None = None, *, task: str | None = None,
                 n_train: int | None = None, n_valid: int | None = None, valid_fraction: float = 0.1,
                 seed: int = 0, variant_seed: int = 0, download: bool = False, cifar_test: str = "auto",
                 device: str | torch.device = "cpu") -> DataBundle:
    """Load dataset ``name`` (one of ``DATASETS``) as a ``DataBundle``.

    The validation set is ``n_valid`` (default ``round(valid_fraction * N_train_full)``) seeded examples of
    the official training set; ``n_train`` (default: all the rest) takes a seeded class-balanced subset of
    the rest. ``seed`` drives the split and subset; ``variant_seed`` drives the per-image transforms
    (fixed by default, so the benchmark is the same for every run seed). ``task`` is required for
    ``quadrant_mnist`` ('digit' or 'digit_quadrant'). ``cifar_test``: see ``read_cifar10_with_source``;
    ``info["test_source"]`` says which test set was taken.
    Error messages name the command-line flags these arguments come from (``--n-train``, ``--n-valid``,
    ``--valid-fraction``, ``--cifar-test``, ``--data-dir``, ``--download``).
    """
    n_classes = n_classes_of(name, task)
    cifar = "cifar" in name
    if cifar:
        (x_tr, y_tr, x_te, y_te), test_source = read_cifar10_with_source(data_dir, cifar_test=cifar_test,
                                                                         download=download)
    else:
        (x_tr, y_tr, x_te, y_te), test_source = read_mnist_with_source(data_dir, download=download)
    n_full = len(x_tr)

    params = sample_variant_params(name, n_full, variant_generator(variant_seed, name, "train"))
    y_all, strata = variant_labels(name, torch.as_tensor(y_tr), params, task)
    if n_valid is None:
        n_valid = round(valid_fraction * n_full)
        if not 0 <= n_valid < n_full:
            raise ValueError(f"--valid-fraction {valid_fraction} holds out {n_valid} of the {n_full} training images; "
                             "it must lie in [0, 1) and leave some for training")
    rest, valid_idx = split_train_valid(n_full, n_valid, seed)
    train_idx = rest if n_train is None else balanced_subset(rest, strata, n_train, seed)
    _warn_if_classes_missing(y_all[train_idx], y_all[rest], strata[rest], n_classes)
    _warn_if_valid_misses_classes(y_all[valid_idx], n_classes)

    def render(idx: Tensor) -> tuple[Tensor, Tensor]:
        sub = {k: v[idx] for k, v in params.items()}
        return render_variant(name, x_tr[idx.numpy()], sub).to(device), y_all[idx].to(device)

    test = make_variant(name, x_te, y_te, variant_generator(variant_seed, name, "test"), task)
    log.info("%s: %d train, %d valid, test set %s", name, len(train_idx), len(valid_idx), test_source)
    return DataBundle(
        name=name, train=render(train_idx), valid=render(valid_idx), test=(test.x.to(device), test.y.to(device)),
        n_classes=n_classes, in_channels=3 if cifar else 1, train_index=train_idx, valid_index=valid_idx,
        task=task, augment=cifar_augment if cifar else None,
        info={"test_source": test_source, "n_train_full": n_full, "seed": seed, "variant_seed": variant_seed},
    )
