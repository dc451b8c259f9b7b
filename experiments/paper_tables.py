"""Run one experiment's set of models back to back under one preset and write one results table.

    python experiments/paper_tables.py cifar10 --preset cpu
    python experiments/paper_tables.py quadrant_mnist --preset gpu --seeds 711 1 2
    python experiments/paper_tables.py multigroup --preset gpu --device cuda

The sets are the paper's: CIFAR-10 (Table 2) CONV, F-FC and FC+CONV by MAP and the learned F-FC+CONV;
quadrant MNIST (Table 1) FC and CONV by MAP and the learned F-FC+CONV on both tasks; multi-group (Table 3) the
learned F-FC+CONV+GCONV on five data sets. The preset comes from the experiment's script (``paper_tables.py
<experiment> --help`` lists them and the training flags); the default is ``gpu`` where CUDA is available, else
``cpu``, and every training flag overrides it. Each run goes to ``<out>/<run>-s<seed>/`` (``--out`` default
``runs/tables/<experiment>-<preset>``), and the table to
``<out>/table.{json,csv}``, printed as Markdown: test accuracy and NLL, ``-log p(D)/N``, the paper's accuracy,
wall minutes, and for learned models each path kind's relative effective parameters (``rel``) and share of the
layer's output power (``out``) in blocks 0, 1, ... (head layers left out), drawn in ``block_shares.png`` in the
figure folder (``figures/tables/<experiment>-<preset>/``). ``--resume`` skips finished runs and continues an
interrupted one.
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ella import distributed
from ella.cli import (
    add_training_arguments, check_method_flags, config_from_args, figure_dir, refuse_given, run_many, run_script,
    setup_logging, write_table,
)
from ella.curves import plot_block_shares
from ella.options import Range

EXPERIMENTS = ("cifar10", "quadrant_mnist", "multigroup")
DEFAULT_ROOT = "runs/tables/{experiment}-{preset}"  # --out when not given
FIXED = {  # what each experiment's script fixes itself (the run set then chooses layers, tasks, data sets)
    "cifar10": {"dataset": "cifar10"},
    "quadrant_mnist": {"dataset": "quadrant_mnist"},
    "multigroup": {"layer": "ffc_conv_gconv", "dataset": "cifar10"},
}


def experiment_module(name: str):
    """The experiment's script as a module (its ``PRESETS``, ``make_runs`` and ``paper_accuracy``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(name)


def block_shares(run_dir: Path) -> dict[str, str]:
    """Per path kind, the relative effective parameters and output shares of the relaxed blocks in order."""
    report = run_dir / "effective_parameters.json"
    if not report.exists():
        return {}
    rows = [r for r in json.loads(report.read_text())["paths"] if r["path"] is not None]
    shares: dict[str, str] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        shares[f"rel {kind}"] = " ".join(f"{r['relative']:.2f}" for r in mine)
        if all(r["output_share"] is not None for r in mine):
            shares[f"out {kind}"] = " ".join(f"{r['output_share']:.2f}" for r in mine)
    return shares


def draw_block_shares(names, root: Path) -> Path | None:
    """The table's per-block shares (:func:`ella.curves.plot_block_shares`) of the runs ``names`` in ``root``, into
    ``block_shares.png`` in ``root``'s figure folder."""
    reports = {name: json.loads(path.read_text())["paths"] for name in names
               if (path := root / name / "effective_parameters.json").exists()}
    return plot_block_shares(reports, figure_dir(root) / "block_shares.png")


def table_row(name: str, final: dict, run_dir: Path, module) -> dict:
    config = final["config"]
    return {
        "run": name, "params": final["n_params"], "test_acc": final["test"]["acc"], "test_nll": final["test"]["nll"],
        "neg_log_marglik": final["neg_log_marglik"], "paper_acc": module.paper_accuracy(config),
        "minutes": final.get("seconds", 0.0) / 60, **block_shares(run_dir),
    }


def default_preset() -> str:
    """The preset that fits this machine: ``gpu`` where CUDA is available, else ``cpu``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def make_parser(experiment: str | None) -> argparse.ArgumentParser:
    """The flags of ``paper_tables.py <experiment>``: the experiment's training flags and presets; without an
    experiment only the experiment itself (its training flags and defaults differ from one to the next)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which paper table to run")
    parser.add_argument("--seeds", nargs="+", type=Range(int, 0), default=[711],
                        help="seeds to run every model with (default: 711)")
    parser.add_argument("--only", nargs="+", metavar="RUN", default=None,
                        help="run only these members of the set (names as in the table without the seed, e.g. "
                             "conv-map ffc_conv-laplace; default: all)")
    if experiment is None:
        parser.epilog = ("The presets and training flags are the experiment's: paper_tables.py EXPERIMENT --help "
                         "lists them.")
        return parser
    preset = default_preset()
    add_training_arguments(parser, experiment_module(experiment).PRESETS, default_preset=preset,
                           out_default=DEFAULT_ROOT.format(experiment=experiment, preset="<preset>"))
    return parser


def main() -> None:
    experiment = next((word for word in sys.argv[1:] if word in EXPERIMENTS), None)
    parser = make_parser(experiment)
    if experiment is None:
        if {"-h", "--help"} & set(sys.argv[1:]):
            parser.parse_args(["--help"])
        parser.error(f"name the experiment to run (one of {', '.join(EXPERIMENTS)}), e.g. paper_tables.py cifar10 "
                     f"{' '.join(sys.argv[1:])}".rstrip())
    module = experiment_module(experiment)
    args = parser.parse_args()
    setup_logging(args.verbose)
    base = config_from_args(args, module.PRESETS, **FIXED[args.experiment])
    root = args.out or Path(DEFAULT_ROOT.format(experiment=args.experiment, preset=args.preset))
    members = module.make_runs(base, **(module.run_options(args) if hasattr(module, "run_options") else {}))
    unknown = sorted(set(args.only or ()) - set(members))
    if unknown:
        parser.error(f"--only: {', '.join(unknown)} not in the {args.experiment} set ({', '.join(members)})")
    chosen = {name: config for name, config in members.items() if args.only is None or name in args.only}
    refuse_given(parser, args, {"laplace": "each member of the set is a MAP or a Laplace run (its name says which)",
                                "seed": "--seeds names the seeds to run every member with"})
    check_method_flags(parser, args, base, laplace=any(config.laplace for config in chosen.values()))
    runs = {f"{name}-s{seed}": replace(config, seed=seed) for seed in args.seeds for name, config in chosen.items()}
    results = run_many(runs, root, args.resume)
    rows = [table_row(name, final, root / name, module) for name, final in results.items()]
    print(write_table(rows, root, stem="table"))
    figure = draw_block_shares(results, root) if distributed.is_main() else None
    print(f"results in {root}" + (f", per-block shares in {figure}" if figure else ""))


if __name__ == "__main__":
    run_script(main, verbose_flag=True)
