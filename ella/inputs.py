"""What a training run accepts, checked before it starts: a model with relaxed layers whose every module KFAC
supports, and data as tensors ``(x, y)`` or loaders of ``(x, y)`` batches.

A model without a :class:`~ella.layers.RelaxedLayer` has no path precision to learn; a module without a KFAC rule
(a normalisation layer, a user's own path type) or used in a way KFAC cannot follow (called twice, an in-place
activation on its output) would fail only at the first marginal-likelihood round, possibly hours into a run:
:func:`check_curvature` runs KFAC on two training examples instead, and :class:`ModelError` names the module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Union

import torch
from torch import Tensor, nn

from ella.layers import RelaxedLayer
from kfac import kfac_batch

Pair = tuple[Tensor, Tensor]
Data = Union[Pair, Iterable]  # tensors (x (N, ...), y (N,)) or a loader yielding (x (B, ...), y (B,)) batches


class ModelError(ValueError):
    """The model cannot be trained by ella: it has no relaxed layer, or KFAC cannot compute its curvature."""


def check_model(model: nn.Module) -> None:
    """Raise :class:`ModelError` unless ``model`` holds at least one :class:`~ella.layers.RelaxedLayer`."""
    if not any(isinstance(module, RelaxedLayer) for module in model.modules()):
        raise ModelError(
            f"the model ({type(model).__name__}) has no relaxed layer, so there is no path precision to learn: "
            "build its layers with ella.layers.relaxed_layer (or ella.layers.RelaxedLayer)"
        )


@contextmanager
def _rng_kept(loader: Iterable, device: torch.device) -> Iterator[None]:
    """Leave the global random state (and a loader's own ``generator``) as they were before the block."""
    generator = getattr(loader, "generator", None)
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if state is not None:
            generator.set_state(state)


def check_curvature(model: nn.Module, loader: Iterable, name: str, **kfac_options) -> None:
    """Run KFAC (:func:`kfac.kfac_batch`, with ``kfac_options``) on the first two examples of ``loader`` (the
    data called ``name``) and raise :class:`ModelError` naming the module KFAC does not support. The parameters,
    the global random state and the loader's ``generator`` are left as they were (a sampler drawing from a
    generator of its own is advanced by one epoch's draw)."""
    device = next(model.parameters()).device
    with _rng_kept(loader, device):
        x, y = as_pair(next(iter(loader)), name, device)
        try:
            kfac_batch(model, x[:2], y[:2], **kfac_options)
        except NotImplementedError as error:
            raise ModelError(f"cannot compute the marginal likelihood of this model: {error}") from error


def as_pair(batch: object, name: str, device: torch.device) -> Pair:
    """``batch`` as ``(x, y)`` on ``device``; a ValueError saying what the ``name`` data yielded instead."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    raise ValueError(f"the {name} data must be tensors (x, y) or a loader of (inputs, targets) batches, as a "
                     f"DataLoader over a TensorDataset yields; a batch was {_describe(batch)}")


def _describe(batch: object) -> str:
    if isinstance(batch, Tensor):
        return f"one tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items ({', '.join(type(b).__name__ for b in batch)})"
    return f"a {type(batch).__name__}"


def is_pair(data: object) -> bool:
    """True for tensors ``(x, y)`` (as opposed to a loader)."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


class PairLoader:
    """A loader's batches as :func:`as_pair` makes them: checked ``(x, y)`` pairs on ``device``."""

    def __init__(self, loader: Iterable, name: str, device: torch.device) -> None:
        self.loader, self.name, self.device = loader, name, device

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self) -> torch.Generator | None:
        """The wrapped loader's own generator, if it has one (see :func:`check_curvature`)."""
        return getattr(self.loader, "generator", None)

    def __iter__(self) -> Iterator[Pair]:
        for batch in self.loader:
            yield as_pair(batch, self.name, self.device)


def dataset_size(data: Data, name: str) -> int:
    """How many examples ``data`` holds: ``len(y)`` of tensors, ``len(loader.dataset)`` of a loader."""
    if is_pair(data):
        return len(data[1])
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        raise ValueError(f"cannot tell how many examples the {name} loader holds: give it a .dataset (as a torch "
                         "DataLoader has) or pass tensors (x, y)")
    return len(dataset)


def first_inputs(data: Data, n: int, name: str, device: torch.device) -> Tensor:
    """The inputs of the first ``n`` examples of ``data`` (fewer if it holds fewer), on ``device``."""
    if is_pair(data):
        return data[0][:n].to(device)
    parts, count = [], 0
    for batch in data:
        x, _ = as_pair(batch, name, device)
        parts.append(x[: n - count])
        count += len(parts[-1])
        if count >= n:
            break
    return torch.cat(parts)
