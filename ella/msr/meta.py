"""Second-order meta-learning (MSR / MAML / MSR-Joint) and multi-task training (MTSR) with ``torch.func``.

``MetaLearner`` adapts only the parameters named in ``inner_names`` on each task's support set
(per-tensor learned inner learning rates, plain SGD steps), vmapped over the tasks of a meta-batch; the
outer loop (Adam) updates *all* module parameters (symmetry matrices, the initial filter) and the inner
learning rates with the second-order gradient of the mean query MSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ella.msr.tasks import Batch, SyntheticProblem

Params = dict[str, torch.Tensor]


@dataclass
class MetaConfig:
    """Meta-learning settings; defaults are the paper's translation settings (App. D.1)."""

    inner_steps_train: int = 3
    inner_steps_test: int = 9
    inner_lr_init: float = 0.02
    learn_inner_lr: bool = True
    outer_lr: float = 5e-4
    outer_steps: int = 1000
    meta_batch: int = 32
    first_order: bool = False


class MetaLearner:
    """Gradient-based meta-learner around a single module.

    ``inner_names`` defaults to ``model.inner_names`` (MSR: only v; MAML: all weights); pass e.g.
    ``("U", "v")`` for MSR-Joint. Every inner tensor gets one learned learning rate ("per layer").
    """

    def __init__(self, model: nn.Module, config: MetaConfig, inner_names: tuple[str, ...] | None = None) -> None:
        self.model, self.config = model, config
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.inner_names = tuple(model.inner_names if inner_names is None else inner_names)
        unknown = [n for n in self.inner_names if n not in self.params]
        if unknown:
            raise ValueError(f"inner_names {unknown} are not parameters of {type(model).__name__}")
        self.inner_lrs = {
            n: nn.Parameter(torch.tensor(config.inner_lr_init).to(self.params[n])) for n in self.inner_names
        }
        trainable = list(self.params.values()) + (list(self.inner_lrs.values()) if config.learn_inner_lr else [])
        self.optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)

    # ----- functional pieces (all shapes are per task: x (N, *in), y (N, *out)) -----
    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the module evaluated with ``params``."""
        return F.mse_loss(functional_call(self.model, params, (x,)), y)

    def adapt(self, params: Params, lrs: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        """``steps`` SGD steps on the inner parameters only; all other entries of ``params`` are returned as given."""
        fixed = {n: p for n, p in params.items() if n not in self.inner_names}
        inner = {n: params[n] for n in self.inner_names}

        def support_loss(inner_params: Params) -> torch.Tensor:
            return self.loss({**fixed, **inner_params}, x, y)

        for _ in range(steps):
            g = grad(support_loss)(inner)
            if self.config.first_order:
                g = {n: gi.detach() for n, gi in g.items()}
            inner = {n: inner[n] - lrs[n] * g[n] for n in self.inner_names}
        return {**fixed, **inner}

    def task_losses(self, params: Params, lrs: Params, batch: Batch, steps: int) -> torch.Tensor:
        """Query MSE after adaptation, one value per task: ``(T,)``."""

        def one_task(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
            return self.loss(self.adapt(params, lrs, xs, ys, steps), xq, yq)

        return vmap(one_task)(batch.x_support, batch.y_support, batch.x_query, batch.y_query)

    # ----- stateful API -----
    def _detached(self) -> tuple[Params, Params]:
        return {n: p.detach() for n, p in self.params.items()}, {n: p.detach() for n, p in self.inner_lrs.items()}

    def outer_step(self, batch: Batch) -> float:
        """One Adam step on the mean query loss of ``batch`` (second-order unless ``first_order``). Returns the loss."""

        def meta_loss(params: Params, lrs: Params) -> tuple[torch.Tensor, torch.Tensor]:
            loss = self.task_losses(params, lrs, batch, self.config.inner_steps_train).mean()
            return loss, loss

        params, lrs = self._detached()
        (g_params, g_lrs), loss = grad(meta_loss, argnums=(0, 1), has_aux=True)(params, lrs)
        for n, p in self.params.items():
            p.grad = g_params[n]
        for n, p in self.inner_lrs.items():
            p.grad = g_lrs[n]
        self.optimizer.step()
        return float(loss)

    def evaluate(self, batches: list[Batch]) -> np.ndarray:
        """Meta-test: adapt the inner parameters (symmetry frozen) with ``inner_steps_test`` steps; per-task query MSE."""
        params, lrs = self._detached()
        out = [self.task_losses(params, lrs, b, self.config.inner_steps_test).detach() for b in batches]
        return torch.cat(out).cpu().numpy()

    def fit(
        self,
        problem: SyntheticProblem,
        rng: np.random.Generator,
        device: torch.device | str = "cpu",
        callback: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """Run ``outer_steps`` outer steps on random train meta-batches; returns the training query losses."""
        losses = []
        for step in range(self.config.outer_steps):
            loss = self.outer_step(problem.sample_batch(rng, self.config.meta_batch).to(device))
            losses.append(loss)
            if callback is not None:
                callback(step, loss)
        return losses


@dataclass
class MultiTaskConfig:
    """MTSR settings (paper App. D.1): Adam 1e-3, 500 full-batch steps at train and at test time."""

    steps_train: int = 500
    steps_test: int = 500
    lr: float = 1e-3
    v_init_std: float | None = None


class MultiTaskLearner:
    """MTSR: a shared symmetry matrix and one filter per task, all trained jointly (multi-task learning).

    Shared parameters are ``model.outer_names``; the per-task ones are ``model.inner_names`` (stacked over
    tasks, fresh N(0, v_init_std^2) draws; default std = std of the module's own initial filter).
    At test time the shared parameters are frozen and new per-task filters are fitted on the support set.
    """

    def __init__(self, model: nn.Module, config: MultiTaskConfig, seed: int = 0) -> None:
        if not getattr(model, "outer_names", ()):
            raise ValueError(f"MTSR needs a reparameterised module with symmetry parameters, got {type(model).__name__}")
        self.model, self.config = model, config
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.shared_names, self.task_names = tuple(model.outer_names), tuple(model.inner_names)
        self.gen = torch.Generator().manual_seed(seed)

    def _fresh_task_params(self, n_tasks: int) -> Params:
        out = {}
        for n in self.task_names:
            p = self.params[n]
            std = float(p.detach().std()) if self.config.v_init_std is None else self.config.v_init_std
            out[n] = (torch.randn(n_tasks, *p.shape, generator=self.gen) * std).to(p)
        return out

    def _task_losses(self, shared: Params, per_task: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def one_task(task_params: Params, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(functional_call(self.model, {**shared, **task_params}, (xt,)), yt)

        return vmap(one_task)(per_task, x, y)

    def _optimise(self, shared: Params, x: torch.Tensor, y: torch.Tensor, steps: int, train_shared: bool) -> Params:
        per_task = {n: p.requires_grad_() for n, p in self._fresh_task_params(x.shape[0]).items()}
        tensors = list(per_task.values()) + ([self.params[n] for n in self.shared_names] if train_shared else [])
        opt = torch.optim.Adam(tensors, lr=self.config.lr)
        for _ in range(steps):
            opt.zero_grad()
            self._task_losses(shared, per_task, x, y).sum().backward()
            opt.step()
        return {n: p.detach() for n, p in per_task.items()}

    def fit(self, problem: SyntheticProblem, device: torch.device | str = "cpu") -> None:
        """Jointly fit the shared symmetry and one filter per training task on all of the task's examples."""
        x, y = problem.tasks("train", list(range(problem.n_tasks["train"])))
        shared = {n: self.params[n] for n in self.shared_names}
        self._optimise(shared, x.to(device), y.to(device), self.config.steps_train, train_shared=True)

    def evaluate(self, batches: list[Batch]) -> np.ndarray:
        """Fit a new filter per test task on its support set (symmetry frozen); per-task query MSE ``(T,)``."""
        shared = {n: self.params[n].detach() for n in self.shared_names}
        out = []
        for b in batches:
            per_task = self._optimise(shared, b.x_support, b.y_support, self.config.steps_test, train_shared=False)
            with torch.no_grad():
                out.append(self._task_losses(shared, per_task, b.x_query, b.y_query))
        return torch.cat(out).cpu().numpy()
