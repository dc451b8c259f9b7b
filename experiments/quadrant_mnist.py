"""Quadrant MNIST toy problem (paper Table 1): FC, CONV and the learned F-FC+CONV on two tasks.

A digit is pasted into one of four quadrants of a 56x56 canvas (resized to 32x32). The "digit" task (10 classes)
is translation invariant; the "digit_quadrant" task (40 classes: digit + 10 * quadrant) is not, so CONV fails it
while FC solves it. The F-FC+CONV network whose path precisions are learned by the marginal likelihood should
match the better of the two on both tasks.

    python experiments/quadrant_mnist.py --preset cpu
    python experiments/quadrant_mnist.py --preset paper --device cuda

Each run goes to <out>/<task>-<layer>-<map|laplace>/ (see experiments/cifar10.py for its files); the table of
all runs is written to <out>/summary.{json,csv} and printed.
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
from dataclasses import replace
from pathlib import Path

from ella.cli import (
    add_training_arguments, check_method_flags, config_from_args, model_runs, refuse_given, run_many, run_script,
    setup_logging, write_table,
)
from ella.models import LAYER_NAMES

PRESETS = {
    # Paper: 999 epochs, no augmentation, width 10.
    "paper": {"epochs": 999, "burn_in": 10, "marglik_every": 5, "augment": False},
    # About 20 minutes on 2 CPU cores for the six runs: batch 64 for more steps per epoch, and 100 hyper-steps
    # per marginal-likelihood round (4 rounds instead of the paper's ~200).
    "cpu": {
        "epochs": 15, "alpha": 2, "n_train": 4000, "n_valid": 1000, "batch_size": 64, "optimizer": "adam",
        "lr": 0.003, "burn_in": 3, "marglik_every": 3, "hyper_steps": 100, "augment": False,
    },
    # One GPU: the paper's width and full MNIST (54,000 training images after the validation split), the paper's
    # marginal-likelihood schedule, with the epochs cut from 999 to what fits in 8 minutes per model (the FC
    # network has 134 M parameters); Adam with a cosine schedule.
    "gpu": {
        "epochs": 40, "optimizer": "adam", "lr": 0.001, "burn_in": 10, "marglik_every": 5, "hyper_steps": 20,
        "augment": False,
    },
}
# (layer, learned by the marginal likelihood?) — the paper's MAP baselines and the learned model.
DEFAULT_RUNS = ("fc:map", "conv:map", "ffc_conv:laplace")
PAPER_ACCURACY = {  # paper Table 1, test accuracy (%), digit / digit+quadrant
    ("fc", "map"): (95.73, 95.10), ("conv", "map"): (99.38, 24.68),
    ("fc", "laplace"): (97.04, 95.46), ("conv", "laplace"): (99.23, 24.50), ("ffc_conv", "laplace"): (98.86, 99.00),
}
TASKS = ("digit", "digit_quadrant")
DEFAULT_ROOT = "runs/quadrant_mnist/{preset}"  # --out when not given


def make_runs(base, entries=DEFAULT_RUNS, tasks=TASKS) -> dict:
    """Every ``LAYER:map`` / ``LAYER:laplace`` entry on every task, named ``<task>-<layer>-<mode>``."""
    runs = {}
    for task in tasks:
        runs.update(model_runs(replace(base, task=task), entries, prefix=f"{task}-"))
    return runs


def paper_accuracy(config: dict) -> float | None:
    """The paper's test accuracy of a run's model on its task, if it reports one."""
    paper = PAPER_ACCURACY.get((config["layer"], "laplace" if config["laplace"] else "map"))
    return None if paper is None else paper[TASKS.index(config["task"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="LAYER:map or LAYER:laplace entries (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which tasks to run")
    add_training_arguments(parser, PRESETS, out_default=DEFAULT_ROOT.format(preset="<preset>"))
    args = parser.parse_args()
    setup_logging(args.verbose)
    base = config_from_args(args, PRESETS, dataset="quadrant_mnist")
    root = args.out or Path(DEFAULT_ROOT.format(preset=args.preset))

    for entry in args.runs:  # all of them before the first run trains
        layer, _, mode = entry.partition(":")
        if mode not in ("map", "laplace"):
            parser.error(f"--runs entries look like 'conv:map' or 'ffc_conv:laplace', got {entry!r}")
        if layer not in LAYER_NAMES:
            parser.error(f"--runs {entry}: unknown layer {layer!r}; the layers are {', '.join(LAYER_NAMES)}")
    refuse_given(parser, args, {"laplace": "each --runs entry chooses MAP or Laplace (LAYER:map, LAYER:laplace)"})
    check_method_flags(parser, args, base, laplace=any(entry.endswith(":laplace") for entry in args.runs))
    results = run_many(make_runs(base, args.runs, args.tasks), root, args.resume)

    rows = []
    for final in results.values():
        config = final["config"]
        rows.append({
            "task": config["task"], "layer": config["layer"], "mode": "laplace" if config["laplace"] else "map",
            "params": final["n_params"], "test_acc": final["test"]["acc"], "test_nll": final["test"]["nll"],
            "neg_log_marglik": final["neg_log_marglik"], "paper_acc": paper_accuracy(config),
            "effective_types": " ".join(final.get("effective_layer_types", {}).values()) or None,
        })
    print(write_table(rows, root))
    print(f"results in {root}")


if __name__ == "__main__":
    run_script(main, verbose_flag=True)
