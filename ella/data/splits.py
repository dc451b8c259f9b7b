"""Seeded splits of the official training set: a validation hold-out and a class-balanced training subset.

The validation split is carved from the training set; the test set is never used for selection.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _seeded(seed: int, purpose: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, purpose]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))


def split_train_valid(n: int, n_valid: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint split of ``range(n)``: (rest, valid) index tensors, each sorted ascending."""
    if not 0 <= n_valid < n:
        raise ValueError(f"--n-valid must lie in [0, {n}) for {n} training images, got {n_valid}")
    perm = torch.randperm(n, generator=_seeded(seed, 1))
    return perm[n_valid:].sort().values, perm[:n_valid].sort().values


def balanced_subset(indices: Tensor, strata: Tensor, n_train: int, seed: int) -> Tensor:
    """Seeded class-balanced subset of ``indices`` (sorted ascending) with ``n_train`` elements.

    Each class present in ``strata[indices]`` gets ``n_train // K`` elements; the remainder goes one each to
    randomly chosen classes. Raises ValueError when a class has too few elements.
    """
    if not 0 < n_train <= len(indices):
        raise ValueError(f"--n-train must lie in [1, {len(indices)}] (the training images left after the validation "
                         f"split), got {n_train}")
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
            raise ValueError(f"--n-train {n_train} needs {k} training images of class {c}, but only {len(members)} "
                             "are left after the validation split; lower --n-train or --n-valid")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values
