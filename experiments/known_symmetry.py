"""Known symmetry: does the marginal likelihood switch off the path the data do not need?

A teacher F-FC+CONV layer with only its CONV path on (translation equivariant) or only its F-FC path on (dense,
not expressible by any convolution) generates regression data from Gaussian inputs; a student F-FC+CONV layer
learns its two path precisions, every step exact (L-BFGS MAP, KFAC-Laplace, Adam on the log precisions), by each
--methods entry: the paper's "alternation" (hyper-steps at fixed parameters) and "ray" (hyper-steps on the
evidence profiled along the F-FC path's scaling ray, ella.bilinear_ray). Then, for the path the teacher does not
use, the Laplace evidence is profiled: its precision is set to the value the method reached times exp(k) for
each --profile offset k, and the MAP refitted (offset 0: the honest evidence where the method stopped).

    python experiments/known_symmetry.py
    python experiments/known_symmetry.py --teachers conv --rounds 20 --noise 0.3 --n 1024

Writes <out>/<teacher>/<method>/rounds.{json,csv} (per round: -log p(D)/N, per path the precision, relative
effective parameters, N_eff and share of the layer's output power), <out>/<teacher>/<method>/profile.{json,csv},
<out>/summary.{json,csv} (one row per teacher and method, printed), config.json, and the figure profile.png (both
methods) in figures/<path of --out below runs/>/<teacher>/ (or <out>/<teacher>/figures).
Takes about 30 s on one CPU core. A rerun into an --out whose config.json records the same settings continues the
run, reusing every finished teacher and method; one with other settings is refused (choose another --out).
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ella.bilinear_ray import MARGLIK_METHODS
from ella.cli import (
    add_exact_map_ray_argument, check_method_bound_flags, check_same_settings, figure_dir, method_flag_defaults,
    positive_float, positive_int, run_script, script_settings, setup_logging, write_table,
)
from ella.options import Range
from ella.priors import Prior
from ella.teacher import (
    PATHS,
    Problem,
    evidence_profile,
    learn_precisions,
    plot_profile,
    relaxed_model,
    teacher_data,
)

SHOWN = ("precision", "relative", "output_share")  # columns of the unused path where a method stopped
PROFILE_OFFSET = Range(float, -30, below=30)
"""An offset k of --profile (the precision profiled is the reached one times exp(k)): by |k| = 30 the evidence no
longer changes, and much further the float32 precision overflows or vanishes (the Laplace fit then fails)."""
PROFILE_DEFAULT = [0.0, 1.0, 2.0, 4.0, 8.0]
"""Flags (by their argparse names) that act on one method only: given without it, they are refused."""
UNCOMPARED = ("out", "verbose")  # config.json entries that may differ between the runs of one folder


def summary_row(teacher: str, method: str, unused: str, last: dict, profile: list[dict]) -> dict:
    """One line of the printed comparison: where ``method`` stopped, and the profile of the ``unused`` path."""
    best = min(profile, key=lambda row: row["neg_log_marglik"])
    return {
        "teacher": teacher, "method": method, "unused": unused, "neg_log_marglik": last["neg_log_marglik"],
        "refitted": profile[0]["neg_log_marglik"], **{k: last[f"{k}_{unused}"] for k in SHOWN},
        "profile_best": best["neg_log_marglik"], "profile_best_precision": best[f"precision_{unused}"],
    }


def parse_args() -> argparse.Namespace:
    """The flags, checked (a flag given for a method the run leaves out is refused), and --out checked against them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", choices=PATHS, default=list(PATHS),
                        help="which path the teacher has on ('conv': equivariant data; 'fc': dense data; default: "
                             f"{' '.join(PATHS)})")
    parser.add_argument("--methods", nargs="+", choices=MARGLIK_METHODS, default=list(MARGLIK_METHODS),
                        help="how the precisions are learned: 'alternation' (the paper's) and/or 'ray' (default: "
                             f"{' '.join(MARGLIK_METHODS)})")
    add_exact_map_ray_argument(parser)
    parser.add_argument("--rounds", type=positive_int, default=10,
                        help="MAP + Laplace rounds of each method (default: 10)")
    parser.add_argument("--hyper-steps", type=positive_int, default=50,
                        help="hyper-steps per round: Adam steps (alternation) or L-BFGS iterations (ray) (default: 50)")
    parser.add_argument("--hyper-lr", type=positive_float, default=0.1,
                        help="learning rate of the alternation's Adam steps (default: 0.1)")
    parser.add_argument("--channels", type=positive_int, default=2, help="input and output channels (default: 2)")
    parser.add_argument("--size", type=positive_int, default=6, help="image side (size x size; default: 6)")
    parser.add_argument("--n", type=positive_int, default=256, help="number of examples (default: 256)")
    parser.add_argument("--noise", type=positive_float, default=0.1,
                        help="standard deviation of the target noise (default: 0.1)")
    parser.add_argument("--profile", type=PROFILE_OFFSET, nargs="+", default=PROFILE_DEFAULT,
                        help=f"offsets k, each {PROFILE_OFFSET}: profile the unused path's evidence at (reached "
                             f"precision) x exp(k) (default: {' '.join(f'{k:g}' for k in PROFILE_DEFAULT)})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data (the student starts from seed 0; default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "known_symmetry",
                        help="output folder (default: runs/known_symmetry)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    defaults = method_flag_defaults(parser)
    args = parser.parse_args()
    check_method_bound_flags(parser, args, args.methods, defaults, "--methods")
    check_same_settings(parser, args.out, script_settings(args), UNCOMPARED, "finished results")
    return args












def learn_or_reuse(args: argparse.Namespace, problem: Problem, teacher: str, method: str, x: torch.Tensor,
                   y: torch.Tensor, unused: str) -> tuple[list[dict], list[dict], bool]:
    """``(rounds, profile, reused)`` of one teacher and method: read from ``<out>/<teacher>/<method>`` where an
    earlier run of the same settings finished them (its profile.csv, written last, is there), else learned and
    written there."""
    folder = args.out / teacher / method
    if (folder / "profile.csv").is_file():
        return (json.loads((folder / "rounds.json").read_text()), json.loads((folder / "profile.json").read_text()),
                True)
    model = relaxed_model(problem, seed=0)
    prior = Prior(model)
    with tqdm(total=args.rounds + len(args.profile), desc=f"teacher {teacher}, {method}") as bar:
        rounds = learn_precisions(model, prior, x, y, args.rounds, args.hyper_steps, args.hyper_lr, bar.update,
                                  method=method, min_scale=args.ray_min_scale)
        reached = math.log(rounds[-1][f"precision_{unused}"])
        profile = evidence_profile(model, prior, x, y, unused, [reached + k for k in args.profile], bar.update)
    write_table(rounds, folder, "rounds")
    table = write_table(profile, folder, "profile")
    print(f"\nteacher {teacher}, {method}: evidence profile over the {unused} precision (MAP refitted at each; the "
          f"first row is where the method stopped):\n{table}")
    return rounds, profile, False


def run_teachers(args: argparse.Namespace, problem: Problem) -> list[dict]:
    """Every teacher and method (:func:`learn_or_reuse`) and each teacher's figure; returns the summary rows."""
    summary = []
    for teacher in args.teachers:
        unused = next(p for p in PATHS if p != teacher)
        x, y = teacher_data(problem, teacher, seed=args.seed)
        runs = {}
        for method in args.methods:
            rounds, profile, reused = learn_or_reuse(args, problem, teacher, method, x, y, unused)
            if reused:
                print(f"teacher {teacher}, {method}: reused the finished results in {args.out / teacher / method}")
            runs[method] = (rounds, profile)
            summary.append(summary_row(teacher, method, unused, rounds[-1], profile))
        figure = plot_profile(runs, unused, figure_dir(args.out / teacher) / "profile.png",
                              title=f"teacher: {teacher}")
        print(f"figure: {figure}")
    return summary


def main() -> None:
    args = parse_args()
    setup_logging(args.verbose)
    problem = Problem(channels=args.channels, size=args.size, n=args.n, noise=args.noise)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(script_settings(args), indent=2))
    try:
        summary = run_teachers(args, problem)
    except KeyboardInterrupt:
        print(f"interrupted; the same command continues the run, reusing the results finished in {args.out}",
              file=sys.stderr)
        raise SystemExit(130) from None
    write_table(summary, args.out, "summary")
    print(f"\n{asdict(problem)}, {args.rounds} rounds; -log p(D)/N where each method stopped, after refitting the "
          "MAP there, and the best of the unused path's profile:")
    for row in summary:
        print(f"teacher {row['teacher']:<5} {row['method']:<12} -log p(D)/N {row['neg_log_marglik']:.4f} (refitted "
              f"{row['refitted']:.4f}); unused {row['unused']}: precision {row['precision']:.4g}, relative N_eff "
              f"{row['relative']:.4f}, output share {row['output_share']:.2g}; profile best {row['profile_best']:.4f} "
              f"at precision {row['profile_best_precision']:.3g}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    run_script(main, verbose_flag=True)
