"""Datasets for ella: MNIST / CIFAR-10 and their fixed-seed variants, splits and a fast tensor loader.

Every dataset is returned as float32 images ``(N, C, 32, 32)`` (normalised) and int64 labels ``(N,)``; one call,
:func:`load_dataset`, gives a :class:`DataBundle` with everything a run needs. One module per job:

- :mod:`~ella.data.locate`: the data folder (``--data-dir``, else ``$ELLA_DATA``, else ``./data``) and the error
  that lists where it looked;
- :mod:`~ella.data.readers`: uint8 arrays from the project's ``.npz`` files, else torchvision's on-disk layout
  (read by ``torchvision.datasets`` with its checksum checks), else a torchvision download when asked
  (``--download``);
- :mod:`~ella.data.images`: batched image operations (shift, rotate, resize, normalise, paste in a quadrant);
- :mod:`~ella.data.variants`: the paper's variants (translated / rotated / quadrant MNIST, rotated CIFAR-10),
  whose per-image transforms depend only on ``variant_seed`` and the image's index in the official order;
- :mod:`~ella.data.splits`: the seeded validation hold-out (carved from the training set; the test set is never
  used for selection) and class-balanced training subsets;
- :mod:`~ella.data.bundle`: :func:`load_dataset` and :class:`DataBundle`;
- :mod:`~ella.data.augment` and :mod:`~ella.data.loader`: CIFAR-10 training augmentation and
  :class:`TensorLoader`.
"""
from ella.data.augment import CIFAR_MAX_SHIFT, FlipShift, apply_flip_shift, cifar_augment, sample_flip_shift
from ella.data.bundle import DataBundle, load_dataset
from ella.data.images import IMAGE_SIZE, normalise, paste_in_quadrants, resize_images, rotate_images, shift_images
from ella.data.loader import TensorLoader
from ella.data.locate import DatasetNotFoundError, resolve_data_dir
from ella.data.readers import (
    CIFAR_TEST_CHOICES, RawArrays, read_cifar10, read_cifar10_torchvision, read_cifar10_with_source, read_mnist,
    read_mnist_torchvision, read_mnist_with_source, read_npz,
)
from ella.data.splits import balanced_subset, split_train_valid
from ella.data.variants import (
    CIFAR10_MEAN, CIFAR10_STD, DATASETS, MNIST_MEAN, MNIST_STD, QUADRANT_TASKS, TRANSLATION_MAX_SHIFT, Variant,
    make_variant, n_classes_of, render_variant, sample_variant_params, variant_generator, variant_labels,
)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR_MAX_SHIFT", "CIFAR_TEST_CHOICES", "DATASETS", "IMAGE_SIZE", "MNIST_MEAN",
    "MNIST_STD", "QUADRANT_TASKS", "TRANSLATION_MAX_SHIFT", "DataBundle", "DatasetNotFoundError", "FlipShift", "RawArrays",
    "TensorLoader", "Variant", "apply_flip_shift", "balanced_subset", "cifar_augment", "load_dataset",
    "make_variant", "n_classes_of", "normalise", "paste_in_quadrants", "read_cifar10", "read_cifar10_torchvision", "read_cifar10_with_source",
    "read_mnist", "read_mnist_torchvision", "read_mnist_with_source", "read_npz", "render_variant", "resize_images",
    "resolve_data_dir",
    "rotate_images", "sample_flip_shift", "sample_variant_params", "shift_images", "split_train_valid",
    "variant_generator", "variant_labels",
]
