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
Takes about 30 s on one CPU core.
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ella.bilinear_ray import MARGLIK_METHODS
from ella.cli import (
    add_exact_map_ray_argument, figure_dir, positive_float, positive_int, run_script, setup_logging, write_table,
)
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


def summary_row(teacher: str, method: str, unused: str, last: dict, profile: list[dict]) -> dict:
    """One line of the printed comparison: where ``method`` stopped, and the profile of the ``unused`` path."""
    best = min(profile, key=lambda row: row["neg_log_marglik"])
    return {
        "teacher": teacher, "method": method, "unused": unused, "neg_log_marglik": last["neg_log_marglik"],
        "refitted": profile[0]["neg_log_marglik"], **{k: last[f"{k}_{unused}"] for k in SHOWN},
        "profile_best": best["neg_log_marglik"], "profile_best_precision": best[f"precision_{unused}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", choices=PATHS, default=list(PATHS),
                        help="which path the teacher has on ('conv': equivariant data; 'fc': dense data)")
    parser.add_argument("--methods", nargs="+", choices=MARGLIK_METHODS, default=list(MARGLIK_METHODS),
                        help="how the precisions are learned: 'alternation' (the paper's) and/or 'ray'")
    add_exact_map_ray_argument(parser)
    parser.add_argument("--rounds", type=positive_int, default=10, help="MAP + Laplace rounds of each method")
    parser.add_argument("--hyper-steps", type=positive_int, default=50, help="hyper-steps per round: Adam steps (alternation) or L-BFGS iterations (ray)")
    parser.add_argument("--hyper-lr", type=positive_float, default=0.1, help="learning rate of the alternation's Adam steps")
    parser.add_argument("--channels", type=positive_int, default=2, help="input and output channels")
    parser.add_argument("--size", type=positive_int, default=6, help="image side (size x size)")
    parser.add_argument("--n", type=positive_int, default=256, help="number of examples")
    parser.add_argument("--noise", type=positive_float, default=0.1, help="standard deviation of the target noise")
    parser.add_argument("--profile", type=float, nargs="*", default=[0.0, 1.0, 2.0, 4.0, 8.0],
                        help="offsets k: profile the unused path's evidence at (reached precision) x exp(k)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (the student starts from seed 0)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "known_symmetry", help="output folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    args = parser.parse_args()
    setup_logging(args.verbose)
    problem = Problem(channels=args.channels, size=args.size, n=args.n, noise=args.noise)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps({**vars(args), "out": str(args.out)}, indent=2))
    summary = []
    for teacher in args.teachers:
        unused = next(p for p in PATHS if p != teacher)
        x, y = teacher_data(problem, teacher, seed=args.seed)
        runs = {}
        for method in args.methods:
            model = relaxed_model(problem, seed=0)
            prior = Prior(model)
            with tqdm(total=args.rounds + len(args.profile), desc=f"teacher {teacher}, {method}") as bar:
                rounds = learn_precisions(model, prior, x, y, args.rounds, args.hyper_steps, args.hyper_lr,
                                          bar.update, method=method, min_scale=args.ray_min_scale)
                reached = math.log(rounds[-1][f"precision_{unused}"])
                profile = evidence_profile(model, prior, x, y, unused, [reached + k for k in args.profile],
                                           bar.update)
            folder = args.out / teacher / method
            write_table(rounds, folder, "rounds")
            table = write_table(profile, folder, "profile")
            runs[method] = (rounds, profile)
            summary.append(summary_row(teacher, method, unused, rounds[-1], profile))
            print(f"\nteacher {teacher}, {method}: evidence profile over the {unused} precision (MAP refitted at "
                  f"each; the first row is where the method stopped):\n{table}")
        figure = plot_profile(runs, unused, figure_dir(args.out / teacher) / "profile.png",
                              title=f"teacher: {teacher}")
        print(f"figure: {figure}")
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
    run_script(main)
