"""A minimal, reproducible, shardable loader over tensors that already sit on the device."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import TensorDataset


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
