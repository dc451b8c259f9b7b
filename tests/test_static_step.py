"""The static-shape training step (the code a CUDA graph records) against the plain loader and training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ella.data import TensorLoader, cifar_augment
from ella.static_step import StepRunner, plan_epoch, supports_planning
from ella.train import Trainer
from test_train import _tiny_config, _write_tiny_cifar


def _loader(seed: int, augment=cifar_augment) -> TensorLoader:
    x = torch.rand(30, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return TensorLoader(x, torch.arange(30) % 10, 7, shuffle=True, augment=augment,
                        generator=torch.Generator().manual_seed(seed))


def test_a_planned_epoch_draws_exactly_what_iterating_the_loader_draws() -> None:
    iterated, planned = _loader(5), _loader(5)
    for _ in range(2):  # two epochs: the generators must stay in step
        plan = plan_epoch(planned)
        assert plan.sizes == [7, 7, 7, 7, 2]
        start = 0
        for (xb, yb), size in zip(iterated, plan.sizes, strict=True):
            index = plan.order[start:start + size]
            params = tuple(p[start:start + size] for p in plan.params)
            assert torch.equal(yb, planned.y[index])
            assert torch.equal(xb, cifar_augment.apply(planned.x[index], params))
            start += size
        assert torch.equal(iterated.generator.get_state(), planned.generator.get_state())


def test_only_augmentations_with_separate_sampling_can_be_planned() -> None:
    assert supports_planning(_loader(0)) and supports_planning(_loader(0, augment=None))
    opaque = _loader(0, augment=lambda x, generator: x)
    assert not supports_planning(opaque)
    with pytest.raises(ValueError, match="sample/apply"):
        plan_epoch(opaque)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_static_steps_train_exactly_as_the_plain_loop(tmp_path: Path, optimizer: str) -> None:
    """Three epochs of F-FC+CONV with augmentation and a partial last batch, the prior precisions changed in
    place after the first (as a marginal-likelihood round does; the steps must read the new values): the same
    losses, learning rates and parameters, bit for bit."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, layer="ffc_conv", laplace=False, batch_size=16, optimizer=optimizer)
    plain = Trainer(config, tmp_path / "plain")
    static = Trainer(config, tmp_path / "static")
    static.runner = static._make_runner(capture=False)
    assert plain.runner is None  # no CUDA here: the plain loop is the default
    losses = {"plain": [], "static": []}
    for epoch in range(3):
        for name, trainer in (("plain", plain), ("static", static)):
            if epoch == 1:
                with torch.no_grad():
                    trainer.prior.log_precision.copy_(torch.linspace(-2, 3, len(trainer.prior.groups)))
            losses[name].append(trainer.train_epoch())
    assert losses["static"] == losses["plain"]
    assert static.scheduler.get_last_lr() == plain.scheduler.get_last_lr()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), static.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_non_finite_loss_in_static_steps_is_reported_at_the_end_of_the_epoch(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    trainer = Trainer(_tiny_config(data, laplace=False, epochs=1), tmp_path / "run")
    trainer.runner = trainer._make_runner(capture=False)
    with torch.no_grad():
        trainer.prior.log_precision.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite in epoch 1"):
        trainer.train_epoch()


def test_capture_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        StepRunner(lambda *a: None, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                   torch.device("cpu"), capture=True)
