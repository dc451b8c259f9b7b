"""Progress bars of a training run (tqdm): the epochs, with an ETA from the start after a resume, and each
KFAC-Laplace fit: its KFAC batches, then its eigendecomposition, then its hyper-steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


class BarLoader:
    """A loader of ``(x, y)`` batches that advances ``bar`` (when one is set) by a step per batch and, once
    exhausted, says that the eigendecomposition follows: handed to a KFAC fit, it shows the fit's progress."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.bar: tqdm | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield batch
            if self.bar is not None:
                self.bar.update()
        if self.bar is not None:
            self.bar.set_postfix_str("eigendecomposition")


@contextmanager
def fit_progress(loader: BarLoader, hyper_optimizer: torch.optim.Optimizer, desc: str, hyper_steps: int = 0,
                 disable: bool | None = None) -> Iterator[None]:
    """Inside the block, one bar counts the batches of ``loader`` and then the steps of ``hyper_optimizer``
    (``hyper_steps`` of them expected); ``disable`` as tqdm's."""
    bar = tqdm(total=len(loader) + hyper_steps, desc=desc, unit="step", leave=False, disable=disable)

    def hyper_step(*_) -> None:
        bar.set_postfix_str("hyper-steps", refresh=False)
        bar.update()

    loader.bar = bar
    hook = hyper_optimizer.register_step_post_hook(hyper_step)
    try:
        yield
    finally:
        hook.remove()
        loader.bar = None
        bar.close()


class RunBar(tqdm):
    """The bar over a run's epochs. Given the mean ``seconds_per_epoch`` of the epochs done before a resume, it
    shows an ETA from the start, where tqdm alone shows "?" until the first new epoch ends."""

    def __init__(self, *args, seconds_per_epoch: float | None = None, **kwargs) -> None:
        self.seconds_per_epoch = seconds_per_epoch  # set first: tqdm's __init__ may draw the bar
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict:
        values = super().format_dict
        if values["rate"] is None and self.seconds_per_epoch:
            values["rate"] = 1 / self.seconds_per_epoch
        return values
