"""The static-shape training step (the code a CUDA graph records) against the plain loader and training loop;
capture that fails falls back to the plain loop; checkpoints resume across capture modes.

On the CPU a captured run is emulated by :class:`_EagerGraphs`: warm-up runs the step, recording keeps it without
running it, and a replay runs it again on the same buffers (what a CUDA graph does). Its optimiser is the plain
one where numbers are compared bit for bit (torch's fused SGD on the CPU rounds differently from the plain
loop's), the graph-safe one (fused SGD) where the flags are the point.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ella.data import TensorLoader, cifar_augment
from ella.static_step import StepRunner, plain_flags, plan_epoch, set_optimizer_flags, supports_planning
from ella import train as train_module
from ella.train import Learner, Trainer
from test_train import _Interrupt, _raise_in_epoch, _tiny_config, _without_timing, _write_tiny_cifar


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


def _plain_optimizer(params, name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


class _Replay:
    def __init__(self, graphs: _EagerGraphs, work: Callable[[], object]) -> None:
        self.graphs, self.work = graphs, work

    def replay(self) -> None:
        self.graphs.count("replaying")
        self.graphs.optimizer.zero_grad(set_to_none=True)  # a graph's backward writes its gradients afresh
        self.work()


class _EagerGraphs:
    """A stand-in for :class:`ella.static_step.CudaGraphs` on the CPU; ``fail`` = (stage, n) raises at the
    n-th call of that stage."""

    def __init__(self, optimizer: torch.optim.Optimizer, fail: tuple[str, int] | None = None) -> None:
        self.optimizer, self.fail = optimizer, fail
        self.calls = {"warming up": 0, "recording": 0, "replaying": 0}

    def count(self, stage: str) -> None:
        self.calls[stage] += 1
        if self.fail == (stage, self.calls[stage]):
            raise RuntimeError(f"injected failure while {stage}")

    def warm_up(self, work: Callable[[], object]) -> None:
        self.count("warming up")
        work()

    def record(self, work: Callable[[], object]) -> _Replay:
        self.count("recording")
        return _Replay(self, work)


def _emulate_capture(monkeypatch: pytest.MonkeyPatch, fail: tuple[str, int] | None = None,
                     fused: bool = False) -> list[_EagerGraphs]:
    """Make Trainers on the CPU train as captured ones (:class:`_EagerGraphs`; with ``fused`` the graph-safe
    optimiser, else the plain one)."""
    made: list[_EagerGraphs] = []
    if not fused:
        monkeypatch.setattr(train_module, "graph_safe_optimizer", _plain_optimizer)

    def graphs(self: Learner) -> _EagerGraphs:
        made.append(_EagerGraphs(self.optimizer, fail))
        return made[-1]

    monkeypatch.setattr(Learner, "_can_capture", lambda self: True)
    monkeypatch.setattr(Learner, "_graphs", graphs)
    return made


def _assert_same_run(a: Trainer, b: Trainer, final_a: dict, final_b: dict) -> None:
    assert _without_timing(a.history) == _without_timing(b.history)
    assert final_a["test"] == final_b["test"] and final_a["precisions"] == final_b["precisions"]
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_emulated_capture_trains_exactly_as_the_plain_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in is faithful: warm-up, recording and replays of both batch sizes give the plain run."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data)
    plain = Trainer(replace(config, capture=False), tmp_path / "plain")
    final_plain = plain.run()
    made = _emulate_capture(monkeypatch)
    captured = Trainer(config, tmp_path / "captured")
    final = captured.run()
    assert set(captured.runner.graphs) == {16, 8} and made[0].calls["replaying"] == 6
    _assert_same_run(plain, captured, final_plain, final)
    assert final["training"]["steps"] == "captured CUDA graphs" and final["training"]["capture_fallback"] is None
    assert final_plain["training"]["steps"] == "plain loop"
    assert final_plain["training"]["device"]["type"] == "cpu" and final_plain["training"]["device"]["torch"]


@pytest.mark.parametrize(("stage", "nth", "epoch", "step", "fused"), [
    ("warming up", 1, 1, 1, True), ("warming up", 2, 1, 2, False), ("recording", 1, 2, 2, False),
    ("replaying", 3, 3, 2, False)])
def test_a_failure_of_capture_falls_back_to_the_plain_loop_with_its_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        stage: str, nth: int, epoch: int, step: int, fused: bool) -> None:
    """A failure (injected) while warming up, recording or replaying: one warning naming the cause, and the
    run's numbers are exactly those of the run with --no-capture; final.json says what happened. Failing at
    the first step, the run is the plain one from its start, so there the captured run's fused SGD is kept and
    must have been given the plain loop's flags."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, laplace=False)
    plain = Trainer(replace(config, capture=False), tmp_path / "plain")
    final_plain = plain.run()
    _emulate_capture(monkeypatch, fail=(stage, nth), fused=fused)
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.optimizer.defaults["fused"] is (True if fused else None)
    with caplog.at_level("WARNING"):
        final = trainer.run()
    warnings = [r.getMessage() for r in caplog.records if "capturing the training steps failed" in r.getMessage()]
    assert len(warnings) == 1 and f"injected failure while {stage}" in warnings[0], warnings
    assert f"while {stage} step {step} of the epoch" in warnings[0]
    _assert_same_run(plain, trainer, final_plain, final)
    assert trainer.runner is None and trainer.optimizer.defaults["fused"] is None
    written = json.loads((tmp_path / "run" / "final.json").read_text())["training"]
    assert written["steps"] == f"captured CUDA graphs, then the plain loop from epoch {epoch}"
    assert written["capture_fallback"] == {"epoch": epoch, "stage": stage, "step": step, "batch_size": 16,
                                           "cause": f"RuntimeError: injected failure while {stage}"}


def test_a_failure_to_prepare_capture_trains_with_the_plain_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    monkeypatch.setattr(Learner, "_can_capture", lambda self: True)
    monkeypatch.setattr(Learner, "_graphs", lambda self: (_ for _ in ()).throw(RuntimeError("no graph pool")))
    with caplog.at_level("WARNING"):
        trainer = Trainer(_tiny_config(data, epochs=1, laplace=False), tmp_path / "run")
    assert trainer.runner is None and trainer.optimizer.defaults["fused"] is None
    assert "preparing CUDA graphs failed: RuntimeError: no graph pool" in caplog.text
    assert trainer.run()["training"]["steps"] == "plain loop"


def _interrupted_then_resumed(config, out: Path, monkeypatch: pytest.MonkeyPatch, first: Callable[[], object],
                              then: Callable[[], object]) -> Trainer:
    """Train ``config`` into ``out`` under ``first()`` until interrupted in epoch 3, then resume under ``then()``."""
    first()
    original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        Trainer(config, out).run()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    then()
    return Trainer(config, out, resume=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_captured_runs_checkpoint_resumes_on_the_plain_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               optimizer: str) -> None:
    """A captured run's checkpoint (its optimiser state flagged fused SGD or capturable Adam, as a GPU run
    writes it; read on the CPU its step counts are CPU tensors) continues on the plain loop exactly as a run
    that never captured: without its flags reset, Adam raises an AssertionError on the CPU and SGD takes
    torch's fused CPU kernel."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, optimizer=optimizer)
    reference = Trainer(replace(config, capture=False), tmp_path / "reference")
    final_reference = reference.run()
    plain_state = Learner._state

    def as_captured(self: Learner) -> dict:
        state = plain_state(self)
        for group in state["optimizer"]["param_groups"]:
            group.update(capturable=True) if optimizer == "adam" else group.update(fused=True)
        return state

    def captured_mode() -> None:
        _emulate_capture(monkeypatch)
        monkeypatch.setattr(Learner, "_state", as_captured)

    resumed = _interrupted_then_resumed(config, tmp_path / "run", monkeypatch, captured_mode, monkeypatch.undo)
    assert resumed.runner is None
    assert [(g.get("capturable", False), g["fused"]) for g in resumed.optimizer.param_groups] == [(False, None)]
    final = resumed.run()
    _assert_same_run(reference, resumed, final_reference, final)


def test_a_plain_checkpoint_resumes_captured_with_fused_sgd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reverse, as far as the CPU allows (capturable Adam needs CUDA: tests/test_cuda.py): a plain run's
    checkpoint continues captured with fused SGD and the saved momenta. Fused SGD on the CPU rounds differently
    from the plain loop's: the parameters differ by at most 1e-10 here, while resuming without the momenta
    changes them by up to 2e-3 (F-FC+CONV at width 1)."""
    data = _write_tiny_cifar(tmp_path / "data")
    config = _tiny_config(data, layer="ffc_conv", laplace=False)
    reference = Trainer(config, tmp_path / "reference")
    reference.run()
    resumed = _interrupted_then_resumed(config, tmp_path / "run", monkeypatch, lambda: None,
                                        lambda: _emulate_capture(monkeypatch, fused=True))
    assert resumed.runner is not None and [g["fused"] for g in resumed.optimizer.param_groups] == [True]
    resumed.run()
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_optimizer_flags_change_how_it_steps_not_its_state() -> None:
    """Flags set in every group and the defaults; moments and step counts kept (on CUDA the step counts also
    move between the CPU and the device: tests/test_cuda.py)."""
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()
    moments = optimizer.state[param]["exp_avg"].clone()
    set_optimizer_flags(optimizer, {"fused": True, "foreach": None})
    assert optimizer.param_groups[0]["fused"] is True and optimizer.defaults["fused"] is True
    assert torch.equal(optimizer.state[param]["exp_avg"], moments) and float(optimizer.state[param]["step"]) == 1
    set_optimizer_flags(optimizer, plain_flags(optimizer))
    assert optimizer.param_groups[0]["fused"] is None and optimizer.param_groups[0]["capturable"] is False
    assert optimizer.state[param]["step"].device.type == "cpu"
