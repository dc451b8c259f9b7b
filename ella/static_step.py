"""Training steps on fixed-shape device buffers, run eagerly or captured once as a CUDA graph and replayed.

On a GPU the relaxed networks at batch 128 are bound by kernel launches, not arithmetic: an eager step launches
hundreds of small kernels from Python. Here every step of an epoch reads its batch from device buffers of a
fixed shape, so the whole step (gather, augmentation, forward, loss, backward, optimiser step, loss
accumulation) can be recorded once as a CUDA graph and replayed (``torch.cuda.CUDAGraph``).

- :func:`plan_epoch` draws what iterating a :class:`~ella.data.TensorLoader` once would draw (the permutation,
  then every batch's augmentation parameters, in the same order from the same generator), as device tensors.
- :class:`StaticStep` is one step for one batch size: ``load`` copies a batch's slice of the plan into its
  buffers (device-to-device copies), calling it runs the step; nothing in it waits for the device. The summed
  cross-entropy and a non-finite flag accumulate on the device and are read once per epoch.
- :class:`StepRunner` runs an epoch of such steps. With ``capture`` (CUDA only) each batch size runs eagerly
  ``warmup`` times on a side stream (lazy state: optimiser moments, library handles), is then recorded once and
  replayed from then on; a last partial batch is its own shape, eager in the first epochs and captured later.
- Capture cannot sink a run: an exception while warming up, recording or replaying gives one warning naming its
  cause (:attr:`StepRunner.failure`), and the runner continues *from the failing step*, on the same planned
  batches, with eager steps exactly as the plain loop takes them (the optimiser's own float learning rate, its
  flags set back to torch's defaults by :func:`set_optimizer_flags`); the caller then trains on with the plain
  loop. The failing step is taken as not applied: recording runs nothing, a replay that raises has launched
  nothing, and an eager step changes the model only in its last call (the optimiser step, which checks its
  inputs before it updates anything) and accumulates its loss after it.

What the graph reads stays valid between replays: the learning rate is a device tensor filled from the
scheduler's value before every step; the prior precisions are the prior's ``log_precision`` tensor, updated in
place by the marginal-likelihood rounds (and by loading a checkpoint), so no re-capture is ever needed. The
optimiser must keep its state on the device: fused SGD or capturable Adam (:func:`graph_safe_optimizer`); a
checkpoint's optimiser state, which carries the flags of the run that wrote it, is given the flags of the run
that continues it (:func:`optimizer_flags`, :func:`set_optimizer_flags`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ella.data import TensorLoader

Penalty = Callable[[], Tensor]
log = logging.getLogger(__name__)
_FLAGS = ("foreach", "fused", "capturable", "differentiable")  # how an optimiser steps, not what it computes


@dataclass
class EpochPlan:
    """One epoch of a loader drawn ahead: ``order (n,)`` sample positions (int64, device); ``params``: the
    augmentation's per-sample parameters in the same order (a tuple of ``(n, ...)`` device tensors) or None;
    ``sizes``: the batch sizes in order."""

    order: Tensor
    params: tuple[Tensor, ...] | None
    sizes: list[int]


def supports_planning(loader: TensorLoader) -> bool:
    """Whether :func:`plan_epoch` can draw the loader's epochs: no augmentation, or one that separates
    ``sample(n, generator)`` from ``apply(x, params)`` (e.g. :class:`ella.data.FlipShift`)."""
    augment = loader.augment
    return augment is None or (hasattr(augment, "sample") and hasattr(augment, "apply"))


def plan_epoch(loader: TensorLoader) -> EpochPlan:
    """Draw one epoch of ``loader`` exactly as iterating it would (so its generator ends in the same state)."""
    if not supports_planning(loader):
        raise ValueError("the loader's augmentation has no separate sample/apply, so its epochs cannot be planned")
    device = loader.x.device
    order = loader.epoch_order()
    n = loader.num_samples()
    if order is None:
        order = torch.arange(n, device=device)
    sizes = [min(loader.batch_size, n - lo) for lo in range(0, n, loader.batch_size)][: len(loader)]
    params = None
    if loader.augment is not None:
        drawn = [loader.augment.sample(size, loader.augment_generator()) for size in sizes]
        params = tuple(torch.cat(part).to(device) for part in zip(*drawn))
    return EpochPlan(order, params, sizes)


class StaticStep:
    """One training step of batch size ``batch_size`` on fixed device buffers.

    ``x (N, ...)``, ``y (N,)``: the whole training set on the device. A call gathers ``x[index]``, applies
    ``augment.apply`` with the loaded parameters, and minimises ``mean CE + penalty()`` with ``optimizer``;
    ``totals`` (``(2,)`` float64: summed cross-entropy, count of non-finite losses) accumulates. ``lr``: the
    device tensor the optimiser reads as its learning rate during the step (None: the optimiser's own value).
    """

    def __init__(self, model: nn.Module, penalty: Penalty, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                 augment, batch_size: int, totals: Tensor, lr: Tensor | None = None) -> None:
        self.model, self.penalty, self.optimizer = model, penalty, optimizer
        self.x, self.y, self.augment = x, y, augment
        self.totals, self.lr = totals, lr
        self.index = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        self.params: tuple[Tensor, ...] = ()
        if augment is not None:
            shapes = augment.sample(batch_size, torch.Generator())
            self.params = tuple(torch.zeros_like(p, device=x.device) for p in shapes)

    def load(self, plan: EpochPlan, start: int) -> None:
        """Copy the batch starting at position ``start`` of ``plan`` into the buffers."""
        stop = start + len(self.index)
        self.index.copy_(plan.order[start:stop])
        for buffer, values in zip(self.params, plan.params or ()):
            buffer.copy_(values[start:stop])

    def __call__(self) -> None:
        xb = self.x.index_select(0, self.index)
        if self.augment is not None:
            xb = self.augment.apply(xb, self.params)
        ce = F.cross_entropy(self.model(xb), self.y.index_select(0, self.index))
        loss = ce + self.penalty()
        loss.backward()
        self._optimizer_step()
        # accumulated last, so that a step that raises has added nothing (see the module docstring)
        self.totals.add_(torch.stack([ce.detach().double() * len(self.index), (~torch.isfinite(loss)).double()]))

    def _optimizer_step(self) -> None:
        if self.lr is None:
            self.optimizer.step()
            return
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self.lr  # the step reads the device tensor; the scheduler keeps its float
        try:
            self.optimizer.step()
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value


def graph_safe_optimizer(params, name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """The optimiser of a captured run: SGD with momentum as one fused kernel, or Adam with its step counts on
    the device (``capturable``); both read a tensor learning rate inside a graph."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, capturable=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=True)


def optimizer_flags(optimizer: torch.optim.Optimizer) -> dict:
    """The flags that choose how ``optimizer`` steps (``foreach``, ``fused``, ``capturable``, ``differentiable``,
    those it has), as it was built."""
    return {key: optimizer.defaults[key] for key in _FLAGS if key in optimizer.defaults}


def plain_flags(optimizer: torch.optim.Optimizer) -> dict:
    """The flags torch gives ``optimizer`` 's class when none is asked for (the plain loop's optimiser)."""
    return {key: None if key in ("foreach", "fused") else False for key in optimizer_flags(optimizer)}


def set_optimizer_flags(optimizer: torch.optim.Optimizer, flags: dict) -> None:
    """Make ``optimizer`` step as ``flags`` say, whatever flags its (loaded) state came with.

    A checkpoint's optimiser state carries the flags of the run that wrote it (fused SGD or capturable Adam on a
    captured GPU run; torch's defaults on the CPU or with ``--no-capture``): loaded into a run on another device
    or capture mode they would pick an implementation that fails there. The moments are kept as they are; Adam's
    ``step`` counts move to the parameter's device where the flags keep them there (``capturable``, ``fused``),
    else to the CPU (where a plain Adam keeps them).
    """
    for group in optimizer.param_groups:
        group.update({key: value for key, value in flags.items() if key in group})
    optimizer.defaults.update({key: value for key, value in flags.items() if key in optimizer.defaults})
    on_device = bool(flags.get("capturable") or flags.get("fused"))
    for param, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, Tensor):
            state["step"] = step.to(param.device if on_device else torch.device("cpu"))


def device_description(device: torch.device) -> dict:
    """What a run's numbers depend on: the device (its GPU model), torch's version, and CUDA's (or the CPU
    threads)."""
    described = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        described.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                         cudnn=torch.backends.cudnn.version())
    else:
        described.update(name="CPU", threads=torch.get_num_threads())
    return described


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphRecorder(Protocol):
    """How a :class:`StepRunner` warms up and records steps (:class:`CudaGraphs`; tests pass a stand-in)."""

    def warm_up(self, work: Callable[[], object]) -> None: ...

    def record(self, work: Callable[[], object]) -> Graph: ...


class CudaGraphs:
    """Warm-up on a side stream and recording into one shared memory pool of CUDA graphs on ``device``."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, work: Callable[[], object]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # eager warm-up of a capturable Adam
            work()
        torch.cuda.current_stream().wait_stream(self.stream)

    def record(self, work: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """Record ``work`` (nothing runs while recording)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            work()
        return graph


@dataclass
class CaptureFailure:
    """Where capture failed: ``stage`` (warming up, recording, replaying), the step's position in its epoch
    (1-based), its batch size, and the exception as ``cause``."""

    stage: str
    step: int
    batch_size: int
    cause: str


class StepRunner:
    """Runs epochs of :class:`StaticStep` s (one per batch size), eagerly or captured as CUDA graphs.

    ``make_step(batch_size, totals, lr) -> StaticStep``; ``scheduler`` (optional) is stepped after every step,
    as the plain loop does. On CUDA the scheduler's learning rate is copied into the device tensor ``lr`` before
    every step (captured or not, so that eager and captured steps run the same kernels); on the CPU ``lr`` is
    None and the optimiser's own float is used, so the steps are those of the plain loop. ``graphs``: how steps
    are warmed up and recorded (default with ``capture``: :class:`CudaGraphs` on ``device``). After a failure of
    capture (:attr:`failure`, see the module docstring) the runner takes eager plain-loop steps.
    """

    def __init__(self, make_step: Callable[[int, Tensor, Tensor | None], StaticStep], optimizer: torch.optim.Optimizer,
                 device: torch.device, capture: bool, warmup: int = 3, graphs: GraphRecorder | None = None) -> None:
        if capture and graphs is None:
            graphs = CudaGraphs(device)
        self.make_step, self.optimizer, self.warmup = make_step, optimizer, warmup
        self.recorder = graphs if capture else None
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)
        on_cuda = device.type == "cuda"  # eager or captured, the same kernels read the same device learning rate
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device) if on_cuda else None
        self.steps: dict[int, StaticStep] = {}
        self.graphs: dict[int, Graph] = {}
        self.eager_calls: dict[int, int] = {}
        self.failure: CaptureFailure | None = None

    @property
    def capture(self) -> bool:
        """Whether steps are (still) captured."""
        return self.recorder is not None

    def run_epoch(self, plan: EpochPlan, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[float, float]:
        """Train on every batch of ``plan``; returns ``(summed cross-entropy, number of non-finite losses)``
        (the one read-back from the device per epoch)."""
        self.totals.zero_()
        start = 0
        for position, size in enumerate(plan.sizes, 1):
            step = self._step(size)
            step.load(plan, start)
            if self.lr is not None:
                self.lr.fill_(float(self.optimizer.param_groups[0]["lr"]))
            if self.capture:
                stage = "replaying" if size in self.graphs else (
                    "warming up" if self.eager_calls.get(size, 0) < self.warmup else "recording")
                try:
                    self._run_captured(size, step)
                except Exception as error:  # any failure of capture: warn once, take this step eagerly
                    self._fall_back(CaptureFailure(stage, position, size, f"{type(error).__name__}: {error}"))
            if not self.capture:
                self.optimizer.zero_grad(set_to_none=True)
                step()
            if scheduler is not None:
                scheduler.step()
            start += size
        ce_sum, non_finite = self.totals.tolist()
        return ce_sum, non_finite

    def _step(self, size: int) -> StaticStep:
        if size not in self.steps:
            self.steps[size] = self.make_step(size, self.totals, self.lr)
        return self.steps[size]

    def _run_captured(self, size: int, step: StaticStep) -> None:
        if size in self.graphs:
            self.graphs[size].replay()
            return
        calls = self.eager_calls.get(size, 0)
        if calls < self.warmup:
            self.eager_calls[size] = calls + 1
            self.recorder.warm_up(lambda: (self.optimizer.zero_grad(set_to_none=True), step()))
            return
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
        self.graphs[size] = self.recorder.record(step)
        self.graphs[size].replay()

    def _fall_back(self, failure: CaptureFailure) -> None:
        """Stop capturing: drop the graphs, and step as the plain loop does from this step on."""
        log.warning("capturing the training steps failed while %s step %d of the epoch (batch %d): %s; "
                    "training goes on with the plain loop, as with --no-capture",
                    failure.stage, failure.step, failure.batch_size, failure.cause)
        self.failure, self.recorder, self.lr = failure, None, None
        self.graphs.clear()
        for step in self.steps.values():
            step.lr = None
        self.optimizer.zero_grad(set_to_none=True)
        set_optimizer_flags(self.optimizer, plain_flags(self.optimizer))
