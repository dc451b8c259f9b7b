"""Known symmetry: does the marginal likelihood switch off the path the data do not need?

A teacher F-FC+CONV layer with only its CONV path on (translation equivariant) or only its F-FC path on (dense,
not expressible by any convolution) generates regression data from Gaussian inputs; a student F-FC+CONV layer
learns its two path precisions by the method's alternation, every step exact (L-BFGS MAP, KFAC-Laplace, Adam on
the log precisions). Then, for the path the teacher does not use, the Laplace evidence is profiled: its precision
is set to the value the alternation reached times exp(k) for each --profile offset k, and the MAP refitted.

    python experiments/known_symmetry.py
    python experiments/known_symmetry.py --teachers conv --rounds 20 --noise 0.3 --n 1024

Writes <out>/<teacher>/rounds.{json,csv} (per round: -log p(D)/N, per path the precision, relative effective
parameters, N_eff and share of the layer's output power), <out>/<teacher>/profile.{json,csv}, config.json, and
the figure profile.png in figures/<path of --out below runs/>/<teacher>/ (or <out>/<teacher>/figures).
Takes about 20 s on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ella.cli import figure_dir, positive_float, positive_int, run_script, setup_logging, write_table
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

SHOWN = ("precision_fc", "precision_conv", "relative_fc", "relative_conv", "output_share_fc", "output_share_conv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", choices=PATHS, default=list(PATHS),
                        help="which path the teacher has on ('conv': equivariant data; 'fc': dense data)")
    parser.add_argument("--rounds", type=positive_int, default=10, help="MAP + Laplace rounds of the alternation")
    parser.add_argument("--hyper-steps", type=positive_int, default=50, help="Adam steps on the log precisions per round")
    parser.add_argument("--hyper-lr", type=positive_float, default=0.1, help="learning rate of those steps")
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
    for teacher in args.teachers:
        unused = next(p for p in PATHS if p != teacher)
        x, y = teacher_data(problem, teacher, seed=args.seed)
        model = relaxed_model(problem, seed=0)
        prior = Prior(model)
        with tqdm(total=args.rounds + len(args.profile), desc=f"teacher {teacher}") as bar:
            rounds = learn_precisions(model, prior, x, y, args.rounds, args.hyper_steps, args.hyper_lr, bar.update)
            reached = math.log(rounds[-1][f"precision_{unused}"])
            profile = evidence_profile(model, prior, x, y, unused, [reached + k for k in args.profile], bar.update)
        folder = args.out / teacher
        write_table(rounds, folder, "rounds")
        table = write_table(profile, folder, "profile")
        figure = plot_profile(rounds, profile, unused, figure_dir(folder) / "profile.png", title=f"teacher: {teacher}")
        last = rounds[-1]
        print(f"\nteacher {teacher} ({asdict(problem)}), after {args.rounds} rounds: -log p(D)/N "
              f"{last['neg_log_marglik']:.4f}, " + ", ".join(f"{k} {last[k]:.4g}" for k in SHOWN))
        print(f"evidence profile over the {unused} precision (MAP refitted at each):")
        print(table)
        print(f"figure: {figure}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    run_script(main)
