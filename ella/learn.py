"""ella as a library: learn which symmetry each layer of your own network should have, in one call.

Build the network with relaxed layers (:func:`ella.layers.relaxed_layer`: which paths, channels, input size,
downsample or not) and stock layers anywhere, then::

    from ella.layers import relaxed_layer
    from ella.learn import learn

    model = nn.Sequential(
        relaxed_layer(1, 8, 32, "ffc_conv"),                    # F-FC + CONV, (B, 1, 32, 32) -> (B, 8, 32, 32)
        relaxed_layer(8, 16, 32, "ffc_conv", downsample=True),  # -> (B, 16, 16, 16)
        nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )
    result = learn(model, (x_train, y_train), valid=(x_valid, y_valid), epochs=6, optimizer="adam", lr=3e-3,
                   burn_in=2, marglik_every=2, hyper_steps=50)
    print(result.table())  # per path: precision, effective parameters, relative share, the layer's choice

:func:`learn` trains by the same loop as the paper's experiments (:class:`ella.train.Learner`): MAP training
with the prior penalty, KFAC-Laplace marginal-likelihood rounds on the prior precisions (one per path), the
cosine schedule, progress bars, and with ``out_dir`` checkpoints, metrics and the report on disk, resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from ella import distributed
from ella.inputs import Data, check_kind, check_model, checked, is_pair, output_classes
from ella.options import check_switch
from ella.priors import Prior
from ella.report import PathReport, format_report
from ella.config import EXPERIMENT_FIELDS, TrainConfig, training_record
from ella.train import Augment, Learner, open_output, unlocked_on_error


@dataclass
class Result:
    """What :func:`learn` returns: the trained ``model``, its ``prior`` (the learned precisions), the
    effective-parameter ``report`` (one row per path of every relaxed layer, named by the layer's module path,
    and one per other layer), the final ``metrics`` (``final.json``: ``valid`` / ``test`` NLL and accuracy,
    ``neg_log_marglik``, ``effective_layer_types``, ...) and the per-epoch ``history``."""

    model: nn.Module
    prior: Prior
    report: list[PathReport]
    metrics: dict
    history: list[dict]

    @property
    def precisions(self) -> dict[str, float]:
        """Prior group (``<layer>.<path>``, or a stock layer's module path) -> learned precision."""
        return self.prior.as_dict()

    def table(self) -> str:
        """The report as a text table (:func:`ella.report.format_report`) and its caption, which says how the
        precisions were learned: the text of ``effective_parameters.txt``."""
        caption = self.metrics.get("caption")
        return format_report(self.report) + (f"\n{caption}" if caption else "")


def learn(model: nn.Module, train: Data, *, epochs: int, valid: Data | None = None, test: Data | None = None,
          laplace_data: Data | None = None, augment: Augment | None = None, out_dir: str | Path | None = None,
          resume: bool = False, laplace: bool = True, **options) -> Result:
    """Train ``model`` (a classifier ``(B, ...) -> (B, K)`` holding at least one relaxed layer) on ``train`` for
    ``epochs`` epochs, learning every path's prior precision by the Laplace marginal likelihood (MAP training
    alone with ``laplace=False``); returns the :class:`Result`.

    Data: tensors ``(x (N, ...), y (N,))``, batched, shuffled and (by ``augment(x, generator)``, e.g.
    :data:`ella.data.cifar_augment`) augmented here and on CUDA trained by captured CUDA graphs; or any loader of
    ``(x, y)`` batches, e.g. a ``torch.utils.data.DataLoader``, trained by the plain loop as it yields them (its
    ``.dataset`` gives ``N``). ``laplace_data`` is the *unaugmented* data the curvature is fitted on (default:
    the training tensors, or the training loader). ``valid`` and ``test`` are evaluated after every epoch.

    ``options`` are the training options of :class:`ella.train.TrainConfig`, with its defaults: ``optimizer``
    (``"sgd"`` / ``"adam"``), ``lr``, ``lr_min`` (cosine schedule), ``batch_size``, ``burn_in``,
    ``marglik_every``, ``hyper_steps``, ``hyper_lr``, ``prior_init``, ``per_tensor_prior``, ``curvature``,
    ``kfac_approx``, ``grouped_mode``, ``kfac_batch_size``, ``seed`` (of the shuffling and augmentation; seed
    torch yourself before building the model), ``device``, ``capture``, ``checkpoint_every``, ``checkpoint_minutes``, ``process_timeout``, ``report``.
    With ``out_dir`` the run writes its checkpoints, metrics and report there, and ``resume=True`` continues it.
    Frozen parameters (``requires_grad=False``) are constants of the model: they have no prior precision and no
    curvature, and stay as they are.

    Raises :class:`ella.inputs.ModelError` (a ValueError) before training for a model without a relaxed layer
    or with a module KFAC cannot handle (naming it), ValueError for options out of range (naming the argument)
    and for data that are not ``(x, y)`` pairs (a ``Dataset``, numpy arrays), hold no examples, have labels that
    are not class indices of the model's output (any integer dtype), inputs of another dtype than the model takes
    or non-finite inputs (naming the argument and the first bad example; tensors are checked
    before training, a loader's batches as they come: :mod:`ella.inputs`), and TypeError for an option that is
    not a training option.
    """
    config = _config(epochs=epochs, laplace=laplace, **options)
    config.check(argument_names=True)
    resume = check_switch(resume, "resume")
    augment = _augmentation(augment)
    check_model(model)
    model = model.to(distributed.setup(config.device))
    given = {"train": train, "laplace_data": laplace_data, "valid": valid, "test": test}
    given = {name: data for name, data in given.items() if data is not None}
    for name, data in given.items():
        check_kind(data, name)
    probe = next((name for name, data in given.items() if is_pair(data)), "train")  # a loader only if no tensors
    n_classes, dtype = output_classes(model, given[probe], probe)
    train, laplace_data, valid, test = (checked(given[name], name, n_classes, dtype) if name in given else None
                                        for name in ("train", "laplace_data", "valid", "test"))
    out = None if out_dir is None else Path(out_dir)
    with unlocked_on_error(out):  # a refused or stopped run leaves its folder free for the next one
        state = open_output(out, training_record(config), resume)
        learner = Learner(model, config, train, valid=valid, test=test, laplace_data=laplace_data, augment=augment,
                          out_dir=out, state=state, resume=resume)
        metrics = learner.run()
    return Result(learner.model, learner.prior, learner.report, metrics, learner.history)


def _augmentation(augment: object) -> Augment | None:
    """``augment`` as :func:`learn` uses it: a function ``(x, generator) -> x`` or ``None`` (also for ``False``)."""
    if augment is None or augment is False:
        return None
    if not callable(augment):
        raise TypeError(f"augment takes a function (x, generator) -> x, e.g. ella.data.cifar_augment, or None; got "
                        f"{augment!r}")
    return augment


def _config(**options) -> TrainConfig:
    """``options`` as a :class:`TrainConfig`; a TypeError for a name that is no training option."""
    names = [item.name for item in fields(TrainConfig) if item.name not in EXPERIMENT_FIELDS]
    for name in options:
        if name in EXPERIMENT_FIELDS:
            raise TypeError(f"learn() takes no {name!r}: that option chooses an experiment's dataset or network; "
                            "learn() trains the model and the data it is given")
        if name not in names:
            raise TypeError(f"learn() got an unknown option {name!r}; the training options are: {', '.join(names)}")
    return TrainConfig(**options)
