"""What a training run accepts, checked before it starts: a model with relaxed layers whose every module KFAC
supports, and data as tensors ``(x, y)`` or loaders of ``(x, y)`` batches.

A model without a :class:`~ella.layers.RelaxedLayer` has no path precision to learn; a module without a KFAC rule
(a normalisation layer, a user's own path type) or used in a way KFAC cannot follow (called twice, an in-place
activation on its output) would fail only at the first marginal-likelihood round, possibly hours into a run:
:func:`check_curvature` runs KFAC on two training examples instead, and :class:`ModelError` names the module.

Data are named by the argument of :func:`ella.learn.learn` they were given as (``train``, ``valid``, ``test``,
``laplace_data``). Tensors are checked whole before training (:func:`check_pair`): as many labels as inputs,
labels that are class indices of the model's output, finite inputs; the first bad example is named by its index.
A loader's batches are checked the same way as they come (:class:`CheckedLoader`), named by batch and row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

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
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise ModelError("cannot compute the marginal likelihood of this model: an in-place operation (such as "
                             "nn.ReLU(inplace=True) or x += ...) changes a tensor that the curvature pass needs; use "
                             f"its out-of-place form ({str(error).split(';')[0]})") from error


def as_pair(batch: object, name: str, device: torch.device) -> Pair:
    """``batch`` as ``(x, y)`` on ``device``; a ValueError saying what the ``name`` data yielded instead."""
    x, y = _require_pair(batch, name)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _require_pair(batch: object, name: str) -> Pair:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    raise ValueError(f"{name} must be tensors (x, y) or a loader of (inputs, targets) batches, as a DataLoader "
                     f"over a TensorDataset yields; a batch was {_describe(batch)}")


def output_classes(model: nn.Module, data: Data, name: str) -> tuple[int, torch.dtype]:
    """The number of classes ``K`` of ``model``'s output ``(B, K)`` on the first example of ``data``, and the
    dtype of that example's inputs (which the model takes); the model's mode, the global random state and a
    loader's ``generator`` are left as they were. Inputs of another dtype than the model's parameters that the
    model cannot take are a ValueError saying how to convert them."""
    parameter = next(model.parameters())
    was_training = model.training
    with _rng_kept(data, parameter.device), torch.no_grad():
        x = first_inputs(data, 1, name, parameter.device)
        model.eval()
        try:
            out = model(x)
        except (RuntimeError, TypeError) as error:
            if x.dtype == parameter.dtype:
                raise
            raise ValueError(f"the model cannot take the inputs of {name}: {_convert_hint(x.dtype, parameter.dtype)} "
                             f"({str(error).splitlines()[0]})") from error
        finally:
            model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2:
        gave = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else _describe(out)
        raise ModelError(f"the model must map a batch of inputs to one tensor of class scores (B, K); on one example "
                         f"of {name} it gave {gave}")
    return out.shape[1], x.dtype


def _convert_hint(given: torch.dtype, wanted: torch.dtype) -> str:
    """What to do about inputs of dtype ``given`` for a model that takes ``wanted``."""
    if given.is_floating_point:
        return f"they are {given} and the model takes {wanted}: convert them with x.to({wanted}) (or the model)"
    return (f"they are {given} and the model takes {wanted}: convert them, e.g. x.to({wanted}) / 255 for 8-bit "
            "images, then normalise")


def check_pair(data: Pair, name: str, n_classes: int, where: str = "", dtype: torch.dtype | None = None) -> None:
    """Raise a ValueError naming ``name`` (and the first bad example's index, ``where`` appended to it) unless
    ``data`` holds as many labels as inputs, at least one example, labels ``(N,)`` of integer class indices in
    ``[0, n_classes)``, finite inputs and (given ``dtype``, the inputs' dtype the model takes) inputs of
    ``dtype``."""
    x, y = data
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name}: the inputs{where} are not those the model takes: {_convert_hint(x.dtype, dtype)}")
    if len(x) != len(y):
        raise ValueError(f"{name} holds {len(x)} inputs but {len(y)} labels{where}")
    if len(y) == 0:
        raise ValueError(f"{name} holds no examples{where}")
    if y.dim() == 2 and y.shape[1] == n_classes and (y.is_floating_point() or y.dtype == torch.bool):
        raise ValueError(f"the labels of {name} look one-hot (shape {tuple(y.shape)}, {y.dtype}){where}: learn() "
                         f"expects class indices, a 1-d integer tensor (N,) with values in [0, {n_classes}); "
                         "pass y.argmax(1)")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"the labels of {name} must be class indices, a 1-d integer tensor (N,) with values in "
                         f"[0, {n_classes}); got shape {tuple(y.shape)}, {y.dtype}{where}")
    bad = ((y < 0) | (y >= n_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}: the label of example {i}{where} is {int(y[i])}, not a class index in "
                         f"[0, {n_classes}) (the model gives {n_classes} class scores)")
    if x.is_floating_point() or x.is_complex():
        bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()
        if len(bad):
            raise ValueError(f"{name}: example {int(bad[0])}{where} has non-finite inputs (nan or inf); repair or "
                             "drop it before training")


class CheckedLoader:
    """A user's loader whose batches are checked by :func:`check_pair` as they come (``name``: the data's
    argument name; a bad example is named by its batch and row); it passes on ``len``, ``dataset`` and
    ``generator``."""

    def __init__(self, loader: Iterable, name: str, n_classes: int, dtype: torch.dtype | None = None) -> None:
        self.loader, self.name, self.n_classes, self.dtype = loader, name, n_classes, dtype

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> object:
        return getattr(self.loader, "dataset", None)

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.loader, "generator", None)

    def __iter__(self) -> Iterator[Pair]:
        for index, batch in enumerate(self.loader):
            pair = _require_pair(batch, self.name)
            check_pair(pair, self.name, self.n_classes, where=f" in batch {index}", dtype=self.dtype)
            yield pair[0], pair[1].long()


def checked(data: Data, name: str, n_classes: int, dtype: torch.dtype | None = None) -> Data:
    """``data`` checked (with inputs of ``dtype``, if given): tensors now and whole (:func:`check_pair`), a loader
    batch by batch as it yields them (:class:`CheckedLoader`; an ella :class:`~ella.data.TensorLoader` whole,
    through its tensors). Labels of any integer dtype come out as int64 (what the losses take)."""
    if is_pair(data):
        check_pair(data, name, n_classes, dtype=dtype)
        return data[0], data[1].long()
    tensors = (getattr(data, "x", None), getattr(data, "y", None))
    if all(isinstance(t, Tensor) for t in tensors):  # a TensorLoader: keep it, so CUDA can capture its steps
        check_pair(tensors, name, n_classes, dtype=dtype)
        return data
    return CheckedLoader(data, name, n_classes, dtype)


def check_kind(data: object, name: str) -> None:
    """Raise a ValueError unless ``data`` is tensors ``(x, y)`` or an iterable of batches: a ``Dataset`` (whose
    items are single examples) is named with how to batch it, and a loader over a dataset that holds no
    examples is refused."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise ValueError(f"{name} is a {type(data).__name__} of single examples: pass tensors (x, y) or batches, "
                         "e.g. torch.utils.data.DataLoader(dataset, batch_size=128)")
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(isinstance(t, np.ndarray) for t in data):
        raise ValueError(f"{name} must be tensors (x, y), not numpy arrays: pass (torch.from_numpy(x), "
                         "torch.from_numpy(y)) (images as floats, labels as integers)")
    if not is_pair(data) and not isinstance(data, Iterable):
        raise ValueError(f"{name} must be tensors (x, y) or a loader of (inputs, targets) batches; got "
                         f"{_describe(data)}")
    if getattr(data, "dataset", None) is not None:
        dataset_size(data, name)


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
    try:
        size = len(dataset)
    except TypeError as error:  # an IterableDataset, say
        raise ValueError(f"cannot tell how many examples the {name} loader holds: its dataset "
                         f"({type(dataset).__name__}) has no len(); pass tensors (x, y) or a loader over a "
                         "map-style dataset (one with __len__)") from error
    if size == 0:
        raise ValueError(f"{name} holds no examples")
    return size


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
    if not parts:
        raise ValueError(f"{name} holds no examples")
    return torch.cat(parts)
