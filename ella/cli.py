"""Command-line plumbing shared by the training experiments: flags, presets, output folders, logging.

A preset fills the :class:`~ella.train.TrainConfig`; any flag given explicitly overrides it. Every experiment
also runs data-parallel under ``torchrun --nproc_per_node=N experiments/<name>.py ...`` (see
:mod:`ella.distributed`); then only rank 0 prints and logs below warnings.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ella import distributed
from ella.bilinear_ray import MARGLIK_METHODS
from ella.data import CIFAR_TEST_CHOICES
from ella.layers.relaxed import COMBINE_MODES
from ella.marglik import MarglikError
from ella.train import TrainConfig
from kfac.decomposition import CurvatureError
from kfac.rules import GROUPED_MODES, KFAC_APPROXES
from kfac.sqrt_hessian import CURVATURES

# flag name -> (type, help). Defaults are None so that "not given" can be told apart from a preset value.
_OVERRIDES: dict[str, tuple[type, str]] = {
    "alpha": (int, "network width (default: 10; 2 for ffc_conv_gconv)"),
    "combine": (str, "how a relaxed layer combines its P paths: 'sqrt' (sum / sqrt(P), keeps the activation scale; default), 'sum' (paper) or 'mean' (reference code)"),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "mini-batch size for parameter updates"),
    "lr": (float, "initial learning rate (cosine-annealed per iteration)"),
    "lr_min": (float, "final learning rate of the cosine schedule"),
    "optimizer": (str, "'sgd' (momentum 0.9, reference code) or 'adam' (paper)"),
    "burn_in": (int, "first epoch at which the prior precisions are updated"),
    "marglik_every": (int, "update the precisions every this many epochs"),
    "hyper_steps": (int, "Adam steps (L-BFGS iterations with --marglik-method ray) on the log precisions per KFAC fit"),
    "hyper_lr": (float, "learning rate of the precision updates"),
    "marglik_method": (str, "precision updates: 'alternation' (the paper's Adam steps at fixed parameters; default) or 'ray' (L-BFGS on the evidence profiled along every F-FC / S-FC path's scaling ray; ella.bilinear_ray)"),
    "kfac_batch_size": (int, "batch size of the KFAC pass"),
    "curvature": (str, "KFAC curvature: 'ggn' (exact), 'mc' (Monte-Carlo) or 'ef' (empirical Fisher)"),
    "kfac_approx": (str, "KFAC for weights shared over positions (convolution sites, rotations): 'expand' (default) or 'reduce'"),
    "grouped_mode": (str, "KFAC for the F-FC / S-FC stages: 'per_group' (exact per-channel blocks; default) or 'reference' (one shared output factor, as the reference code)"),
    "prior_init": (float, "initial prior precision of every group"),
    "n_train": (int, "use a class-balanced subset of this many training images"),
    "cifar_test": (str, "CIFAR-10 test set: 'exact' (the 1,000 bit-exact official images) or 'jpeg10k' (all 10,000, lossy JPEG)"),
    "n_valid": (int, "hold out this many training images for validation (overrides --valid-fraction)"),
    "valid_fraction": (float, "fraction of the training data held out for validation"),
    "seed": (int, "random seed"),
}

# flags whose values come from a fixed list (argparse rejects anything else with the list)
_CHOICES: dict[str, tuple[str, ...]] = {
    "combine": COMBINE_MODES, "optimizer": ("sgd", "adam"), "curvature": CURVATURES, "cifar_test": CIFAR_TEST_CHOICES,
    "kfac_approx": KFAC_APPROXES, "grouped_mode": GROUPED_MODES, "marglik_method": MARGLIK_METHODS,
}


def positive_int(text: str) -> int:
    """argparse ``type`` for counts and sizes: an integer >= 1 (argparse reports anything else with the flag)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type`` for scales and rates: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """Add the flags every training experiment shares."""
    parser.add_argument("--laplace", action="store_true", help="learn the prior precisions by the Laplace marginal likelihood (otherwise MAP)")
    parser.add_argument("--preset", choices=sorted(presets), default="cpu", help="a named configuration; explicit flags override it")
    for name, (kind, text) in _OVERRIDES.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text, choices=_CHOICES.get(name)
        )
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no data augmentation for parameter updates")
    parser.add_argument("--per-tensor-prior", action="store_true", default=None, help="one precision per parameter tensor instead of per path")
    parser.add_argument("--report", action="store_true", default=None, help="write the effective-parameter report after a MAP run too")
    parser.add_argument("--data-dir", default=None, help="folder with the data (default: $ELLA_DATA, then ./data)")
    parser.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:1', ... (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<experiment>/<layer>-<map|laplace>-<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")


def config_from_args(args: argparse.Namespace, presets: dict[str, dict], **fixed) -> TrainConfig:
    """Preset values, then explicit flags, then ``fixed`` (the experiment's own choices such as the dataset)."""
    values = dict(presets[args.preset])
    names = {f.name for f in fields(TrainConfig)}
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    values["laplace"] = args.laplace
    values.update(fixed)
    if values.get("device") is None:
        values.pop("device", None)
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def default_out_dir(experiment: str, config: TrainConfig, preset: str) -> Path:
    mode = "laplace" if config.laplace else "map"
    task = f"-{config.task}" if config.task else ""
    return Path("runs") / experiment / f"{config.dataset}{task}-{config.layer}-{mode}-{preset}"


def figure_dir(out: Path) -> Path:
    """Where a run's figures go: ``figures/<path below runs/>`` for runs under ``runs/``, else ``<out>/figures``."""
    if out.parts and out.parts[0] == "runs":
        return Path("figures", *out.parts[1:])
    return out / "figures"


def run_script(main: Callable[[], None]) -> None:
    """Run an experiment's ``main``, then :func:`ella.distributed.finish` (a no-op in a single process); a user
    error (bad option, missing data, an output folder that already holds a run without ``--resume``, a training
    loss that diverged, a marginal likelihood or a curvature that cannot be computed) ends with its message and
    exit status 2 instead of a traceback (``-v`` / ``--verbose`` shows the traceback too)."""
    try:
        main()
        distributed.finish()
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, MarglikError, CurvatureError) as error:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        print(f"error: {error}\n(run with -v for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(verbose: bool) -> None:
    """Log to stderr; in a multi-process launch, ranks other than 0 print nothing and log warnings only."""
    rank = distributed.env_rank()
    if rank == 0:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        return
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    sys.stdout = open(os.devnull, "w")  # the experiment's summary is printed once, by rank 0


def run_many(runs: dict[str, TrainConfig], root: Path, resume: bool) -> dict[str, dict]:
    """Train every named configuration into ``root/<name>`` (skipping finished ones on ``resume``)."""
    from ella.train import train

    results = {}
    for name, config in runs.items():
        out = root / name
        final_path = out / "final.json"
        distributed.setup(config.device)  # so that rank 0 alone decides what is finished
        if resume and distributed.on_main(final_path.exists):
            results[name] = distributed.on_main(lambda: json.loads(final_path.read_text()))
            continue
        if distributed.is_main():
            logging.getLogger(__name__).warning("run %s -> %s", name, out)
        results[name] = train(config, out, resume=resume, figure_dir=figure_dir(out))
    return results


def write_table(rows: list[dict], root: Path, stem: str = "summary") -> str:
    """Write ``rows`` as ``<stem>.json`` and ``<stem>.csv`` into ``root`` (rank 0 only); return a Markdown table."""
    if distributed.is_main():
        _write_rows(rows, root, stem)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _write_rows(rows: list[dict], root: Path, stem: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return "" if value is None else str(value)
