"""The configuration of a training run: :class:`TrainConfig`, one dataclass field per option.

A field made by :func:`~ella.options.option` is also a flag of every training experiment (``lr_min`` is
``--lr-min``; :mod:`ella.cli` derives the flags, :meth:`TrainConfig.check` the checks, both from the field's
metadata), so adding a training option is adding one field here. :data:`EXPERIMENT_FIELDS` are what an
experiment trains (data set, network), the rest how it trains (:func:`training_record`, also
:func:`ella.learn.learn`'s options).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from ella.bilinear_ray import MARGLIK_METHODS, RAY_MIN_SCALE
from ella.data import CIFAR_TEST_CHOICES
from ella.layers import GROUPED_MODES
from ella.layers.relaxed import COMBINE_MODES
from ella.options import COUNT, OPTIONAL_COUNT, POSITIVE, Range, check_switch, flag, is_option, option
from kfac import CURVATURES, KFAC_APPROXES, check_choice


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and with every checkpoint, and checked on ``--resume``.

    A field made by :func:`~ella.options.option` is also a flag of every training experiment (``lr_min`` is
    ``--lr-min``; see :mod:`ella.options`): adding a training option is adding one field here. ``layer``,
    ``dataset``, ``task`` and ``momentum`` are set by the experiments, not by flags. The fields in
    :data:`EXPERIMENT_FIELDS` choose the dataset and the network (:class:`Trainer`); the others are the options
    of training itself, also those of :func:`ella.learn.learn`.
    """

    layer: str = "ffc_conv"
    dataset: str = "cifar10"
    task: str | None = None
    alpha: int | None = option(None, "network width; 10 when neither a preset nor this flag sets it (2 for "
                                        "ffc_conv_gconv)", COUNT)
    combine: str = option("sqrt", "how a relaxed layer combines its P paths: 'sqrt' (sum / sqrt(P), keeps the "
                                  "activation scale), 'sum' (paper) or 'mean' (reference code)", COMBINE_MODES)
    epochs: int = option(4000, "training epochs", COUNT)
    batch_size: int = option(128, "mini-batch size for parameter updates", COUNT)
    lr: float = option(0.01, "initial learning rate (cosine-annealed per iteration)", Range(float, 0))
    lr_min: float = option(1e-6, "final learning rate of the cosine schedule (at most --lr)", Range(float, 0))
    optimizer: str = option("sgd", "'sgd' (momentum 0.9, reference code) or 'adam' (paper)", ("sgd", "adam"))
    momentum: float = 0.9
    augment: bool = option(True, "no data augmentation for parameter updates")
    laplace: bool = option(False, "learn the prior precisions by the Laplace marginal likelihood (otherwise MAP)")
    burn_in: int = option(10, "first epoch at which the prior precisions are updated", OPTIONAL_COUNT)
    marglik_every: int = option(5, "update the precisions every this many epochs", COUNT)
    hyper_steps: int = option(20, "hyper-steps per KFAC fit: L-BFGS iterations on the log precisions (Adam steps "
                                  "with --marglik-method alternation)", OPTIONAL_COUNT)
    hyper_lr: float = option(0.1, "learning rate of the alternation's Adam steps on the log precisions", Range(float, 0))
    marglik_method: str = option("ray", "precision updates: 'ray' (L-BFGS on the evidence profiled along every F-FC / "
                                        "S-FC path's scaling ray, ella.bilinear_ray; no worse in evidence than the "
                                        "alternation on any experiment measured, docs/results.md) or 'alternation' "
                                        "(the paper's Adam steps at fixed parameters)", MARGLIK_METHODS)
    ray_min_scale: float = option(RAY_MIN_SCALE, "--marglik-method ray: the trust region of a round, the least factor "
                                                 "by which one round may scale an F-FC / S-FC path's output (0: "
                                                 "none)", Range(float, 0, False, 1))
    kfac_batch_size: int | None = option(None, "batch size of the KFAC pass (when not set: 150 on the CPU, 1024 on "
                                                "CUDA; the factors are sums, so only the speed depends on it)", COUNT)
    curvature: str = option("ggn", "KFAC curvature: 'ggn' (exact), 'mc' (Monte-Carlo) or 'ef' (empirical Fisher)",
                            CURVATURES)
    kfac_approx: str = option("expand", "KFAC for weights shared over positions (convolution sites, rotations): "
                                        "'expand' or 'reduce'", KFAC_APPROXES)
    grouped_mode: str = option("per_group", "KFAC for the F-FC / S-FC stages: 'per_group' (exact per-channel "
                                            "blocks) or 'reference' (one shared output factor, as the reference code)",
                               GROUPED_MODES)
    prior_init: float = option(1.0, "initial prior precision of every group", POSITIVE)
    per_tensor_prior: bool = option(False, "one precision per parameter tensor instead of per path")
    report: bool = option(False, "write the effective-parameter report after a MAP run too")
    n_train: int | None = option(None, "use a class-balanced subset of this many training images (all of them "
                                          "when not set)", COUNT)
    n_valid: int | None = option(None, "hold out this many training images for validation (overrides --valid-fraction)",
                                 COUNT)
    valid_fraction: float = option(0.1, "fraction of the training data held out for validation", Range(float, 0, True, 1))
    cifar_test: str = option("auto", "CIFAR-10 test set: 'auto' (the official 10,000 where the data folder has them, "
                                     "else the JPEG copies, else the exact ones there are; a warning says which), "
                                     "'exact' (the bit-exact official images there are: 10,000 in torchvision's "
                                     "layout, 1,000 in cifar10.npz) or 'jpeg10k' (all 10,000 as lossy JPEG copies)",
                             CIFAR_TEST_CHOICES)
    seed: int = option(711, "random seed", Range(int, 0))
    data_dir: str | None = option(None, "folder with the data (default: $ELLA_DATA, then ./data)")
    download: bool = option(False, "let torchvision download MNIST / CIFAR-10 into the data folder when they are not "
                                   "there (needs network access)")
    device: str = option(help="'cpu', 'cuda', 'cuda:1', ... (default: cuda when available)",
                         default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    checkpoint_minutes: float = option(5.0, "write a checkpoint when the last one is older than this many minutes, or "
                                            "than 50 times its own write time (and after the first and the last "
                                            "epoch), so that writing costs about 2% of a run", POSITIVE)
    checkpoint_every: int | None = option(None, "write the checkpoint every this many epochs (and after the last) "
                                                "instead of by --checkpoint-minutes", COUNT)
    process_timeout: float = option(600.0, "data-parallel runs: seconds a process waits for the others (rank 0 "
                                           "evaluating and writing, a slow or frozen process) before it stops with a "
                                           "message", POSITIVE)
    capture: bool = option(True, "on CUDA, run every training step eagerly instead of replaying it as a captured CUDA "
                                 "graph (ella.static_step)")

    def check(self, argument_names: bool = False) -> None:
        """Raise a ValueError naming the first option outside its range (by its flag; by its argument name with
        ``argument_names``, as :func:`ella.learn.learn` takes it) or choices, a switch that is not a bool (by its
        name), or ``--lr-min`` above ``--lr``. Numbers of other types (numpy's, say) and numpy bools become plain
        ``int``, ``float`` and ``bool`` here, so that the run records plain values."""
        name = (lambda item: item.name) if argument_names else flag
        for item in fields(self):
            allowed, value = item.metadata.get("values"), getattr(self, item.name)
            if isinstance(allowed, tuple):
                check_choice(value, allowed, item.name)
            elif isinstance(allowed, Range) and value is not None:
                setattr(self, item.name, allowed.check(value, name(item)))
            elif is_option(item) and isinstance(item.default, bool):  # a switch
                setattr(self, item.name, check_switch(value, item.name))
        if self.lr_min > self.lr:
            names = {item.name: name(item) for item in fields(self)}
            raise ValueError(f"{names['lr_min']} ({self.lr_min:g}) must not be above {names['lr']} ({self.lr:g})")


def option_flags() -> dict[str, str]:
    """Every option field of :class:`TrainConfig` (its name) and its command-line flag."""
    return {item.name: flag(item) for item in fields(TrainConfig) if is_option(item)}


EXPERIMENT_FIELDS = ("layer", "dataset", "task", "alpha", "combine", "augment", "n_train", "n_valid", "valid_fraction",
                     "cifar_test", "data_dir", "download")  # what an experiment trains, not how


def training_record(config: TrainConfig) -> dict:
    """The training options of ``config`` (all fields but :data:`EXPERIMENT_FIELDS`), as a run records them."""
    return {name: value for name, value in asdict(config).items() if name not in EXPERIMENT_FIELDS}
