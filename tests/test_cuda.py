"""On a CUDA device: KFAC equals KFAC on the CPU for every layer family, and captured steps equal eager ones.

Skipped where there is no GPU (as in CI); ``benchmarks/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ella.data import TensorLoader, cifar_augment
from ella.marglik import fit_laplace, neg_log_marglik
from ella.models import LAYER_NAMES, build_model
from ella.priors import Prior
from ella.static_step import StaticStep, StepRunner, graph_safe_optimizer, plan_epoch
from ella.train import Trainer
from kfac import fit_kfac
from test_train import _Interrupt, _raise_in_epoch, _tiny_config, _write_tiny_cifar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _images(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator, dtype=dtype), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_kfac_and_marglik_on_cuda_equal_the_cpu(layer: str, kfac_approx: str) -> None:
    """float64; the CPU runs one backward per direction, CUDA one vmapped backward (each device's default)."""
    torch.manual_seed(0)
    model = build_model(layer, 3, 10, alpha=1).double()
    x, y = _images(6, 1)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    cpu = fit_kfac(model, batches, kfac_approx=kfac_approx)
    gpu = fit_kfac(copy.deepcopy(model).to(CUDA), batches, kfac_approx=kfac_approx)
    for name in cpu.block_names:
        a, b = cpu.blocks[name], gpu.blocks[name]
        torch.testing.assert_close(b.out_factors.cpu(), a.out_factors, rtol=1e-10, atol=1e-12, msg=name)
        if a.in_factors is not None:
            torch.testing.assert_close(b.in_factors.cpu(), a.in_factors, rtol=1e-10, atol=1e-12, msg=name)
    if layer in ("ffc_conv", "sfc_sconv", "gconv"):  # the whole marginal likelihood, for a few families
        prior = Prior(model).double()
        on_gpu = copy.deepcopy(model).to(CUDA)
        value = neg_log_marglik(fit_laplace(model, batches, prior, kfac_approx=kfac_approx), prior)
        gpu_prior = Prior(on_gpu).double()
        gpu_value = neg_log_marglik(fit_laplace(on_gpu, batches, gpu_prior, kfac_approx=kfac_approx), gpu_prior)
        torch.testing.assert_close(gpu_value.cpu(), value, rtol=1e-10, atol=0)


def _runner(model: torch.nn.Module, optimizer_name: str, x, y, capture: bool) -> tuple[StepRunner, TensorLoader, object]:
    optimizer = graph_safe_optimizer(model.parameters(), optimizer_name, lr=0.01 if optimizer_name == "sgd" else 1e-3,
                                     momentum=0.9)
    prior = Prior(model)
    loader = TensorLoader(x, y, 128, shuffle=True, augment=cifar_augment, generator=torch.Generator().manual_seed(0))

    def make_step(size, totals, lr):
        return StaticStep(model, lambda: prior.penalty(model) / len(y), optimizer, x, y, cifar_augment, size, totals, lr)

    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=400)
    return StepRunner(make_step, optimizer, CUDA, capture=capture), loader, scheduler


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_captured_steps_equal_eager_steps_over_hundreds_of_steps(optimizer_name: str) -> None:
    """F-FC+CONV at width 2 on 1,000 images (7 full batches and one of 104): 40 epochs, 320 steps, the last
    partial batch captured from epoch 4 on. The same kernels run in both, so only non-deterministic
    reductions of the GPU can tell them apart."""
    x, y = _images(1000, 2, dtype=torch.float32)
    x, y = x.to(CUDA), y.to(CUDA)
    torch.manual_seed(0)
    eager_model = build_model("ffc_conv", 3, 10, alpha=2).to(CUDA)
    captured_model = copy.deepcopy(eager_model)
    eager, eager_loader, eager_scheduler = _runner(eager_model, optimizer_name, x, y, capture=False)
    captured, captured_loader, captured_scheduler = _runner(captured_model, optimizer_name, x, y, capture=True)
    for epoch in range(40):
        loss_eager, bad_eager = eager.run_epoch(plan_epoch(eager_loader), eager_scheduler)
        loss_captured, bad_captured = captured.run_epoch(plan_epoch(captured_loader), captured_scheduler)
        assert bad_eager == bad_captured == 0
        assert loss_captured == pytest.approx(loss_eager, rel=1e-4), epoch
    assert set(captured.graphs) == {128, 104}  # both shapes were recorded
    for (name, a), (_, b) in zip(eager_model.named_parameters(), captured_model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()), msg=name)


def test_a_captured_laplace_run_trains_resumes_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer on CUDA: captured steps, marginal-likelihood rounds (the graphs read the updated
    precisions), an interruption in epoch 3 and ``resume`` give the uninterrupted run's result."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, layer="ffc_conv", device="cuda", epochs=4)
    reference = Trainer(config, tmp_path / "reference")
    assert reference.runner is not None
    final = reference.run()
    assert set(reference.runner.graphs) == {16, 8}  # 40 images: batches of 16, 16, 8; the 8 recorded in epoch 4
    assert final["effective_layer_types"] and all(row["train_loss"] > 0 for row in reference.history)

    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        Trainer(config, tmp_path / "run").run()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = Trainer(config, tmp_path / "run", resume=True).run()
    assert resumed["test"] == pytest.approx(final["test"], rel=1e-5)
    assert resumed["precisions"] == pytest.approx(final["precisions"], rel=1e-5)
