"""On a CUDA device: KFAC equals KFAC on the CPU for every layer family, captured steps equal eager ones (and
read precisions changed in place), and checkpoints resume across capture modes and onto the CPU.

Skipped where there is no GPU (as in CI); ``benchmarks/gpu_check.py run`` runs this file on a GPU machine.

Captured and eager steps run the same kernels, but some of them reduce in an order that differs from run to run
(the scatter-add of the polyphase gather's backward, cuDNN's weight gradients), and over hundreds of steps such
differences grow. The comparisons therefore ask torch for deterministic algorithms (cuBLAS needs
``CUBLAS_WORKSPACE_CONFIG``, set here before torch starts CUDA) and, as a second guard, measure the spread of
two eager runs and allow the captured run ten times that spread plus float32 rounding.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts; deterministic GEMMs

import pytest
import torch

from ella.data import TensorLoader, cifar_augment
from ella.marglik import fit_laplace, neg_log_marglik
from ella.models import LAYER_NAMES, build_model
from ella.priors import Prior
from ella.static_step import StaticStep, StepRunner, graph_safe_optimizer, plan_epoch
from ella.train import Trainer
from kfac import EigenvalueMemo, fit_kfac
from test_train import _Interrupt, _raise_in_epoch, _tiny_config, _write_tiny_cifar

ROUNDING = 1e-6  # float32 rounding relative to a value, allowed on top of the measured eager spread

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


def test_the_eigenvalue_memo_reuses_unchanged_cuda_factors() -> None:
    """CUDA factors are fingerprinted on the host; a later fit takes the unchanged ones from the memo (the
    eigenvalues stay on the GPU) and equals a fit without the memo bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(130, 130), torch.nn.Tanh(), torch.nn.Linear(130, 3)).double().to(CUDA)
    x, y = torch.randn(40, 130, dtype=torch.float64), torch.randint(0, 3, (40,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    prior, memo = Prior(model).double(), EigenvalueMemo()
    fit_laplace(model, batches, prior, memo=memo)
    with torch.no_grad():
        model[2].weight.mul_(1.7)
    later = fit_laplace(model, batches, prior, memo=memo)
    plain = fit_laplace(model, batches, prior)
    assert memo.hits == 2 and later.decomposition.eigenvalues().is_cuda
    torch.testing.assert_close(later.decomposition.eigenvalues(), plain.decomposition.eigenvalues(), rtol=0, atol=0)


def _runner(model: torch.nn.Module, optimizer_name: str, x, y, capture: bool,
            prior: Prior | None = None) -> tuple[StepRunner, TensorLoader, object]:
    optimizer = graph_safe_optimizer(model.parameters(), optimizer_name, lr=0.01 if optimizer_name == "sgd" else 1e-3,
                                     momentum=0.9)
    prior = Prior(model) if prior is None else prior
    loader = TensorLoader(x, y, 128, shuffle=True, augment=cifar_augment, generator=torch.Generator().manual_seed(0))

    def make_step(size, totals, lr):
        return StaticStep(model, lambda: prior.penalty(model) / len(y), optimizer, x, y, cifar_augment, size, totals, lr)

    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=400)
    return StepRunner(make_step, optimizer, CUDA, capture=capture), loader, scheduler


@pytest.fixture
def deterministic():
    """Deterministic algorithms where torch has them (a warning, not an error, where it has none)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _assert_within_spread(captured: torch.Tensor, eager: torch.Tensor, eager_again: torch.Tensor, msg: str) -> None:
    """``|captured - eager| <= 10 |eager_again - eager| + ROUNDING |eager|`` elementwise, at the worst element."""
    captured, eager, eager_again = (torch.as_tensor(t, dtype=torch.float64) for t in (captured, eager, eager_again))
    allowed = 10 * (eager_again - eager).abs() + ROUNDING * eager.abs().max()
    excess = ((captured - eager).abs() - allowed).max()
    assert excess <= 0, f"{msg}: captured differs from eager by {float((captured - eager).abs().max()):.3g}, " \
                        f"two eager runs by {float((eager_again - eager).abs().max()):.3g}"


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_captured_steps_equal_eager_steps_over_hundreds_of_steps(optimizer_name: str, deterministic) -> None:
    """F-FC+CONV at width 2 on 1,000 images (7 full batches and one of 104): 40 epochs, 320 steps, the last
    partial batch captured from epoch 4 on. The same kernels run in both, so only non-deterministic
    reductions of the GPU can tell them apart: the captured run must stay within the spread of two eager runs
    (see the module docstring)."""
    x, y = _images(1000, 2, dtype=torch.float32)
    x, y = x.to(CUDA), y.to(CUDA)
    torch.manual_seed(0)
    models = {"eager": build_model("ffc_conv", 3, 10, alpha=2).to(CUDA)}
    models["eager again"], models["captured"] = copy.deepcopy(models["eager"]), copy.deepcopy(models["eager"])
    runs = {name: _runner(model, optimizer_name, x, y, capture=name == "captured") for name, model in models.items()}
    for epoch in range(40):
        losses = {}
        for name, (runner, loader, scheduler) in runs.items():
            losses[name], non_finite = runner.run_epoch(plan_epoch(loader), scheduler)
            assert non_finite == 0
        _assert_within_spread(losses["captured"], losses["eager"], losses["eager again"], f"loss of epoch {epoch + 1}")
    assert set(runs["captured"][0].graphs) == {128, 104}  # both shapes were recorded
    named = {name: dict(model.named_parameters()) for name, model in models.items()}
    for name, eager in named["eager"].items():
        _assert_within_spread(named["captured"][name].detach(), eager.detach(), named["eager again"][name].detach(), name)


def test_a_graph_reads_precisions_changed_in_place_between_replays(deterministic) -> None:
    """After both shapes are recorded the prior precisions are changed in place (as a marginal-likelihood round
    does): the next captured epoch equals an eager one with the new precisions, and differs from one that kept
    the old precisions by far more than the eager spread."""
    x, y = _images(256, 3, dtype=torch.float32)
    x, y = x.to(CUDA), y.to(CUDA)
    torch.manual_seed(0)
    base = build_model("ffc_conv", 3, 10, alpha=1).to(CUDA)
    names = ("captured", "eager", "eager again", "eager, old precisions")
    models = {name: copy.deepcopy(base) for name in names}
    priors = {name: Prior(model) for name, model in models.items()}
    runs = {name: _runner(model, "sgd", x, y, capture=name == "captured", prior=priors[name])
            for name, model in models.items()}
    for _ in range(3):  # 2 steps of 128 per epoch: warmed up 3 times, recorded in epoch 2
        for runner, loader, scheduler in runs.values():
            runner.run_epoch(plan_epoch(loader), scheduler)
    assert set(runs["captured"][0].graphs) == {128}
    for name in names[:3]:
        prior = priors[name]
        with torch.no_grad():
            prior.log_precision.copy_(torch.linspace(2, 6, len(prior.groups), device=CUDA))
    losses = {name: runner.run_epoch(plan_epoch(loader), scheduler)[0] for name, (runner, loader, scheduler) in runs.items()}
    _assert_within_spread(losses["captured"], losses["eager"], losses["eager again"], "loss after the change")
    params = {name: torch.cat([p.detach().flatten() for p in model.parameters()]) for name, model in models.items()}
    _assert_within_spread(params["captured"], params["eager"], params["eager again"], "parameters after the change")
    effect = (params["eager, old precisions"] - params["eager"]).abs().max()
    assert effect > 100 * (params["captured"] - params["eager"]).abs().max()
    assert effect > 1e-3 * params["eager"].abs().max()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(("first", "then"), [("captured", "no-capture"), ("no-capture", "captured"), ("captured", "cpu")])
def test_a_checkpoint_resumes_across_capture_modes_and_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               optimizer: str, first: str, then: str) -> None:
    """A run interrupted in epoch 3 and resumed in another mode (captured, ``--no-capture``, the CPU) keeps its
    optimiser moments and ends where the uninterrupted run of the first mode ends, up to the rounding of the
    other mode's kernels; the optimiser's flags and Adam's step counts are those the new mode needs."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, layer="ffc_conv", device="cuda", optimizer=optimizer, laplace=False)
    modes = {"captured": config, "no-capture": replace(config, capture=False), "cpu": replace(config, device="cpu")}
    reference = Trainer(modes[first], tmp_path / "reference")
    reference.run()
    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        Trainer(modes[first], tmp_path / "run").run()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = Trainer(modes[then], tmp_path / "run", resume=True)
    captured = then == "captured"
    assert (resumed.runner is not None) is captured
    group = resumed.optimizer.param_groups[0]
    if optimizer == "adam":
        assert group["capturable"] is captured
        step = next(iter(resumed.optimizer.state.values()))["step"]
        assert step.device.type == ("cuda" if captured else "cpu") and float(step) == 2 * 3  # 2 epochs of 3 steps
    else:
        assert group["fused"] is (True if captured else None)
    resumed.run()
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()), msg=name)


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
