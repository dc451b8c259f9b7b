"""MSR-FC against marginal-likelihood layer selection on MSR's synthetic translation tasks.

Same tasks for every method (ella.msr.TranslationProblem, rank k in {1, 2, 5}, paper Table 5 task counts,
small-data regime by default: 2/2/4 examples per meta-training task, 1 support + 19 query examples per
meta-test task). Methods:

- marglik: a linear FC+CONV relaxed layer (FC = Linear(70, 68), CONV = valid width-3 conv) whose two path
  precisions are learned by maximising the KFAC-Laplace marginal likelihood summed over the meta-training
  tasks (per-task closed-form MAP, KFAC per task, Adam on log precisions; see ella.msr.compare). Meta-test:
  MAP on the support example under the learned precisions. Observation noise variance fixed (--noise-var).
- map: the same layer with both precisions fixed at 1 (no meta-learning): what learning the precisions buys.
- msr_fc: MSR-FC exactly as experiments/msr_synthetic.py runs it (paper settings: dense U (4760 x 70),
  3/9 inner SGD steps at train/test, inner lr init 0.02 learned, outer Adam 5e-4, meta-batch 32).

Columns: meta-test query MSE with the half-width of a 95% t-interval over test tasks; closeness to
convolution: for marglik/map the relative effective parameters of the FC path (ella.report definition,
averaged over meta-training tasks; 0 = pure CONV), for MSR the relative residual of U outside the span of
the Prop. 1 conv matrix and the mean squared principal-angle sine (coverage gap; 0 = U can express every
conv); the "generator" row gives the residual of the true task-weight subspace (the ideal U, 0 for k = 1).
Parameter counts are shared (meta-learned) + per task; wall time covers meta-training and meta-test.

Writes config.json, results.json and results.csv under --out (default runs/compare_msr/<preset>-<hash of the
flags>). Every row is saved as it finishes: an interrupted run loses at most the row in progress, and the same
command with --resume computes only the rows still missing (see ella.msr.output).

Examples:
    OMP_NUM_THREADS=1 python experiments/compare_msr.py --preset cpu
    OMP_NUM_THREADS=1 python experiments/compare_msr.py --preset paper --ks 1 --methods marglik msr_fc
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from ella.cli import (
    check_same_settings,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run_script,
    script_settings,
    setup_logging,
)
from ella.msr import MetaConfig, MetaLearner, MSRFC, TranslationProblem, conv_symmetry_matrix, mean_confidence_interval
from ella.msr.compare import (
    FCConvModel,
    MarglikConfig,
    conv_coverage_gap,
    conv_residual,
    generator_symmetry_matrix,
    learn_precisions,
    query_mse,
)
from ella.msr.output import HOW, Job, add_output_arguments, default_out, run_rows
from ella.priors import Prior

METHODS = ("marglik", "map", "msr_fc")
LABELS = {"marglik": "FC+CONV marglik", "map": "FC+CONV MAP d=1", "msr_fc": "MSR-FC", "generator": "generator U"}
# Paper Table 5: (train tasks, test tasks, examples per train task small, large).
TASKS = {1: (400, 100, 2, 20), 2: (800, 200, 2, 20), 5: (800, 200, 4, 20)}
PUBLISHED_MSR_FC = {("small", 1): .07, ("small", 2): .07, ("small", 5): .16,
                    ("large", 1): .00, ("large", 2): .05, ("large", 5): .09}
PRESETS = {
    # paper: MSR App. D.1 settings; marglik: 20 rounds x 20 Adam steps on log precisions
    "paper": dict(outer_steps=1000, rounds=20, hyper_steps=20),
    # cpu: ~8 min on 2 busy cores; fewer marglik rounds (MSR-FC keeps the paper's 1000 outer steps)
    "cpu": dict(outer_steps=1000, rounds=10, hyper_steps=20),
}
IN_FEATURES, KERNEL = 70, 3


# Defaults of the flags that apply to some methods only: None in the parser, so that a flag given explicitly is
# told apart and refused where no method run uses it (check_effect)
DEFAULTS = dict(noise_var=0.01, hyper_lr=0.1, meta_batch=32)
MARGLIK_FLAGS = ("rounds", "hyper_steps", "hyper_lr")  # used by marglik only (map keeps its precisions at 1)
MSR_FLAGS = ("outer_steps", "meta_batch", "latent_size")  # used by msr_fc only
RECORDED = ("torch", "preset_values", "tasks", "msr_meta")  # what config.json adds to the flags


def build_parser() -> argparse.ArgumentParser:
    """The script's flags; those of :data:`DEFAULTS` default to None (their help shows the real default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="paper: 1000 MSR outer steps, 20 marglik rounds; cpu: 1000 outer steps, 10 rounds (default)")
    p.add_argument("--ks", nargs="+", type=int, choices=(1, 2, 5), default=[1, 2, 5],
                   help="ranks of MSR Table 1 (default: 1 2 5)")
    p.add_argument("--regime", choices=("small", "large"), default="small",
                   help="examples per meta-training task (paper Table 5): small 2/2/4, large 20 (default: small)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--noise-var", type=positive_float, default=None,
                   help="fixed observation-noise variance sigma^2 of the Gaussian likelihood of marglik and map "
                        "(generator is noiseless) (default: 0.01)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="marglik rounds (MAP + KFAC + hyper steps) (default: the preset's)")
    p.add_argument("--hyper-steps", type=nonnegative_int, default=None,
                   help="marglik's Adam steps on log precisions per round (default: the preset's)")
    p.add_argument("--hyper-lr", type=nonnegative_float, default=None,
                   help="marglik's Adam learning rate on the log precisions (default: 0.1)")
    p.add_argument("--outer-steps", type=positive_int, default=None, help="MSR-FC outer steps (default: the preset's)")
    p.add_argument("--meta-batch", type=positive_int, default=None, help="MSR-FC tasks per outer step (default: 32)")
    p.add_argument("--latent-size", type=positive_int, default=None,
                   help="MSR-FC latent size k of U (default: 70, the paper's)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the task generator and of the model inits (default: 0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads (default 1; ops are tiny)")
    add_output_arguments(p, "compare_msr")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, explicit ones that no method run uses refused (:func:`check_effect`), the defaults of
    :data:`DEFAULTS` filled in, --ks and --methods without repeats (--methods in the order of :data:`METHODS`) and
    --out set; a resume with other flags than the run in --out is refused."""
    p = build_parser()
    args = p.parse_args(argv)
    check_effect(p, args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ks = list(dict.fromkeys(args.ks))
    args.methods = [m for m in METHODS if m in args.methods]
    args.out = args.out or default_out("runs/compare_msr", args.preset, script_settings(args))
    if args.resume:
        check_same_settings(p, args.out, script_settings(args), HOW + RECORDED, "finished rows")
    return args


def check_effect(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag given explicitly that no method run here would use."""
    users = {**{name: ("marglik",) for name in MARGLIK_FLAGS}, **{name: ("msr_fc",) for name in MSR_FLAGS},
             "noise_var": ("marglik", "map")}
    for name, methods in users.items():
        if getattr(args, name) is not None and not set(methods) & set(args.methods):
            p.error(f"--{name.replace('_', '-')} has no effect here: it applies to {' and '.join(methods)} only, not "
                    f"among --methods {' '.join(args.methods)}")


def _setting(args: argparse.Namespace, key: str, attr: str) -> int:
    value = getattr(args, attr)
    return PRESETS[args.preset][key] if value is None else value


def make_problem(k: int, args: argparse.Namespace) -> TranslationProblem:
    n_train, n_test, small, large = TASKS[k]
    return TranslationProblem(rank=k, n_train_tasks=n_train, n_test_tasks=n_test,
                              examples_per_train_task=small if args.regime == "small" else large,
                              examples_per_test_task=20, n_support=1, seed=args.seed)


def _summary(losses: np.ndarray) -> dict:
    mean, half = mean_confidence_interval(losses)
    return dict(mse=mean, ci95=half, n_test_tasks=int(losses.size))


def run_marglik(problem: TranslationProblem, args: argparse.Namespace, learn: bool, desc: str) -> dict:
    """FC+CONV layer: learn the path precisions (``learn``) or keep them at 1, then MAP on each support set."""
    start = time.time()
    torch.manual_seed(args.seed)
    model = FCConvModel(IN_FEATURES, KERNEL)
    x, y = problem.tasks("train", list(range(problem.n_tasks["train"])))
    rounds = _setting(args, "rounds", "rounds") if learn else 0
    config = MarglikConfig(rounds=rounds, hyper_steps=_setting(args, "hyper_steps", "hyper_steps"),
                           hyper_lr=args.hyper_lr, noise_var=args.noise_var)
    bar = tqdm(total=(rounds + 1) * x.shape[0], desc=desc, leave=False, disable=args.no_progress)
    prior, result = learn_precisions(model, x, y, config, Prior(model), progress=bar.update)
    bar.close()
    train_seconds = time.time() - start
    losses = torch.cat([query_mse(b.x_support, b.y_support, b.x_query, b.y_query, prior.precisions(),
                                  args.noise_var, KERNEL) for b in problem.test_batches(64)]).numpy()
    reports = {r.path: r for r in result.reports}
    return dict(**_summary(losses), fc_relative_neff=reports["fc"].relative,
                fc_normalised_neff=reports["fc"].normalised, conv_normalised_neff=reports["conv"].normalised,
                precision_fc=reports["fc"].precision, precision_conv=reports["conv"].precision,
                shared_params=prior.log_precision.numel() if learn else 0, per_task_params=sum(p.numel() for p in model.parameters()),
                train_seconds=train_seconds, wall_seconds=time.time() - start, objective_per_round=result.objective)


def run_msr_fc(problem: TranslationProblem, args: argparse.Namespace, desc: str) -> dict:
    """MSR-FC with the paper's translation settings (as experiments/msr_synthetic.py)."""
    start = time.time()
    torch.manual_seed(args.seed)
    model = MSRFC(IN_FEATURES, IN_FEATURES - KERNEL + 1, latent_size=args.latent_size)
    steps = _setting(args, "outer_steps", "outer_steps")
    learner = MetaLearner(model, MetaConfig(3, 9, 0.02, True, 5e-4, steps, args.meta_batch))
    bar = tqdm(total=steps, desc=desc, leave=False, disable=args.no_progress)

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(query_mse=f"{loss:.4f}")

    curve = learner.fit(problem, np.random.default_rng([args.seed, 1]), "cpu", tick)
    bar.close()
    train_seconds = time.time() - start
    losses = learner.evaluate(problem.test_batches(64))
    u_conv = conv_symmetry_matrix(IN_FEATURES, KERNEL)
    shared = sum(p.numel() for p in model.parameters()) + len(learner.inner_lrs)
    return dict(**_summary(losses), u_conv_residual=conv_residual(model.U, u_conv),
                u_coverage_gap=conv_coverage_gap(model.U, u_conv), shared_params=shared,
                per_task_params=model.v.numel(), train_seconds=train_seconds, wall_seconds=time.time() - start,
                final_train_query_mse=float(np.mean(curve[-20:])),
                inner_lr=float(learner.inner_lrs["v"].detach()))


def generator_row(problem: TranslationProblem) -> dict:
    """Distance of the true task-weight subspace to convolution (the ideal MSR U)."""
    u_conv = conv_symmetry_matrix(IN_FEATURES, KERNEL)
    u_true = generator_symmetry_matrix(problem.connectivity, IN_FEATURES, KERNEL)
    return dict(u_conv_residual=conv_residual(u_true, u_conv), u_coverage_gap=conv_coverage_gap(u_true, u_conv))


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (f"{'k':>2} {'method':<16} {'meta-test MSE (95% CI)':>24} {'FC rel N_eff':>12} {'U conv res':>10} "
              f"{'U cov gap':>9} {'params shared + per task':>25} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mse = f"{r['mse']:.4f} ± {r['ci95']:.4f}" if r.get("mse") is not None else "-"
        params = f"{r['shared_params']:,} + {r['per_task_params']:,}" if r.get("shared_params") is not None else "-"
        print(f"{r['k']:>2} {r['label']:<16} {mse:>24} {fmt(r.get('fc_relative_neff'), '.2e'):>12} "
              f"{fmt(r.get('u_conv_residual'), '.3f'):>10} {fmt(r.get('u_coverage_gap'), '.3f'):>9} "
              f"{params:>25} {fmt(r.get('wall_seconds'), '.1f'):>7}")


def jobs(args: argparse.Namespace) -> list[Job]:
    """The rows to compute, in order: per rank k, every method, then the generator's row."""
    return [(dict(k=k, method=method, label=LABELS[method], regime=args.regime), partial(method_row, method, k, args))
            for k in args.ks for method in (*args.methods, "generator")]


def method_row(method: str, k: int, args: argparse.Namespace) -> dict:
    """The result of ``method`` (or of the ``generator`` U) on the rank-``k`` problem."""
    problem = make_problem(k, args)
    desc = f"{LABELS[method]} k={k}"
    if method == "generator":
        return generator_row(problem)
    if method == "msr_fc":
        return dict(**run_msr_fc(problem, args, desc), published_mse=PUBLISHED_MSR_FC[(args.regime, k)])
    return run_marglik(problem, args, learn=method == "marglik", desc=desc)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(False)
    torch.set_num_threads(args.threads)
    msr_meta = MetaConfig(3, 9, 0.02, True, 5e-4, _setting(args, "outer_steps", "outer_steps"), args.meta_batch)
    config = dict(script_settings(args), torch=torch.__version__, preset_values=PRESETS[args.preset], tasks=TASKS,
                  msr_meta=asdict(msr_meta))
    start = time.time()
    rows = run_rows(jobs(args), args.out, config, args.resume)
    wall = time.time() - start
    print_table(rows)
    print(f"wall time {wall:.1f}s; results in {args.out}")


if __name__ == "__main__":
    run_script(main)
