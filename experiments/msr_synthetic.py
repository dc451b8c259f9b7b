"""Reproduce the synthetic tables of MSR (Zhou, Knowles & Finn, ICLR 2021).

Table 1: (partial) translation symmetry, rank k in {1, 2, 5}, small/large train data, methods
MAML-FC, MAML-LC, MAML-Conv, MTSR-FC, MSR-Joint-FC, MSR-FC.
Table 2: rotation (C4) and rotation+flip (D4) symmetry, methods MAML-Conv, MSR-Conv. The paper used C8/D8
(e2cnn); we use 90-degree groups, which are exact permutations of the pixel grid (see ella.msr.tasks).

Reports meta-test query MSE with 95% t-intervals over test tasks; writes config.json, results.json and
results.csv under --out and prints a table beside the published numbers. Every row (one method on one problem)
is saved as it finishes: an interrupted run loses at most the row in progress, and the same command with
--resume computes only the rows still missing (see ella.msr.output).

Examples:
    python experiments/msr_synthetic.py --preset cpu
    python experiments/msr_synthetic.py --preset paper --tables translation --ks 1 --methods msr_fc maml_conv
    python experiments/msr_synthetic.py --preset cpu --settings reference   # reference-code hyperparameters
    python experiments/msr_synthetic.py --preset cpu --resume   # continue the first example where it stopped
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
    positive_int,
    run_script,
    script_settings,
    setup_logging,
)
from ella.distributed import parse_device
from ella.msr import (
    Conv1dFlat,
    LocallyConnected1d,
    MetaConfig,
    MetaLearner,
    MSRConv,
    MSRFC,
    MultiTaskConfig,
    MultiTaskLearner,
    PlainConv2d,
    PlainLinear,
    RotationProblem,
    TranslationProblem,
    mean_confidence_interval,
)
from ella.msr.output import HOW, Job, add_output_arguments, default_out, run_rows
from ella.options import Range

TRANSLATION_METHODS = ("maml_fc", "maml_lc", "maml_conv", "mtsr_fc", "msr_joint_fc", "msr_fc")
ROTATION_METHODS = ("maml_conv", "msr_conv")
LABELS = {
    "maml_fc": "MAML-FC", "maml_lc": "MAML-LC", "maml_conv": "MAML-Conv", "mtsr_fc": "MTSR-FC",
    "msr_joint_fc": "MSR-Joint-FC", "msr_fc": "MSR-FC", "msr_conv": "MSR-Conv",
}
# Paper Table 5 (train tasks, test tasks, examples per train task small / large).
TASKS = {1: (400, 100, 2, 20), 2: (800, 200, 2, 20), 5: (800, 200, 4, 20)}
# Published Table 1: (method, regime, k) -> (mean, 95% half-width); Table 2: (method, group) -> mean.
PUBLISHED_T1 = {
    "maml_fc": [(3.4, .60), (2.1, .35), (1.0, .10), (3.4, .49), (2.0, .27), (1.1, .11)],
    "maml_lc": [(2.9, .53), (1.8, .24), (.87, .08), (2.9, .42), (1.6, .23), (.89, .08)],
    "maml_conv": [(.00, .00), (.43, .09), (.41, .04), (.00, .00), (.53, .08), (.49, .04)],
    "mtsr_fc": [(3.2, .49), (1.4, .17), (.86, .06), (.12, .03), (.07, .02), (.07, .01)],
    "msr_joint_fc": [(.25, .16), (.12, .04), (.21, .03), (.01, .00), (.08, .02), (.12, .02)],
    "msr_fc": [(.07, .02), (.07, .02), (.16, .02), (.00, .00), (.05, .01), (.09, .01)],
}
PUBLISHED_T2 = {("maml_conv", "C4"): .504, ("maml_conv", "D4"): .507, ("msr_conv", "C4"): .004, ("msr_conv", "D4"): .001}
REFERENCE_LATENT = {1: 3, 2: 6, 5: 30}

PRESETS = {
    # paper App. D.1/D.2; rotation outer steps are not stated in the paper, we assume 1000 like translation
    "paper": dict(outer_steps=1000, joint_outer_steps=1000, rot_outer_steps=1000, mtsr_steps=500, eval_tasks=None, rot_train_tasks=8000,
                  rot_test_tasks=2000, rot_eval_tasks=2000),
    # MSR-Joint carries a per-task copy of the dense U (32 x 4760 x 70) through a second-order inner loop:
    # ~40x the cost of MSR-FC per step, so the cpu preset gives it few steps (not converged; see report).
    "cpu": dict(outer_steps=1000, joint_outer_steps=100, rot_outer_steps=300, mtsr_steps=500, eval_tasks=None, rot_train_tasks=8000,
                rot_test_tasks=2000, rot_eval_tasks=300),
}
TABLE_METHODS = {"translation": TRANSLATION_METHODS, "rotation": ROTATION_METHODS}
FC_METHODS = ("mtsr_fc", "msr_joint_fc", "msr_fc")  # the MSRFC modules (--fc-structure, --latent-size)
# Defaults of the flags that apply to some tables or methods only: None in the parser, so that a flag given
# explicitly is told apart and refused where it has no effect (check_effect)
DEFAULTS = dict(ks=[1, 2, 5], regimes=["small", "large"], groups=["C4", "D4"], fc_structure="dense",
                conv_structure="kron", u_init_std=0.01, image_size=12, n_fields=3, meta_batch=32)
RECORDED = ("torch", "preset_values", "translation_meta", "rotation_meta")  # what config.json adds to the flags
META_FLAGS_HELP = "mtsr_fc is no meta-learner: it trains by its own 500 Adam steps at train and test (paper App. D.1)"


def build_parser() -> argparse.ArgumentParser:
    """The script's flags; those of :data:`DEFAULTS` default to None (their help shows the real default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="paper: App. D settings (1000 outer steps); cpu: fewer outer steps / eval tasks (default)")
    p.add_argument("--settings", choices=("paper", "reference"), default="paper",
                   help="hyperparameters: paper (3/9 inner steps, inner lr 0.02, outer lr 5e-4, latent k = 70, Table 5 "
                        "task counts) or reference code (1/1 inner steps, inner lr 0.1, outer lr 1e-3, k = 3/6/30, "
                        "8000/2000 tasks with 20 examples each) (default: paper)")
    p.add_argument("--tables", nargs="+", choices=TABLE_METHODS, default=None,
                   help="which tables to run: translation (paper Table 1), rotation (paper Table 2) (default: those "
                        "of the --methods given, else both)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"subset of {TRANSLATION_METHODS} (translation) and {ROTATION_METHODS} (rotation) (default: "
                        "all of the tables run)")
    p.add_argument("--ks", nargs="+", type=int, choices=(1, 2, 5), default=None,
                   help="ranks of Table 1 (default: 1 2 5)")
    p.add_argument("--regimes", nargs="+", choices=("small", "large"), default=None,
                   help="Table 1 data regimes: small or large training sets per task (paper Table 5) (default: small "
                        "large)")
    p.add_argument("--groups", nargs="+", choices=("C4", "D4"), default=None, help="groups of Table 2 (default: C4 D4)")
    p.add_argument("--outer-steps", type=positive_int, default=None,
                   help="outer steps of every meta-learned method, both tables (default: the preset's); "
                        f"{META_FLAGS_HELP}")
    p.add_argument("--meta-batch", type=positive_int, default=None,
                   help="tasks per outer step of the meta-learned methods (default: 32, the paper's)")
    p.add_argument("--latent-size", type=positive_int, default=None,
                   help="latent size of the dense MSR-FC/MTSR/MSR-Joint U (default: 70 for MSR-FC/MSR-Joint with the "
                        "paper settings; 3/6/30 for k = 1/2/5 with the reference settings and always for MTSR)")
    p.add_argument("--fc-structure", choices=("dense", "kron"), default=None,
                   help="MSR-FC/MTSR/MSR-Joint symmetry matrix form (default: dense)")
    p.add_argument("--conv-structure", choices=("kron", "dense"), default=None,
                   help="MSR-Conv symmetry form: kron (paper App. A.2 / reference) or dense (Prop. 1, latent size = "
                        "n_fields * 9: one base filter per output field) (default: kron)")
    p.add_argument("--u-init-std", type=nonnegative_float, default=None,
                   help="std of the Gaussian init of dense symmetry matrices U (MSR-FC/MTSR/MSR-Joint with "
                        "--fc-structure dense, MSR-Conv with --conv-structure dense) (default: 0.01)")
    p.add_argument("--image-size", type=Range(int, 3), default=None,
                   help="rotation inputs are 1 x S x S, S at least the 3 of the filters (default: 12)")
    p.add_argument("--n-fields", type=positive_int, default=None,
                   help="regular output fields of the rotation generator (default: 3)")
    p.add_argument("--first-order", action="store_true",
                   help="first-order meta-gradients of the meta-learned methods (default: second order)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the task generators and of the initialisations (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch.set_num_threads (default 1: these ops are tiny and thread spin-waiting dominates otherwise)")
    add_output_arguments(p, "msr_synthetic")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with --tables and --methods resolved (:func:`select_methods`), explicit flags that would have no
    effect refused (:func:`check_effect`), the defaults of :data:`DEFAULTS` filled in and repeated values of
    --ks, --regimes and --groups dropped (each row is computed once), and --out set; a resume with other flags
    than the run in --out is refused."""
    p = build_parser()
    args = p.parse_args(argv)
    select_methods(p, args)
    check_effect(p, args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ks, args.regimes, args.groups = (list(dict.fromkeys(v)) for v in (args.ks, args.regimes, args.groups))
    args.out = args.out or default_out("runs/msr_synthetic", args.preset, script_settings(args))
    if args.resume:
        check_same_settings(p, args.out, script_settings(args), HOW + RECORDED, "finished rows")
    return args


def select_methods(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set ``args.tables`` and ``args.methods`` to the tables and the methods that run, in the scripts' order; refuse
    an unknown method, a table given that runs none of the methods given and a method given that no table run has."""
    valid = list(dict.fromkeys(TRANSLATION_METHODS + ROTATION_METHODS))
    unknown = sorted(set(args.methods or ()) - set(valid))
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {valid}")
    tables = list(TABLE_METHODS) if args.tables is None else args.tables
    methods = [m for table in tables for m in TABLE_METHODS[table]] if args.methods is None else args.methods
    for table in args.tables or ():
        if not set(methods) & set(TABLE_METHODS[table]):
            p.error(f"--tables {table} runs none of --methods {' '.join(methods)}: its methods are "
                    f"{' '.join(TABLE_METHODS[table])}")
    args.tables = [table for table in TABLE_METHODS if table in tables and set(methods) & set(TABLE_METHODS[table])]
    stray = [m for m in methods if not any(m in TABLE_METHODS[table] for table in args.tables)]
    if stray:
        p.error(f"--methods {' '.join(stray)} belong to no table run (--tables {' '.join(args.tables)})")
    args.methods = [m for m in valid if m in methods]


def table_methods(args: argparse.Namespace, table: str) -> list[str]:
    """The methods that run in ``table`` (none where it does not run)."""
    return [m for m in TABLE_METHODS[table] if table in args.tables and m in args.methods]


def check_effect(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag given explicitly that no table or method run here would use."""
    translation, rotation = table_methods(args, "translation"), table_methods(args, "rotation")
    fc = [m for m in translation if m in FC_METHODS]
    dense_fc = bool(fc) and args.fc_structure in (None, "dense")
    dense_conv = "msr_conv" in rotation and args.conv_structure == "dense"
    meta = [m for m in translation + rotation if m != "mtsr_fc"]
    rules = [
        ("--ks", args.ks, translation, "it applies to --tables translation, which does not run"),
        ("--regimes", args.regimes, translation, "it applies to --tables translation, which does not run"),
        ("--groups", args.groups, rotation, "it applies to --tables rotation, which does not run"),
        ("--image-size", args.image_size, rotation, "it applies to --tables rotation, which does not run"),
        ("--n-fields", args.n_fields, rotation, "it applies to --tables rotation, which does not run"),
        ("--conv-structure", args.conv_structure, "msr_conv" in rotation, "it applies to msr_conv, which does not run"),
        ("--fc-structure", args.fc_structure, fc, f"it applies to {', '.join(FC_METHODS)}, none of which runs"),
        ("--latent-size", args.latent_size, dense_fc,
         f"it sizes the dense U of {', '.join(FC_METHODS)}, and none of them runs with --fc-structure dense"),
        ("--u-init-std", args.u_init_std, dense_fc or dense_conv,
         f"it initialises the dense U of {', '.join(FC_METHODS)} (--fc-structure dense) and of msr_conv "
         "(--conv-structure dense), and none of them runs so"),
        ("--outer-steps", args.outer_steps, meta, META_FLAGS_HELP),
        ("--meta-batch", args.meta_batch, meta, META_FLAGS_HELP),
        ("--first-order", args.first_order or None, meta, META_FLAGS_HELP),
    ]
    for flag, given, applies, why in rules:
        if given is not None and not applies:
            p.error(f"{flag} has no effect here: {why} (this run: --tables {' '.join(args.tables)} --methods "
                    f"{' '.join(args.methods)})")


def translation_model(method: str, k: int, args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[str, ...] | None]:
    """Module and inner parameter names (None = the module's own) for a Table 1 method."""
    latent = args.latent_size
    if latent is None and (args.settings == "reference" or method == "mtsr_fc"):
        # MTSR fits v on the single support example of a test task by plain gradient steps: with a 70-dim v
        # and 68 outputs that fit interpolates the example (error 2.4 at k=2, worse than MAML-FC). The
        # reference's sizes, also the 70x3 blocks of the paper's Fig. 6, make it a well-posed least squares.
        latent = REFERENCE_LATENT[k]
    if method == "maml_fc":
        return PlainLinear(70, 68), None
    if method == "maml_lc":
        return LocallyConnected1d(70, 3), None
    if method == "maml_conv":
        return Conv1dFlat(3), None
    if args.fc_structure == "kron":
        model = MSRFC(70, 68, structure="kron")
    else:
        model = MSRFC(70, 68, latent_size=latent, u_init_std=args.u_init_std)
    inner = tuple(model.outer_names) + ("v",) if method == "msr_joint_fc" else None
    return model, inner


def meta_config(args: argparse.Namespace, rotation: bool, joint: bool = False) -> MetaConfig:
    preset = PRESETS[args.preset]
    key = "rot_outer_steps" if rotation else ("joint_outer_steps" if joint else "outer_steps")
    steps = preset[key] if args.outer_steps is None else args.outer_steps
    if args.settings == "reference":
        return MetaConfig(1, 1, 0.1, True, 1e-3, steps, args.meta_batch, args.first_order)
    if rotation:  # paper App. D.2: 1 inner step at train and test, inner lr init 0.1
        return MetaConfig(1, 1, 0.1, True, 5e-4, steps, args.meta_batch, args.first_order)
    return MetaConfig(3, 9, 0.02, True, 5e-4, steps, args.meta_batch, args.first_order)


def run_one(model, inner, problem, cfg: MetaConfig, mtsr: bool, args, seed: int, desc: str) -> dict:
    """Train one method on one problem and evaluate it on the test tasks."""
    device = torch.device(args.device)  # checked by parse_device in main
    model = model.to(device)
    eval_tasks = PRESETS[args.preset]["rot_eval_tasks" if isinstance(problem, RotationProblem) else "eval_tasks"]
    test_batches = [b.to(device) for b in problem.test_batches(64, eval_tasks)]
    start = time.time()
    if mtsr:
        steps = PRESETS[args.preset]["mtsr_steps"]
        learner = MultiTaskLearner(model, MultiTaskConfig(steps_train=steps, steps_test=steps), seed=seed)
        learner.fit(problem, device)
        train_curve: list[float] = []
    else:
        learner = MetaLearner(model, cfg, inner)
        bar = tqdm(total=cfg.outer_steps, desc=desc, leave=False, disable=args.no_progress)

        def tick(step: int, loss: float) -> None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(query_mse=f"{loss:.4f}")

        train_curve = learner.fit(problem, np.random.default_rng([seed, 1]), device, tick)
        bar.close()
    train_time = time.time() - start
    losses = learner.evaluate(test_batches)
    mean, half = mean_confidence_interval(losses)
    out = dict(mean=mean, ci95=half, n_test_tasks=len(losses), train_seconds=train_time,
               eval_seconds=time.time() - start - train_time,
               final_train_query_mse=float(np.mean(train_curve[-20:])) if train_curve else None)
    if not mtsr:
        out["inner_lrs"] = {n: float(p.detach()) for n, p in learner.inner_lrs.items()}
    return out


def translation_jobs(args: argparse.Namespace) -> list[Job]:
    """The rows of Table 1 to compute, in order: regime, then rank, then method."""
    return [(dict(table="translation", method=LABELS[method], problem=f"k={k}", regime=regime),
             partial(translation_row, method, k, regime, args))
            for regime in args.regimes for k in args.ks for method in table_methods(args, "translation")]


def translation_row(method: str, k: int, regime: str, args: argparse.Namespace) -> dict:
    """Train and evaluate one Table 1 method on the rank-``k`` problem; its result beside the published one."""
    n_train, n_test, small, large = TASKS[k]
    if args.settings == "reference":
        n_train, n_test, small, large = 8000, 2000, 20, 20
    problem = TranslationProblem(rank=k, n_train_tasks=n_train, n_test_tasks=n_test,
                                 examples_per_train_task=small if regime == "small" else large,
                                 examples_per_test_task=20, n_support=1, seed=args.seed)
    torch.manual_seed(args.seed)
    model, inner = translation_model(method, k, args)
    res = run_one(model, inner, problem, meta_config(args, False, method == "msr_joint_fc"), method == "mtsr_fc", args,
                  args.seed, f"{LABELS[method]} k={k} {regime}")
    pub = PUBLISHED_T1[method][(0 if regime == "small" else 3) + (1, 2, 5).index(k)]
    return dict(published_mean=pub[0], published_ci95=pub[1], **res)


def rotation_jobs(args: argparse.Namespace) -> list[Job]:
    """The rows of Table 2 to compute, in order: group, then method."""
    return [(dict(table="rotation", method=LABELS[method], problem=group, regime="small"),
             partial(rotation_row, method, group, args))
            for group in args.groups for method in table_methods(args, "rotation")]


def rotation_row(method: str, group: str, args: argparse.Namespace) -> dict:
    """Train and evaluate one Table 2 method on the ``group`` problem; its result beside the published one."""
    preset = PRESETS[args.preset]
    problem = RotationProblem(group, n_fields=args.n_fields, image_size=args.image_size,
                              n_train_tasks=preset["rot_train_tasks"], n_test_tasks=preset["rot_test_tasks"],
                              examples_per_train_task=20, examples_per_test_task=20, n_support=1, seed=args.seed)
    torch.manual_seed(args.seed)
    if method == "maml_conv":
        model = PlainConv2d(1, problem.out_channels, 3)
    else:
        # Prop. 1: the latent filter of a lifting conv holds one base 3x3 filter per output field
        latent = problem.n_fields * 9 if args.conv_structure == "dense" else None
        model = MSRConv(1, problem.out_channels, 3, structure=args.conv_structure, latent_size=latent,
                        u_init_std=args.u_init_std)
    res = run_one(model, None, problem, meta_config(args, True), False, args, args.seed, f"{LABELS[method]} {group}")
    return dict(published_mean=PUBLISHED_T2[(method, group)], published_ci95=None, **res)


def print_table(rows: list[dict]) -> None:
    header = f"{'table':<11} {'method':<13} {'problem':<7} {'regime':<6} {'ours (95% CI)':>20} {'paper':>14} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        pub = f"{r['published_mean']:.3g}" + (f" ± {r['published_ci95']:.2g}" if r["published_ci95"] is not None else "")
        print(f"{r['table']:<11} {r['method']:<13} {r['problem']:<7} {r['regime']:<6} "
              f"{r['mean']:>10.4f} ± {r['ci95']:<7.4f} {pub:>14} {r['train_seconds']:>8.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parse_device(args.device)  # an unusable --device fails here, before any work
    setup_logging(False)
    torch.set_num_threads(args.threads)
    config = dict(script_settings(args), torch=torch.__version__, preset_values=PRESETS[args.preset],
                  translation_meta=asdict(meta_config(args, False)), rotation_meta=asdict(meta_config(args, True)))
    start = time.time()
    rows = run_rows(translation_jobs(args) + rotation_jobs(args), args.out, config, args.resume)
    print_table(rows)
    print(f"wall time {time.time() - start:.1f}s; results in {args.out}")


if __name__ == "__main__":
    run_script(main)
