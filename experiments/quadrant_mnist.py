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

import argparse
from dataclasses import replace
from pathlib import Path

from ella.cli import add_training_arguments, config_from_args, run_many, run_script, setup_logging, write_table

PRESETS = {
    # Paper: 999 epochs, no augmentation, width 10.
    "paper": {"epochs": 999, "burn_in": 10, "marglik_every": 5, "augment": False},
    # About 20 minutes on 2 CPU cores for the six runs: batch 64 for more steps per epoch, and 100 hyper-steps
    # per marginal-likelihood round (4 rounds instead of the paper's ~200).
    "cpu": {
        "epochs": 15, "alpha": 2, "n_train": 4000, "n_valid": 1000, "batch_size": 64, "optimizer": "adam",
        "lr": 0.003, "burn_in": 3, "marglik_every": 3, "hyper_steps": 100, "augment": False,
    },
}
# (layer, learned by the marginal likelihood?) — the paper's MAP baselines and the learned model.
DEFAULT_RUNS = ("fc:map", "conv:map", "ffc_conv:laplace")
PAPER_ACCURACY = {  # paper Table 1, test accuracy (%), digit / digit+quadrant
    ("fc", "map"): (95.73, 95.10), ("conv", "map"): (99.38, 24.68),
    ("fc", "laplace"): (97.04, 95.46), ("conv", "laplace"): (99.23, 24.50), ("ffc_conv", "laplace"): (98.86, 99.00),
}
TASKS = ("digit", "digit_quadrant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="LAYER:map or LAYER:laplace entries (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which tasks to run")
    add_training_arguments(parser, PRESETS)
    args = parser.parse_args()
    setup_logging(args.verbose)
    base = config_from_args(args, PRESETS, dataset="quadrant_mnist")
    root = args.out or Path("runs") / "quadrant_mnist" / args.preset

    runs = {}
    for task in args.tasks:
        for entry in args.runs:
            layer, _, mode = entry.partition(":")
            if mode not in ("map", "laplace"):
                parser.error(f"--runs entries look like 'conv:map' or 'ffc_conv:laplace', got {entry!r}")
            runs[f"{task}-{layer}-{mode}"] = replace(base, layer=layer, task=task, laplace=mode == "laplace")
    results = run_many(runs, root, args.resume)

    rows = []
    for name, final in results.items():
        config = final["config"]
        mode = "laplace" if config["laplace"] else "map"
        paper = PAPER_ACCURACY.get((config["layer"], mode))
        rows.append({
            "task": config["task"], "layer": config["layer"], "mode": mode, "params": final["n_params"],
            "test_acc": final["test"]["acc"], "test_nll": final["test"]["nll"],
            "neg_log_marglik": final["neg_log_marglik"],
            "paper_acc": paper[TASKS.index(config["task"])] if paper else None,
            "effective_types": " ".join(final.get("effective_layer_types", {}).values()) or None,
        })
    print(write_table(rows, root))
    print(f"results in {root}")


if __name__ == "__main__":
    run_script(main)
