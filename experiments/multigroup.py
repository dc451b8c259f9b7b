"""Multiple symmetry groups (paper Table 3): F-FC+CONV+GCONV learned by the marginal likelihood on five datasets.

Every block offers a dense F-FC path, a translation-equivariant CONV path and a p4 (translation and 90-degree
rotation) GCONV path. The learned relative effective parameters say which symmetry each dataset asks for.

    python experiments/multigroup.py --preset cpu --laplace
    python experiments/multigroup.py --preset paper --laplace --datasets cifar10 rotated_cifar10 --device cuda

Without --laplace the runs are MAP (no precisions learned; the table then has no paper accuracies beside them).
Under --preset paper the CIFAR variants train 4x the preset's epochs (4,000), as the paper does; an explicit
--epochs is taken as given for every data set.

Each run goes to <out>/<dataset>-<map|laplace>/; the table (test NLL/accuracy, -log marglik / N, and the relative
effective parameters of each path type as mean (min-max) over the 8 blocks, in %) goes to <out>/summary.{json,csv}.
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
from dataclasses import replace
from pathlib import Path

from ella.cli import (
    add_training_arguments, check_method_flags, config_from_args, run_many, run_script, setup_logging, write_table,
)

PRESETS = {
    # Paper: width 2 (the reduced multi-group width); MNIST 1000 epochs, CIFAR 4000 with augmentation.
    "paper": {"epochs": 1000, "burn_in": 10, "marglik_every": 5},
    "cpu": {
        "epochs": 10, "n_train": 2000, "n_valid": 500, "optimizer": "adam", "lr": 0.003, "burn_in": 4,
        "marglik_every": 3,
    },
    # One GPU: the paper's reduced width 2 and full data sets, the paper's marginal-likelihood schedule, with the
    # epochs cut to what fits in 8 minutes per data set (CIFAR variants get the same epochs here, not 4x).
    "gpu": {
        "epochs": 60, "optimizer": "adam", "lr": 0.002, "burn_in": 10, "marglik_every": 5, "hyper_steps": 20,
    },
}
DATASETS = ("mnist", "translated_mnist", "rotated_mnist", "cifar10", "rotated_cifar10")
PAPER = {  # Table 3: Laplace test accuracy and relative N_eff of FC / CONV / GCONV (%, mean over layers)
    "mnist": (99.21, "10 / 15 / 75"), "translated_mnist": (98.27, "0 / 23 / 77"),
    "rotated_mnist": (95.55, "8 / 8 / 83"), "cifar10": (80.94, "0 / 44 / 56"), "rotated_cifar10": (55.68, "4 / 14 / 82"),
}
KINDS = ("F-FC", "CONV", "GCONV")


def make_runs(base, datasets=DATASETS, cifar_epochs: int = 1) -> dict:
    """One F-FC+CONV+GCONV run per data set, named ``<dataset>-<map|laplace>``: CIFAR variants augmented and
    trained ``cifar_epochs`` times as long (4 in the paper preset, as the paper does)."""
    mode = "laplace" if base.laplace else "map"
    return {
        f"{dataset}-{mode}": replace(base, layer="ffc_conv_gconv", dataset=dataset, augment=base.augment and "cifar" in dataset,
                                     epochs=base.epochs * (cifar_epochs if "cifar" in dataset else 1))
        for dataset in datasets
    }


def paper_accuracy(config: dict) -> float | None:
    """The paper's Laplace test accuracy on a run's data set (``None`` for a MAP run: the paper has none)."""
    return PAPER[config["dataset"]][0] if config["laplace"] else None


def run_options(args: argparse.Namespace) -> dict:
    """:func:`make_runs`' options from the flags: CIFAR variants train 4x the epochs under ``--preset paper``
    unless ``--epochs`` is given."""
    return {"cifar_epochs": 4 if args.preset == "paper" and args.epochs is None else 1}


def relative_summary(final_dir: Path) -> dict[str, str]:
    """Mean (min-max) over blocks of each path kind's relative effective parameters, in %."""
    import json

    report = final_dir / "effective_parameters.json"
    if not report.exists():
        return {}
    rows = [r for r in json.loads(report.read_text())["paths"] if r["path"] is not None]
    summary = {}
    for kind in KINDS:
        values = [100 * r["relative"] for r in rows if r["kind"] == kind]
        if values:
            summary[f"rel_{kind}"] = f"{sum(values) / len(values):.0f} ({min(values):.0f}-{max(values):.0f})"
    return summary


DEFAULT_ROOT = "runs/multigroup/{preset}"  # --out when not given


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="datasets to run")
    add_training_arguments(parser, PRESETS, out_default=DEFAULT_ROOT.format(preset="<preset>"))
    args = parser.parse_args()
    setup_logging(args.verbose)
    base = config_from_args(args, PRESETS, layer="ffc_conv_gconv", dataset="cifar10")
    check_method_flags(parser, args, base)
    root = args.out or Path(DEFAULT_ROOT.format(preset=args.preset))
    mode = "laplace" if base.laplace else "map"
    results = run_many(make_runs(base, args.datasets, **run_options(args)), root, args.resume)
    rows = []
    for name, final in results.items():
        dataset = final["config"]["dataset"]
        rows.append({
            "dataset": dataset, "mode": mode, "params": final["n_params"], "test_nll": final["test"]["nll"],
            "test_acc": final["test"]["acc"], "neg_log_marglik": final["neg_log_marglik"],
            **relative_summary(root / name), "paper_acc": PAPER[dataset][0], "paper_rel_FC/CONV/GCONV": PAPER[dataset][1],
        })
    print(write_table(rows, root))
    print(f"results in {root}")


if __name__ == "__main__":
    run_script(main, verbose_flag=True)
