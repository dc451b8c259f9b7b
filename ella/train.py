"""MAP and Laplace (marginal-likelihood) training of the relaxed networks (spec section 4).

Every epoch: SGD with momentum (Adam as an option) on the MAP objective ``mean CE + 1/2 sum_t delta_t
||theta_t||^2 / N`` over augmented mini-batches, with a cosine learning-rate schedule stepped per iteration;
then validation and test metrics. With ``laplace=True``, after ``burn_in`` epochs and every ``marglik_every``
epochs, KFAC is fitted on the *unaugmented* training data, eigendecomposed once, and ``hyper_steps`` Adam steps
are taken on the log prior precisions. Each epoch ends with an atomic checkpoint, so an interrupted run loses
at most the epoch in progress and ``resume=True`` continues from the last one.

Outputs in ``out_dir``: ``config.json``, ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch),
``checkpoint.pt``, and after training ``final.json`` and (for Laplace or when asked) the effective-parameter
report ``effective_parameters.{txt,json}``, with its figure ``relative_effective_parameters.png`` in
``figure_dir`` (default ``out_dir/figures``; the experiment scripts use ``figures/<experiment>/<run>``).

Data parallel (launched with ``torchrun --nproc_per_node=N``, see :mod:`ella.distributed`): parameter updates
go through ``DistributedDataParallel`` with ``batch_size`` samples per process per step (the torch convention:
the global batch is ``N * batch_size``); KFAC runs on each process's shard of the training data and is summed
over processes before the eigendecomposition, so the marginal likelihood and the precisions equal the
single-process ones. Rank 0 alone evaluates, logs and writes the files above; ``resume`` loads rank 0's
checkpoint on every rank.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ella import distributed
from ella.data import DataBundle, TensorLoader, load_dataset
from ella.bilinear_ray import MARGLIK_METHODS, METHOD_CAPTIONS, optimise_precisions
from ella.marglik import LaplaceFit, MarglikError, effective_parameters, fit_laplace
from ella.models import build_model
from ella.priors import Prior
from ella.report import (
    effective_layer_types,
    path_output_power,
    path_reports,
    plot_relative,
    with_output_shares,
    write_report,
)
from kfac.rules import GROUPED_MODES, KFAC_APPROXES
from kfac.sqrt_hessian import CURVATURES, check_choice

log = logging.getLogger(__name__)

OUTPUT_SHARE_IMAGES = 1000  # unaugmented training images on which the report measures each path's output power


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and checked on ``--resume``."""

    layer: str = "ffc_conv"
    dataset: str = "cifar10"
    task: str | None = None
    alpha: int | None = None
    combine: str = "sqrt"  # how a relaxed layer combines P paths: sum / sqrt(P) ("sqrt"), "sum" (paper), "mean" (reference)
    epochs: int = 4000
    batch_size: int = 128
    lr: float = 0.01
    lr_min: float = 1e-6
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, as the reference code) or "adam" (as the paper)
    momentum: float = 0.9
    augment: bool = True
    laplace: bool = False
    burn_in: int = 10
    marglik_every: int = 5
    hyper_steps: int = 20
    hyper_lr: float = 0.1
    marglik_method: str = "alternation"  # hyper-steps: the paper's "alternation" or "ray" (ella.bilinear_ray)
    kfac_batch_size: int = 150
    curvature: str = "ggn"
    kfac_approx: str = "expand"  # KFAC over the positions a weight is shared across: "expand" or "reduce"
    grouped_mode: str = "per_group"  # KFAC of F-FC / S-FC stages: "per_group" blocks or the "reference" shared factor
    prior_init: float = 1.0
    per_tensor_prior: bool = False
    report: bool = False  # effective-parameter report after a MAP run too
    n_train: int | None = None
    n_valid: int | None = None
    valid_fraction: float = 0.1
    cifar_test: str = "exact"
    seed: int = 711
    data_dir: str | None = None
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    def check(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        check_choice(self.curvature, CURVATURES, "curvature")
        check_choice(self.kfac_approx, KFAC_APPROXES, "kfac_approx")
        check_choice(self.grouped_mode, GROUPED_MODES, "grouped_mode")
        check_choice(self.marglik_method, MARGLIK_METHODS, "marglik_method")
        for name in ("epochs", "batch_size", "marglik_every", "kfac_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Mean negative log-likelihood and accuracy of ``model`` on ``(x, y)`` (no augmentation)."""
    model.eval()
    nll, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in TensorLoader(x, y, batch_size):
            logits = model(xb)
            nll += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(-1) == yb).sum())
    model.train()
    return {"nll": nll / len(y), "acc": 100.0 * correct / len(y)}


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_NESTED = ("precisions", "relative_n_eff")  # per-group dictionaries: in the JSONL only


def write_metrics(history: list[dict], out_dir: Path) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the full history (atomic, so never half-written)."""
    _atomic_write("".join(json.dumps(row) + "\n" for row in history), out_dir / "metrics.jsonl")
    columns = list(dict.fromkeys(key for row in history for key in row if key not in _NESTED))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    _atomic_write(text.getvalue(), out_dir / "metrics.csv")


class Trainer:
    """Holds the model, prior, optimisers and data of one run; ``run()`` trains to the end."""

    def __init__(self, config: TrainConfig, out_dir: Path, resume: bool = False, figure_dir: Path | None = None) -> None:
        config.check()
        self.config = config
        self.out_dir = out_dir
        self.figure_dir = out_dir / "figures" if figure_dir is None else figure_dir
        self.device = distributed.setup(config.device)
        self.checkpoint_path = out_dir / "checkpoint.pt"
        distributed.on_main(lambda: self._check_config_file(resume))

        torch.manual_seed(config.seed)
        self.data: DataBundle = load_dataset(
            config.dataset,
            config.data_dir,
            task=config.task,
            n_train=config.n_train,
            n_valid=config.n_valid,
            valid_fraction=config.valid_fraction,
            seed=config.seed,
            cifar_test=config.cifar_test,
            device=self.device,
        )
        self.model = build_model(
            config.layer, self.data.in_channels, self.data.n_classes, config.alpha, combine=config.combine
        ).to(self.device)
        self.prior = Prior(self.model, per_tensor=config.per_tensor_prior, init_precision=config.prior_init)
        self.ddp_model = distributed.wrap_model(self.model, self.device)  # training forward only
        self.n_train = len(self.data.train[1])
        rank, world = distributed.rank(), distributed.world_size()
        if self.n_train < world:
            raise ValueError(f"{self.n_train} training images cannot be shared among {world} processes")
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        augment = self.data.augment if config.augment else None
        self.train_loader = TensorLoader(*self.data.train, config.batch_size, shuffle=True, augment=augment,
                                         generator=generator, rank=rank, world_size=world)
        self.marglik_loader = TensorLoader(*self.data.train, config.kfac_batch_size, rank=rank, world_size=world,
                                           pad_shards=False)
        self.optimizer = self._make_optimizer()
        total_steps = config.epochs * len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps, eta_min=config.lr_min)
        self.hyper_optimizer = torch.optim.Adam(self.prior.parameters(), lr=config.hyper_lr)
        self.history: list[dict] = []
        self.epoch = 0
        self.last_marglik: float | None = None
        if resume and distributed.on_main(self.checkpoint_path.exists):
            self._load_checkpoint()
        elif resume and distributed.is_main():
            log.warning("--resume: no checkpoint in %s yet, so this starts a new run", self.out_dir)

    def _check_config_file(self, resume: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "config.json"
        current = asdict(self.config)
        if resume and path.exists():
            saved = json.loads(path.read_text())
            defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
            # a field added after the run started counts as its default
            changed = {
                k: (saved.get(k, defaults.get(k)), v)
                for k, v in current.items()
                if k != "device" and saved.get(k, defaults.get(k)) != v
            }
            if changed:
                raise ValueError(f"--resume with a different configuration than {path}: {changed}")
        elif not resume and (self.out_dir / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.out_dir} already holds a run; pass --resume to continue it or choose --out")
        _atomic_write(json.dumps(current, indent=2), path)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum)

    def _state(self) -> dict:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "prior": self.prior.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "train_generator": self.train_loader.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "last_marglik": self.last_marglik,
        }

    def _load_checkpoint(self) -> None:
        state = distributed.on_main(lambda: torch.load(self.checkpoint_path, map_location="cpu", weights_only=False))
        self.model.load_state_dict(state["model"])
        self.prior.load_state_dict(state["prior"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.train_loader.generator.set_state(state["train_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = state["history"]
        self.epoch = state["epoch"]
        self.last_marglik = state["last_marglik"]
        log.info("resumed %s at epoch %d", self.out_dir, self.epoch)

    def train_epoch(self) -> float:
        """One pass of parameter updates; returns the mean training cross-entropy."""
        self.model.train()
        total, count = 0.0, 0
        for xb, yb in tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}", leave=False, disable=_no_bar()):
            self.optimizer.zero_grad(set_to_none=True)
            ce = F.cross_entropy(self.ddp_model(xb), yb)
            loss = ce + self.prior.penalty(self.model) / self.n_train
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} in epoch {self.epoch + 1}")
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += ce.item() * len(yb)
            count += len(yb)
        total, count = distributed.all_reduce_sum(total, count)
        return total / count

    def laplace_fit(self) -> LaplaceFit:
        """KFAC-Laplace at the current parameters on the unaugmented training data."""
        return fit_laplace(self.model, self.marglik_loader, self.prior, curvature=self.config.curvature,
                           sharded=distributed.is_distributed(), kfac_approx=self.config.kfac_approx,
                           grouped_mode=self.config.grouped_mode)

    def hyper_round(self) -> dict:
        """Fit KFAC-Laplace, then take the hyper-steps; a failed round is skipped (precisions kept), not fatal.

        Returns the row entries of the round: ``neg_log_marglik`` (``None`` when skipped) and, after a
        successful round, ``relative_n_eff`` (path name -> relative effective parameters at the new precisions,
        relaxed layers only), so that the metrics show how each layer's choice develops round by round.
        """
        try:
            fit = self.laplace_fit()
            self.last_marglik = optimise_precisions(self.config.marglik_method, fit, self.prior, self.model,
                                                    self.hyper_optimizer, self.config.hyper_steps)
        except MarglikError as error:
            log.warning("epoch %d: marginal-likelihood round skipped, precisions kept: %s", self.epoch + 1, error)
            return {"neg_log_marglik": None}
        rows = path_reports(self.prior, effective_parameters(fit, self.prior), fit.n_params)
        relative = {f"{r.layer}.{r.path}": r.relative for r in rows if r.path is not None}
        return {"neg_log_marglik": self.last_marglik, "relative_n_eff": relative}

    def is_marglik_epoch(self, epoch: int) -> bool:
        c = self.config
        return c.laplace and epoch >= c.burn_in and epoch % c.marglik_every == 0

    def run(self) -> dict:
        """Train from the current epoch to ``config.epochs``; then evaluate and report."""
        c = self.config
        for epoch in tqdm(range(self.epoch + 1, c.epochs + 1), desc=f"{c.layer} on {c.dataset}", initial=self.epoch, total=c.epochs, disable=_no_bar()):
            start = time.perf_counter()
            train_loss = self.train_epoch()
            row: dict = {"epoch": epoch, "train_loss": train_loss, "lr": self.scheduler.get_last_lr()[0]}
            if self.is_marglik_epoch(epoch):
                row.update(self.hyper_round())
            self.epoch = epoch
            if distributed.is_main():
                self._record(row, start)
        return self.finish()

    def _record(self, row: dict, start: float) -> None:
        """Evaluate, then append ``row`` to the history, checkpoint and rewrite the metrics (rank 0 only)."""
        row.update({f"valid_{k}": v for k, v in evaluate(self.model, *self.data.valid).items()})
        row.update({f"test_{k}": v for k, v in evaluate(self.model, *self.data.test).items()})
        row["precisions"] = self.prior.as_dict()
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        _atomic_save(self._state(), self.checkpoint_path)
        write_metrics(self.history, self.out_dir)
        log.info(
            "epoch %d: train %.4f valid nll %.4f acc %.2f test acc %.2f%s",
            row["epoch"], row["train_loss"], row["valid_nll"], row["valid_acc"], row["test_acc"],
            f" -log p(D)/N {row['neg_log_marglik']:.4f}" if row.get("neg_log_marglik") is not None else "",
        )

    def finish(self) -> dict:
        """Final metrics, and the effective-parameter report for Laplace runs (or when ``report``)."""
        fit = self.laplace_fit() if self.config.laplace or self.config.report else None  # on every rank
        return distributed.on_main(lambda: self._write_final(fit))

    def _write_final(self, fit: LaplaceFit | None) -> dict:
        final = {
            "config": asdict(self.config),
            "epochs": self.epoch,
            "valid": evaluate(self.model, *self.data.valid),
            "test": evaluate(self.model, *self.data.test),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "neg_log_marglik": self.last_marglik,
            "precisions": self.prior.as_dict(),
        }
        if fit is not None:
            rows = path_reports(self.prior, effective_parameters(fit, self.prior), fit.n_params)
            power = path_output_power(self.model, self.data.train[0][:OUTPUT_SHARE_IMAGES])
            rows = with_output_shares(rows, power)
            caption = METHOD_CAPTIONS[self.config.marglik_method] if self.config.laplace else "precisions fixed (MAP run)"
            write_report(rows, self.out_dir, caption=caption)
            plot_relative(rows, self.figure_dir / "relative_effective_parameters.png", title=self.config.layer)
            final["effective_layer_types"] = effective_layer_types(rows)
        _atomic_write(json.dumps(final, indent=2), self.out_dir / "final.json")
        return final


def _no_bar() -> bool | None:
    """tqdm's ``disable``: bars only on rank 0 (and, as tqdm decides, only on a terminal)."""
    return None if distributed.is_main() else True


def train(config: TrainConfig, out_dir: Path, resume: bool = False, figure_dir: Path | None = None) -> dict:
    """Run (or continue, with ``resume``) one training run; returns the final metrics."""
    return Trainer(config, out_dir, resume=resume, figure_dir=figure_dir).run()
