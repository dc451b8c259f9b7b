"""MAP and Laplace (marginal-likelihood) training of networks with relaxed layers.

Every epoch: SGD with momentum (Adam as an option) on the MAP objective ``mean CE + 1/2 sum_t delta_t
||theta_t||^2 / N`` over augmented mini-batches, with a cosine learning-rate schedule stepped per iteration;
then validation and test metrics. With ``laplace=True``, after ``burn_in`` epochs and every ``marglik_every``
epochs, KFAC is fitted on the *unaugmented* training data, eigendecomposed once, and ``hyper_steps`` L-BFGS steps
are taken on the evidence profiled along the factored paths' scaling rays (``marglik_method="ray"``, the default:
:mod:`ella.bilinear_ray`; with ``"alternation"``, the paper's Adam steps on the log prior precisions at fixed
parameters). On CUDA every training step is a replayed CUDA
graph (:mod:`ella.static_step`). An atomic checkpoint is written after the first epoch, then whenever the last
one is older than ``checkpoint_minutes`` or than 50 times its own write time (so writing costs about 2% of a run;
a small network's is written every epoch), or every ``checkpoint_every`` epochs when that is set, and after the
last epoch; a run stopped by a signal loses at most the epochs since and ``resume=True`` continues from the last
one (the one before is kept; see :mod:`ella.checkpoint`). A resume continues only the run that was started: the same
configuration, the same number of processes and the same data (a fingerprint of the data tensors). Ctrl-C ends a
run with :class:`Interrupted`, which says where it stopped: the first after the epoch in progress, once that is
saved, a second at once (:class:`StopAfterEpoch`). Progress bars (rank 0, on a terminal;
:mod:`ella.progress`) follow the epochs, each epoch's batches and each KFAC-Laplace fit.

:class:`Learner` is that loop for any model holding relaxed layers and any data (tensors or loaders; see
:mod:`ella.inputs`); :func:`ella.learn.learn` is its one-call form. :class:`Trainer` is an experiment's run:
it loads the dataset and builds the paper's network from a :class:`TrainConfig`, then trains them as a
:class:`Learner`.

At about 600 lines this module is longer than the others: :class:`Learner` is one state machine (epochs,
captured or plain steps, marginal-likelihood rounds, checkpoints and resume, interruption, progress, data
parallelism) whose parts share its state; its configuration is :mod:`ella.config`, its pieces (checkpoint files,
progress bars, static-shape steps, input checks) live in their own modules.

Outputs in ``out_dir`` (none without one; the folder is locked while the run is in it): ``config.json``,
``metrics.jsonl`` and ``metrics.csv`` (one row appended per epoch), ``checkpoint.pt`` and
``checkpoint.previous.pt``, and after training ``final.json`` and (for Laplace or when asked) the
effective-parameter report ``effective_parameters.{txt,json}``, with its figure ``relative_effective_parameters.png``
in ``figure_dir`` (default ``out_dir/figures``; the experiment scripts use ``figures/<experiment>/<run>``), beside
the learning curves and the shares per round (:mod:`ella.curves`).

Data parallel (launched with ``torchrun --nproc_per_node=N``, see :mod:`ella.distributed`): parameter updates
go through ``DistributedDataParallel`` with ``batch_size`` samples per process per step (the torch convention:
the global batch is ``N * batch_size``); KFAC runs on each process's shard of the training data and is summed
over processes before the eigendecomposition, so the marginal likelihood and the precisions equal the
single-process ones. Training data given as tensors are sharded here; a loader must yield this process's shard
(``DistributedSampler``). Rank 0 alone evaluates, logs and writes the files above; ``resume`` loads rank 0's
checkpoint on every rank.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ella import distributed
from ella.bilinear_ray import METHOD_CAPTIONS, optimise_precisions
from ella.checkpoint import (
    OUT,
    RESUME,
    CheckpointError,
    OutputError,
    append_text,
    config_changes,
    open_run,
    save_checkpoint,
    state_checksum,
    unlock_folder,
    write_config,
    write_text,
)
from ella.config import TrainConfig, option_flags, training_record
from ella.curves import plot_run
from ella.data import DataBundle, TensorLoader, load_dataset
from ella.inputs import Data, PairLoader, check_curvature, check_model, dataset_size, first_inputs, is_pair
from ella.marglik import LaplaceFit, MarglikError, effective_parameters, fit_laplace
from ella.models import build_model
from ella.priors import Prior
from ella.progress import BarLoader, RunBar, fit_progress
from ella.report import (
    PathReport,
    effective_layer_types,
    path_output_power,
    path_reports,
    plot_relative,
    with_output_shares,
    write_report,
)
from ella.static_step import (
    CudaGraphs,
    GraphRecorder,
    StaticStep,
    StepRunner,
    device_description,
    graph_safe_optimizer,
    optimizer_flags,
    plan_epoch,
    plain_flags,
    set_optimizer_flags,
    supports_planning,
)
from kfac import EigenvalueMemo

log = logging.getLogger(__name__)

OUTPUT_SHARE_IMAGES = 1000  # unaugmented training images on which the report measures each path's output power
# what a checkpoint holds besides the run's configuration
_STATE_KEYS = ("epoch", "model", "prior", "optimizer", "scheduler", "hyper_optimizer", "train_generator", "torch_rng",
               "history", "last_marglik")


EVAL_BATCH = {"cpu": 500, "cuda": 5000}  # evaluation batch per device type (sums accumulate on the device)
KFAC_BATCH = {"cpu": 150, "cuda": 1024}  # default KFAC batch per device type (a performance choice only)
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # x (B, C, H, W), generator -> x (B, C, H, W)
CHECKPOINT_SHARE = 0.02  # by time, a checkpoint waits at least its own write time / this (writing costs about 2%)
_clock = time.monotonic  # the checkpoints' clock (a test replaces it)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> dict[str, float]:
    """Mean negative log-likelihood and accuracy of ``model`` on ``(x, y)`` (no augmentation), summed on the
    device and read back once; ``batch_size`` defaults to :data:`EVAL_BATCH` of the data's device type."""
    batch_size = batch_size or EVAL_BATCH.get(x.device.type, EVAL_BATCH["cpu"])
    return evaluate_batches(model, TensorLoader(x, y, batch_size), x.device)


def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device) -> dict[str, float]:
    """:func:`evaluate` over ``(x (B, ...), y (B,))`` batches on ``device``."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    with torch.no_grad():
        for xb, yb in batches:
            logits = model(xb)
            nll += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(-1) == yb).sum()
            count += len(yb)
    model.train()
    if count == 0:
        raise ValueError("cannot evaluate on no data")
    return {"nll": float(nll) / count, "acc": 100.0 * int(correct) / count}


_NESTED = ("precisions", "relative_n_eff")  # per-group dictionaries: in the JSONL only


def write_metrics(history: list[dict], out_dir: Path) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the full history (atomic, so never half-written); a
    run does so once (dropping the rows of epochs after the checkpoint it resumed), then appends
    (:func:`append_metrics`)."""
    write_text("".join(json.dumps(row) + "\n" for row in history), out_dir / "metrics.jsonl")
    columns = list(dict.fromkeys(key for row in history for key in row if key not in _NESTED))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(text.getvalue(), out_dir / "metrics.csv")


def append_metrics(history: list[dict], out_dir: Path) -> None:
    """Append the last row of ``history`` to ``metrics.jsonl`` and ``metrics.csv`` (both written before by
    :func:`write_metrics`); rewrite both when the row brings a column the CSV lacks (the first
    marginal-likelihood round's)."""
    row = history[-1]
    with (out_dir / "metrics.csv").open(newline="") as handle:
        columns = next(csv.reader(handle), [])
    if any(key not in columns for key in row if key not in _NESTED):
        write_metrics(history, out_dir)
        return
    append_text(json.dumps(row) + "\n", out_dir / "metrics.jsonl")
    text = io.StringIO(newline="")
    csv.DictWriter(text, fieldnames=columns, extrasaction="ignore").writerow(row)
    append_text(text.getvalue(), out_dir / "metrics.csv")


def _options() -> tuple[dict, dict[str, str]]:
    """Every :class:`TrainConfig` field's default, and every option field's flag."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, option_flags()


def open_output(out_dir: Path | None, record: dict, resume: bool) -> dict | None:
    """Lock and check the output folder (and on ``resume`` its checkpoint, configuration and number of
    processes); return the checkpoint's state to continue from (see :func:`ella.checkpoint.open_run`). The
    :class:`Learner` writes ``config.json`` (``record``) once it has checked the data. Runs on rank 0; every rank
    gets its result. Without a folder nothing is written and there is nothing to resume."""
    if out_dir is None:
        if resume:
            raise ValueError("resume needs the output folder of the run to continue (out_dir)")
        return None
    defaults, flags = _options()
    return distributed.on_main(lambda: open_run(out_dir, record, resume, keys=_STATE_KEYS, defaults=defaults,
                                                flags=flags, world_size=distributed.env_world_size()))


def check_finished(final: dict, path: Path, record: dict) -> None:
    """Raise a ValueError naming every differing field (with its flag) unless the finished run whose
    ``final.json`` (read from ``path``) is ``final`` has the configuration ``record``."""
    changed = config_changes(final.get("config", {}), record, *_options())
    if changed:
        raise ValueError(f"{RESUME}: the finished run in {path.parent} has another configuration: "
                         f"{'; '.join(changed)}; run these settings in another output folder ({OUT}), or the old ones "
                         "again")


def data_fingerprints(**data: Data | None) -> dict[str, str]:
    """A content fingerprint (SHA-256 of dtype, shape and bytes; :func:`ella.checkpoint.state_checksum`) of every
    named data given as tensors ``(x, y)``; loaders and ``None`` have none."""
    return {name: state_checksum(list(pair)) for name, pair in data.items() if pair is not None and is_pair(pair)}


def check_data(saved: dict[str, str] | None, now: dict[str, str], out_dir: Path) -> None:
    """Raise a ValueError unless the data fingerprints a checkpoint recorded (``saved``; ``None`` for one that
    predates them) match those of this run's data (``now``), naming the data that differ."""
    words = {"train": "training", "valid": "validation", "test": "test"}
    differ = [words[name] for name in now if saved is not None and name in saved and saved[name] != now[name]]
    if differ:
        raise ValueError(
            f"{RESUME} on other data than the run in {out_dir} was trained on: the {' and '.join(differ)} data differ "
            "from those its checkpoint recorded (do --data-dir or ELLA_DATA point at other data now?); give the run "
            f"its data again, or choose another output folder ({OUT})"
        )


@contextlib.contextmanager
def unlocked_on_error(out_dir: Path | None):
    """Release the output folder's lock when the block raises (a run refused after :func:`open_output`, or one
    that stopped), so that another process may continue it."""
    try:
        yield
    except BaseException:
        if out_dir is not None:
            unlock_folder(out_dir)
        raise


class Learner:
    """Trains ``model`` (any module holding relaxed layers, stock layers anywhere) on ``train`` with the training
    options of ``config`` (see :class:`TrainConfig`), learning its prior precisions with ``config.laplace``;
    ``run()`` trains to the end.

    Data (:mod:`ella.inputs`): tensors ``(x, y)`` or loaders of ``(x, y)`` batches. Training tensors are batched
    here (``batch_size``, shuffled by a generator seeded with ``seed``, augmented by ``augment``), sharded in a
    data-parallel run, and on CUDA trained by captured CUDA graphs (:mod:`ella.static_step`; a
    :class:`~ella.data.TensorLoader` too); any other loader (a ``torch.utils.data.DataLoader``) is trained by the
    plain loop, batch after batch as it yields them, moved to the device. ``laplace_data``: the *unaugmented*
    data KFAC runs on (default: the training tensors; the training loader itself when ``train`` is a loader);
    ``valid`` and ``test`` are evaluated after every epoch and at the end. ``out_dir``: the run's folder
    (checkpoints, metrics, report; None: nothing is written and the run cannot be resumed), prepared by
    :func:`open_output`, whose ``state`` it continues from; ``record``: the configuration the run records
    (default: :func:`training_record`). ``description`` labels the progress bar, ``title`` the report's figure.
    """

    test_set: str | None = None  # which test set the data hold (a Trainer's dataset says), kept in final.json

    def __init__(self, model: nn.Module, config: TrainConfig, train: Data, *, valid: Data | None = None,
                 test: Data | None = None, laplace_data: Data | None = None, augment: Augment | None = None,
                 out_dir: str | Path | None = None, figure_dir: str | Path | None = None, state: dict | None = None,
                 resume: bool = False, record: dict | None = None, description: str = "training",
                 title: str = "") -> None:
        config.check()
        check_model(model)
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        if figure_dir is not None:
            self.figure_dir: Path | None = Path(figure_dir)
        else:
            self.figure_dir = None if self.out_dir is None else self.out_dir / "figures"
        self.record = training_record(config) if record is None else record
        self.description, self.title = description, title
        self.device = distributed.setup(config.device, config.process_timeout)
        self.model = model.to(self.device)
        self.prior = Prior(self.model, per_tensor=config.per_tensor_prior, init_precision=config.prior_init)
        self.ddp_model = distributed.wrap_model(self.model, self.device)  # training forward only
        self.n_train = dataset_size(train, "train")
        rank, world = distributed.rank(), distributed.world_size()
        if self.n_train < world:
            raise ValueError(f"{self.n_train} training images cannot be shared among {world} processes")
        self.train_loader = self._train_loader(train, augment, rank, world)
        self.laplace_data = train if laplace_data is None else laplace_data
        self.laplace_name = "train" if laplace_data is None else "laplace_data"  # the data's name in messages
        self.marglik_loader = BarLoader(self._laplace_loader(self.laplace_data, rank, world))
        self.eigen_memo = EigenvalueMemo()  # eigenvalues of wide factors, reused while a factor is unchanged
        self._last_epoch_fit: LaplaceFit | None = None  # a round's fit after the last epoch, for the final report
        self.eval_data = {name: data for name, data in (("valid", valid), ("test", test)) if data is not None}
        self.captured = config.capture and self._can_capture()
        self.optimizer = self._make_optimizer()
        self.capture_fallback: dict | None = None  # where and why capture failed (then the plain loop trained on)
        self.runner = self._captured_runner() if self.captured else None
        total_steps = config.epochs * len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps, eta_min=config.lr_min)
        self.hyper_optimizer = torch.optim.Adam(self.prior.parameters(), lr=config.hyper_lr)
        self.history: list[dict] = []
        self.epoch = 0
        self.last_marglik: float | None = None
        self.saved_epoch = 0  # the epoch of the last checkpoint
        self._last_save, self._save_seconds = _clock(), 0.0  # when the last checkpoint was written; how long it took
        self._metrics_written = False  # metrics files rewritten from the history once, then appended to
        self.data_fingerprints = (data_fingerprints(train=train, valid=valid, test=test)
                                  if self.out_dir is not None and distributed.is_main() else {})
        self.report: list[PathReport] = []  # the effective-parameter report, once finished
        if config.laplace or config.report:  # before training, a model KFAC cannot handle says so
            check_curvature(self.model, self.marglik_loader.loader, self.laplace_name, **self._kfac_options())
        if state is not None:
            distributed.on_main(lambda: check_data(state.get("data"), self.data_fingerprints, self.out_dir))
            self._load_state(state)
        elif resume and distributed.is_main():
            log.warning("%s: no checkpoint in %s yet, so this starts a new run", RESUME, self.out_dir)
        if self.out_dir is not None and distributed.is_main():
            write_config(self.record, self.out_dir)
        if config.laplace and not any(map(self.is_marglik_epoch, range(1, config.epochs + 1))) and distributed.is_main():
            log.warning("no marginal-likelihood round in %d epochs (burn_in %d): the precisions stay at %g",
                        config.epochs, config.burn_in, config.prior_init)

    def _train_loader(self, train: Data, augment: Augment | None, rank: int, world: int):
        """Tensors as a shuffled (and sharded) :class:`TensorLoader`; a loader as it is."""
        if is_pair(train):
            generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
            x, y = (t.to(self.device) for t in train)
            return TensorLoader(x, y, self.config.batch_size, shuffle=True, augment=augment, generator=generator,
                                rank=rank, world_size=world)
        if augment is not None:
            raise ValueError("augment applies to training tensors; a training loader augments its batches itself")
        return train

    def _laplace_loader(self, data: Data, rank: int, world: int):
        """The KFAC data in batches of ``kfac_batch_size`` (tensors, sharded exactly) or a loader, checked."""
        if is_pair(data):
            kfac_batch = self.config.kfac_batch_size or KFAC_BATCH.get(self.device.type, KFAC_BATCH["cpu"])
            x, y = (t.to(self.device) for t in data)
            return TensorLoader(x, y, kfac_batch, rank=rank, world_size=world, pad_shards=False)
        return PairLoader(data, self.laplace_name, self.device)

    def _train_batches(self):
        """The training batches of an epoch: a TensorLoader's, or a loader's checked and on the device."""
        if isinstance(self.train_loader, TensorLoader):
            return self.train_loader
        return PairLoader(self.train_loader, "train", self.device)

    def _can_capture(self) -> bool:
        """Whether training steps can be captured: CUDA, one process, training tensors whose epochs can be planned."""
        return (self.device.type == "cuda" and distributed.world_size() == 1
                and isinstance(self.train_loader, TensorLoader) and supports_planning(self.train_loader))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.captured:
            return graph_safe_optimizer(self.model.parameters(), self.config.optimizer, self.config.lr,
                                        self.config.momentum)
        if self.config.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum)

    def _make_runner(self, capture: bool) -> StepRunner:
        """Static-shape training steps on the whole training set held on the device, with the training loader's
        augmentation, captured as CUDA graphs or (``capture=False``) run eagerly (see :mod:`ella.static_step`);
        needs the training data as tensors."""
        if not isinstance(self.train_loader, TensorLoader):
            raise ValueError("static-shape training steps need the training data as tensors (x, y)")
        x, y, augment = self.train_loader.x, self.train_loader.y, self.train_loader.augment

        def make_step(size: int, totals: torch.Tensor, lr: torch.Tensor | None) -> StaticStep:
            return StaticStep(self.model, self._penalty, self.optimizer, x, y, augment, size, totals, lr)

        return StepRunner(make_step, self.optimizer, self.device, capture=capture,
                          graphs=self._graphs() if capture else None)

    def _graphs(self) -> GraphRecorder:
        return CudaGraphs(self.device)

    def _captured_runner(self) -> StepRunner | None:
        """The captured steps' runner, or None (the plain loop) when even preparing capture fails."""
        try:
            return self._make_runner(capture=True)
        except Exception as error:  # a driver or torch quirk of the user's card must not end the run
            cause = f"{type(error).__name__}: {error}"
            log.warning("preparing CUDA graphs failed: %s; training goes on with the plain loop, as with "
                        "--no-capture", cause)
            set_optimizer_flags(self.optimizer, plain_flags(self.optimizer))
            self.capture_fallback = {"stage": "preparing", "cause": cause}
            return None

    def _penalty(self) -> torch.Tensor:
        """The prior's share of the training objective per data point, ``penalty / N``."""
        return self.prior.penalty(self.model) / self.n_train

    def _state(self) -> dict:
        """What a checkpoint holds: :data:`_STATE_KEYS` and the run's configuration."""
        generator = getattr(self.train_loader, "generator", None)
        return {
            "config": self.record,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "prior": self.prior.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "train_generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "last_marglik": self.last_marglik,
            "world_size": distributed.world_size(),
            "data": self.data_fingerprints,
            "eigen_memo": self.eigen_memo.state_dict(),
        }

    def _load_state(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.prior.load_state_dict(state["prior"])
        except RuntimeError as error:  # missing or unexpected parameters, other shapes
            raise CheckpointError(f"the checkpoint in {self.out_dir} holds another model than this run's: "
                                  f"{str(error).splitlines()[0]}; choose another output folder") from error
        flags = optimizer_flags(self.optimizer)
        self.optimizer.load_state_dict(state["optimizer"])
        set_optimizer_flags(self.optimizer, flags)  # the checkpoint's device or capture mode may not be this run's
        self.scheduler.load_state_dict(state["scheduler"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        if state["train_generator"] is not None:
            self.train_loader.generator.set_state(state["train_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = state["history"]
        self.epoch = self.saved_epoch = state["epoch"]
        self.last_marglik = state["last_marglik"]
        self.eigen_memo.load_state_dict(state.get("eigen_memo", {}))  # absent from checkpoints of earlier versions
        log.info("resumed %s at epoch %d", self.out_dir, self.epoch)

    def train_epoch(self) -> float:
        """One pass of parameter updates; returns the mean training cross-entropy. Captured on CUDA (one
        read-back per epoch; a non-finite loss is then reported at the end of the epoch), else the plain loop."""
        self.model.train()
        if self.runner is not None:
            total, non_finite = self.runner.run_epoch(plan_epoch(self.train_loader), self.scheduler)
            if self.runner.failure is not None:  # the plain loop trains on (see ella.static_step)
                self.capture_fallback = {"epoch": self.epoch + 1, **asdict(self.runner.failure)}
                self.runner = None
            if non_finite:
                raise FloatingPointError(f"training loss became non-finite in epoch {self.epoch + 1}")
            return total / self.train_loader.num_samples()
        total, count = 0.0, 0
        for xb, yb in tqdm(self._train_batches(), desc=f"epoch {self.epoch + 1}", leave=False, disable=_no_bar()):
            self.optimizer.zero_grad(set_to_none=True)
            ce = F.cross_entropy(self.ddp_model(xb), yb)
            loss = ce + self._penalty()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} in epoch {self.epoch + 1}")
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += ce.item() * len(yb)
            count += len(yb)
        total, count = distributed.all_reduce_sum(total, count)
        return total / count

    def _kfac_options(self) -> dict:
        return {"curvature": self.config.curvature, "kfac_approx": self.config.kfac_approx,
                "grouped_mode": self.config.grouped_mode}

    def laplace_fit(self) -> LaplaceFit:
        """KFAC-Laplace at the current parameters on the unaugmented training data."""
        return fit_laplace(self.model, self.marglik_loader, self.prior, sharded=distributed.is_distributed(),
                           memo=self.eigen_memo, **self._kfac_options())

    def hyper_round(self, last_epoch: bool = False) -> dict:
        """Fit KFAC-Laplace, then take the hyper-steps; a failed round is skipped (precisions kept), not fatal.

        Returns the row entries of the round: ``neg_log_marglik`` (``None`` when skipped) and, after a
        successful round, ``relative_n_eff`` (path name -> relative effective parameters at the new precisions,
        relaxed layers only), so that the metrics show how each layer's choice develops round by round. After the
        ``last_epoch`` the round's fit is kept for the final report: no parameter changes in between (the
        hyper-steps change the precisions only, and KFAC does not depend on them), so a second fit would repeat
        the same pass.
        """
        try:
            with self._fit_progress("marginal likelihood", self.config.hyper_steps):
                fit = self.laplace_fit()
                self.last_marglik = optimise_precisions(self.config.marglik_method, fit, self.prior, self.model,
                                                        self.hyper_optimizer, self.config.hyper_steps,
                                                        self.config.ray_min_scale)
        except MarglikError as error:
            log.warning("epoch %d: marginal-likelihood round skipped, precisions kept: %s", self.epoch + 1, error)
            return {"neg_log_marglik": None}
        self._last_epoch_fit = fit if last_epoch else None
        rows = path_reports(self.prior, effective_parameters(fit, self.prior), fit.n_params)
        relative = {f"{r.layer}.{r.path}": r.relative for r in rows if r.path is not None}
        return {"neg_log_marglik": self.last_marglik, "relative_n_eff": relative}

    def is_marglik_epoch(self, epoch: int) -> bool:
        c = self.config
        return c.laplace and epoch >= c.burn_in and epoch % c.marglik_every == 0

    def run(self) -> dict:
        """Train from the current epoch to ``config.epochs``; then evaluate and report (see :meth:`finish`).

        Ctrl-C raises :class:`Interrupted`, saying where the run stopped and which epoch its last checkpoint holds:
        the first once the epoch in progress is done and saved (rank 0's decides for all processes), a second at
        once (:class:`StopAfterEpoch`).
        """
        try:
            return self._run_epochs()
        except KeyboardInterrupt as stop:
            if isinstance(stop, Interrupted):
                raise
            # outside an epoch's own handler: between epochs, or torchrun's SIGTERM while a lost process's error
            # was being handled
            raise self._interrupted("after", self.epoch) from None

    def _run_epochs(self) -> dict:
        """:meth:`run` but for a KeyboardInterrupt outside an epoch, which it turns into :class:`Interrupted`."""
        c = self.config
        seconds = [row["seconds"] for row in self.history]
        with (RunBar(total=c.epochs, initial=self.epoch, desc=self.description, disable=_no_bar(),
                     seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None) as bar,
              StopAfterEpoch(bar) as stop):
            for epoch in range(self.epoch + 1, c.epochs + 1):
                start = time.perf_counter()
                try:
                    train_loss = self.train_epoch()
                    row: dict = {"epoch": epoch, "train_loss": train_loss, "lr": self.scheduler.get_last_lr()[0]}
                    if self.is_marglik_epoch(epoch):
                        row.update(self.hyper_round(last_epoch=epoch == c.epochs))
                    self.epoch = epoch
                    if distributed.is_main():
                        bar.set_postfix_str("evaluating, saving")
                    self.saved_epoch, stopping = distributed.on_main(  # every rank knows them
                        lambda: self._record(row, start, stop), what=f"rank 0 evaluating and saving epoch {epoch}")
                except KeyboardInterrupt:
                    where = "after" if self.epoch == epoch else "in"  # after: while it was evaluated and saved
                    raise self._interrupted(where, epoch) from None
                except RuntimeError as error:  # a lost process: say what is saved, so that the run can continue
                    if isinstance(error, distributed.ProcessGroupError):
                        raise distributed.ProcessGroupError(f"{error}; in epoch {epoch}: {self._saved()}") from error
                    if distributed.is_collective_failure(error):
                        lost = distributed.process_group_error(error, "exchanging gradients")
                        raise distributed.ProcessGroupError(f"{lost}; in epoch {epoch}: {self._saved()}") from error
                    raise
                if stopping:
                    raise self._interrupted("after", epoch)
                bar.set_postfix_str("", refresh=False)
                bar.update()
            stop.restore()  # Ctrl-C in the final report stops at once
            bar.set_postfix_str("final report")
            return self.finish()

    def _interrupted(self, where: str, epoch: int) -> Interrupted:
        """``interrupted {where} epoch {epoch} of {epochs}`` and what the run has saved (:meth:`_saved`)."""
        return Interrupted(f"interrupted {where} epoch {epoch} of {self.config.epochs}; {self._saved()}")

    def _saved(self) -> str:
        """What an interrupted run has saved."""
        if self.out_dir is None:
            return "nothing is saved (no output folder)"
        if self.saved_epoch:
            return f"the checkpoint in {self.out_dir} holds epoch {self.saved_epoch}"
        return "no epoch of it is saved yet"

    def _evaluate(self, name: str) -> dict[str, float]:
        """Negative log-likelihood and accuracy on the ``name`` data (``valid`` or ``test``)."""
        data = self.eval_data[name]
        if is_pair(data):
            return evaluate(self.model, *(t.to(self.device) for t in data))
        return evaluate_batches(self.model, PairLoader(data, name, self.device), self.device)

    def _record(self, row: dict, start: float, stop: StopAfterEpoch) -> tuple[int, bool]:
        """Evaluate, then append ``row`` to the history, checkpoint when due (:meth:`_checkpoint_due`) or when the
        run is to ``stop``, and append to the metrics (rank 0 only); returns the epoch the last checkpoint holds
        and whether the run stops here."""
        stopping = stop.requested
        for name in self.eval_data:
            row.update({f"{name}_{k}": v for k, v in self._evaluate(name).items()})
        row["precisions"] = self.prior.as_dict()
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        if self.out_dir is not None:
            if stopping or self._checkpoint_due():
                begin = _clock()
                save_checkpoint(self._state(), self.out_dir)
                self._last_save = _clock()
                self._save_seconds = self._last_save - begin
                self.saved_epoch = self.epoch
            (append_metrics if self._metrics_written else write_metrics)(self.history, self.out_dir)
            self._metrics_written = True
        log.info("epoch %d: train %.4f%s%s%s", row["epoch"], row["train_loss"],
                 f" valid nll {row['valid_nll']:.4f} acc {row['valid_acc']:.2f}" if "valid" in self.eval_data else "",
                 f" test acc {row['test_acc']:.2f}" if "test" in self.eval_data else "",
                 f" -log p(D)/N {row['neg_log_marglik']:.4f}" if row.get("neg_log_marglik") is not None else "")
        return self.saved_epoch, stopping

    def _checkpoint_due(self) -> bool:
        """After the last epoch; every ``checkpoint_every`` epochs when set; else when the last checkpoint is older
        than ``checkpoint_minutes`` or than its write time / :data:`CHECKPOINT_SHARE` (the first epoch's is
        written at once, measuring that time)."""
        c = self.config
        if self.epoch == c.epochs:
            return True
        if c.checkpoint_every is not None:
            return self.epoch % c.checkpoint_every == 0
        return _clock() - self._last_save >= min(60 * c.checkpoint_minutes, self._save_seconds / CHECKPOINT_SHARE)

    def finish(self) -> dict:
        """Final metrics (``final.json``), and the effective-parameter report (:attr:`report`) for Laplace runs
        (or when ``report``)."""
        start = time.perf_counter()
        try:
            fit = None
            if self._last_epoch_fit is not None:  # the last epoch's round fitted these very parameters
                fit = self._last_epoch_fit
            elif self.config.laplace or self.config.report:
                with self._fit_progress("final report"):
                    fit = self.laplace_fit()  # on every rank
            final, self.report = distributed.on_main(lambda: self._write_final(fit, start))
            if self.out_dir is not None:
                unlock_folder(self.out_dir)  # the run is over (a no-op on ranks that hold no lock)
            return final
        except KeyboardInterrupt:
            saved = (f"the checkpoint in {self.out_dir} holds all {self.epoch} epochs" if self.out_dir is not None
                     else "nothing is saved (no output folder)")
            raise Interrupted(f"interrupted while writing the final report; {saved}") from None

    def _fit_progress(self, desc: str, hyper_steps: int = 0) -> AbstractContextManager:
        return fit_progress(self.marglik_loader, self.hyper_optimizer, desc, hyper_steps, disable=_no_bar())

    def _caption(self) -> str:
        """The report's last line: which method learned the precisions."""
        return METHOD_CAPTIONS[self.config.marglik_method] if self.config.laplace else "precisions fixed (MAP run)"

    def _write_final(self, fit: LaplaceFit | None, start: float) -> tuple[dict, list[PathReport]]:
        """``final.json`` and the report's rows; its ``seconds`` are the run's wall time: the epochs' (over
        resumes) and the finish's."""
        final = {"config": self.record, "epochs": self.epoch}
        if self.test_set is not None:
            final["test_set"] = self.test_set
        final.update({name: self._evaluate(name) for name in self.eval_data})
        final.update({
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "neg_log_marglik": self.last_marglik,
            "precisions": self.prior.as_dict(),
            "training": self.training_path(),
        })
        rows = []
        if fit is not None:
            rows = path_reports(self.prior, effective_parameters(fit, self.prior), fit.n_params)
            inputs = first_inputs(self.laplace_data, OUTPUT_SHARE_IMAGES, self.laplace_name, self.device)
            rows = with_output_shares(rows, path_output_power(self.model, inputs))
            if self.out_dir is not None:
                try:
                    write_report(rows, self.out_dir, caption=self._caption())
                    plot_relative(rows, self.figure_dir / "relative_effective_parameters.png", title=self.title)
                except OSError as error:  # a full disk, a read-only figure folder
                    raise OutputError(f"cannot write the report of {self.out_dir}: {error}") from error
            final["effective_layer_types"] = effective_layer_types(rows)
            final["caption"] = self._caption()
        if self.out_dir is not None:
            try:
                plot_run(self.history, self.figure_dir, title=self.title)
            except OSError as error:
                raise OutputError(f"cannot draw the learning curves of {self.out_dir}: {error}") from error
        final["seconds"] = sum(row["seconds"] for row in self.history) + time.perf_counter() - start
        if self.out_dir is not None:
            write_text(json.dumps(final, indent=2), self.out_dir / "final.json")
        return final, rows

    def training_path(self) -> dict:
        """How this process trained (a resumed run: since the resume): ``steps`` (captured CUDA graphs, eager
        static-shape steps or the plain loop), ``capture_fallback`` (None, or where and why capture failed and
        the plain loop took over) and ``device`` (:func:`ella.static_step.device_description`)."""
        runner, fallback = self.runner, self.capture_fallback
        if fallback is not None:
            steps = ("plain loop" if fallback["stage"] == "preparing"
                     else f"captured CUDA graphs, then the plain loop from epoch {fallback['epoch']}")
        elif runner is None:
            steps = "plain loop"
        else:
            steps = "captured CUDA graphs" if runner.capture else "static-shape steps, eager"
        return {"steps": steps, "capture_fallback": self.capture_fallback,
                "device": device_description(self.device)}


class Trainer(Learner):
    """One run of an experiment: the dataset and the paper's network that ``config`` names, trained as a
    :class:`Learner` with its training options, into ``out_dir``."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, resume: bool = False,
                 figure_dir: str | Path | None = None) -> None:
        config.check()
        out_dir = Path(out_dir)
        device = distributed.setup(config.device, config.process_timeout)
        state = open_output(out_dir, asdict(config), resume)  # checks before it loads or writes; rank 0's state

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
            download=config.download,
            device=device,
        )
        model = build_model(config.layer, self.data.in_channels, self.data.n_classes, config.alpha, combine=config.combine)
        super().__init__(
            model, config, self.data.train, valid=self.data.valid, test=self.data.test,
            augment=self.data.augment if config.augment else None, out_dir=out_dir, figure_dir=figure_dir,
            state=state, resume=resume, record=asdict(config), description=f"{config.layer} on {config.dataset}",
            title=config.layer,
        )
        self.test_set = self.data.info["test_source"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the run stopped and what its checkpoint holds."""


class StopAfterEpoch:
    """Ctrl-C during the epochs of a run: the first sets :attr:`requested` (the run stops once the epoch in
    progress is done and saved; ``bar`` and a log line say so), a second raises KeyboardInterrupt at once. Takes
    over SIGINT only in the main thread and only from Python's default handler (a program with its own keeps
    it); in a single process likewise SIGTERM where it is a Ctrl-C already (``signal.default_int_handler``, as
    :func:`ella.cli.run_script` makes it: a batch scheduler's notice before it kills a job then saves the epoch in
    progress). Leaving the block, or :meth:`restore`, gives them back."""

    def __init__(self, bar: RunBar) -> None:
        self.bar, self.requested = bar, False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopAfterEpoch:
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = [signal.SIGINT] + ([signal.SIGTERM] if distributed.world_size() == 1 else [])
        for number in signals:
            if signal.getsignal(number) is signal.default_int_handler:
                self._previous[number] = signal.signal(number, self._first_then_at_once)
        return self

    def _first_then_at_once(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.info("%s: stopping after this epoch, once it is saved (again: at once)", name)
        self.bar.set_postfix_str(f"{name}: stopping after this epoch, once it is saved (again: at once)")

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _no_bar() -> bool | None:
    """tqdm's ``disable``: bars only on rank 0 (and, as tqdm decides, only on a terminal)."""
    return None if distributed.is_main() else True


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, figure_dir: str | Path | None = None) -> dict:
    """Run (or continue, with ``resume``) one training run; returns the final metrics. However it ends, the output
    folder is unlocked."""
    with unlocked_on_error(Path(out_dir)):
        return Trainer(config, out_dir, resume=resume, figure_dir=figure_dir).run()
