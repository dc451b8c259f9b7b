"""Seeded, streamed synthetic task distributions of MSR (paper Sec. 5, App. D.1-D.2).

Nothing is materialised: every task is a fixed function of ``(problem seed, split, task index)``. Its
data-generating weights and its fixed pool of inputs are drawn from a per-task ``torch.Generator`` when a
batch asks for it, so memory is O(batch) regardless of the number of tasks.

Splits: ``"train"`` tasks own ``examples_per_train_task`` examples (paper Table 5, small/large regimes);
``"test"`` tasks own ``examples_per_test_task`` examples of which ``n_support`` (paper: 1) are the support
set and the rest the query set. Meta-training batches split each train task's pool into ``n_support``
support examples and the remaining ones as query (a fresh random split per draw, as the reference code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = {"train": 0, "test": 1}


@dataclass
class Batch:
    """A meta-batch. Shapes: ``x_* (T, N_*, *input_shape)``, ``y_* (T, N_*, *output_shape)``."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.x_support, self.y_support, self.x_query, self.y_query)))


def _generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded from a tuple of non-negative ints via numpy's SeedSequence."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _task_generator(seed: int, split: str, index: int) -> torch.Generator:
    return _generator(seed, SPLITS[split], index)


class SyntheticProblem:
    """Base class: a finite set of train/test tasks with fixed example pools.

    Subclasses define ``input_shape``, ``_draw_weights(gen)`` and ``apply(weights, x)``.
    """

    input_shape: tuple[int, ...]

    def __init__(
        self,
        n_train_tasks: int,
        n_test_tasks: int,
        examples_per_train_task: int,
        examples_per_test_task: int = 20,
        n_support: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if examples_per_train_task <= n_support or examples_per_test_task <= n_support:
            raise ValueError(
                f"need more examples per task than n_support={n_support} (train {examples_per_train_task}, "
                f"test {examples_per_test_task}) so that the query set is not empty"
            )
        self.n_tasks = {"train": n_train_tasks, "test": n_test_tasks}
        self.n_examples = {"train": examples_per_train_task, "test": examples_per_test_task}
        self.n_support, self.seed, self.dtype = n_support, seed, dtype

    def _draw_weights(self, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Data-generating layer of one task: ``x (N, *input_shape) -> y (N, *output_shape)``."""
        raise NotImplementedError

    def task(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights, inputs ``(N, *input_shape)`` and outputs ``(N, *output_shape)`` of one task (deterministic)."""
        if not 0 <= index < self.n_tasks[split]:
            raise IndexError(f"{split} task index {index} out of range [0, {self.n_tasks[split]})")
        gen = _task_generator(self.seed, split, index)
        weights = self._draw_weights(gen)
        x = torch.randn(self.n_examples[split], *self.input_shape, generator=gen, dtype=self.dtype)
        return weights, x, self.apply(weights, x)

    def tasks(self, split: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked example pools: ``x (T, N, *input_shape)``, ``y (T, N, *output_shape)``."""
        pools = [self.task(split, i)[1:] for i in indices]
        return torch.stack([p[0] for p in pools]), torch.stack([p[1] for p in pools])

    def sample_batch(self, rng: np.random.Generator, batch_size: int, split: str = "train") -> Batch:
        """Random tasks (without replacement within the batch) with a random support/query split of each pool."""
        indices = rng.choice(self.n_tasks[split], size=min(batch_size, self.n_tasks[split]), replace=False)
        x, y = self.tasks(split, indices.tolist())
        perm = torch.from_numpy(np.stack([rng.permutation(x.shape[1]) for _ in indices]))
        x = torch.stack([xi[p] for xi, p in zip(x, perm)])
        y = torch.stack([yi[p] for yi, p in zip(y, perm)])
        s = self.n_support
        return Batch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])

    def test_batches(self, batch_size: int, n_tasks: int | None = None) -> list[Batch]:
        """Deterministic batches over the first ``n_tasks`` test tasks (all by default); first examples = support."""
        n = self.n_tasks["test"] if n_tasks is None else min(n_tasks, self.n_tasks["test"])
        out = []
        for start in range(0, n, batch_size):
            x, y = self.tasks("test", list(range(start, min(n, start + batch_size))))
            s = self.n_support
            out.append(Batch(x[:, :s], y[:, :s], x[:, s:], y[:, s:]))
        return out


class TranslationProblem(SyntheticProblem):
    """Rank-k locally connected 1-D layer (paper Sec. 5.1): ``x (70,) -> y (68,)``, filter width 3, no bias.

    rank 1: one N(0, I_3) filter per task shared by all positions (exact translation equivariance).
    rank k > 1: a connectivity matrix ``C (68, k)`` = softmax over k of N(0, 1) logits, drawn once per
    problem; per task k basis filters ``B (k, 3)`` ~ N(0, I); position filter p = ``C[p] @ B``.
    Task weights are the per-position filters ``(68, 3)``.
    """

    def __init__(self, rank: int, in_features: int = 70, kernel_size: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        if rank < 1:
            raise ValueError(f"TranslationProblem: rank must be >= 1, got {rank}")
        self.rank, self.kernel_size = rank, kernel_size
        self.input_shape = (in_features,)
        self.out_features = in_features - kernel_size + 1
        gen = _generator(self.seed, len(SPLITS))  # problem-level stream, disjoint from task streams
        logits = torch.randn(self.out_features, rank, generator=gen, dtype=self.dtype)
        self.connectivity = torch.softmax(logits, dim=-1) if rank > 1 else torch.ones_like(logits)

    def _draw_weights(self, gen: torch.Generator) -> torch.Tensor:
        basis = torch.randn(self.rank, self.kernel_size, generator=gen, dtype=self.dtype)
        return self.connectivity @ basis

    def apply(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x.unfold(-1, self.kernel_size, 1) * weights).sum(-1)


def group_filters(base: torch.Tensor, group: str) -> torch.Tensor:
    """Transformed copies of base filters: ``(F, K, K) -> (F * |G|, 1, K, K)``, field-major.

    C4: channel ``f*4 + r`` holds ``rot90(base[f], r)``. D4: channel ``f*8 + s*4 + r`` holds
    ``rot90(flip_s(base[f]), r)`` with flip_1 = mirror of the last (width) axis.
    """
    if group == "C4":
        copies = [torch.rot90(base, r, dims=(-2, -1)) for r in range(4)]
    elif group == "D4":
        flipped = torch.flip(base, dims=(-1,))
        copies = [torch.rot90(b, r, dims=(-2, -1)) for b in (base, flipped) for r in range(4)]
    else:
        raise ValueError(f"group_filters: unsupported group {group!r} (expected 'C4' or 'D4')")
    return torch.stack(copies, dim=1).flatten(0, 1).unsqueeze(1)


class RotationProblem(SyntheticProblem):
    """Group-lifting conv layer equivariant to C4 (rotations) or D4 (rotations + flips) (paper Sec. 5.2).

    Per task ``n_fields`` base KxK filters ~ N(0, filter_std^2 I) (default std 1/K: unit output variance for
    N(0, 1) inputs, the scale of the paper's reported MSEs); the layer correlates a ``(1, S, S)`` input with
    every rotated (and flipped) copy, giving ``(n_fields * |G|, S-2, S-2)`` outputs (regular fields). The
    paper used C8/D8 via e2cnn; on a pixel grid only 90-degree rotations and flips are exact permutations,
    so we use C4/D4 (exactly equivariant without interpolation).
    """

    def __init__(
        self,
        group: str = "C4",
        n_fields: int = 3,
        image_size: int = 12,
        kernel_size: int = 3,
        filter_std: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.filter_std = 1.0 / kernel_size if filter_std is None else filter_std
        if group not in ("C4", "D4"):
            raise ValueError(f"RotationProblem: unsupported group {group!r} (expected 'C4' or 'D4')")
        self.group, self.n_fields, self.kernel_size = group, n_fields, kernel_size
        self.group_order = 4 if group == "C4" else 8
        self.out_channels = n_fields * self.group_order
        self.input_shape = (1, image_size, image_size)

    def _draw_weights(self, gen: torch.Generator) -> torch.Tensor:
        base = torch.randn(self.n_fields, self.kernel_size, self.kernel_size, generator=gen, dtype=self.dtype)
        return group_filters(base * self.filter_std, self.group)

    def apply(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weights)
