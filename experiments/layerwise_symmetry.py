"""Layer-wise known symmetry: does every layer of a deep student keep the path its teacher layer uses?

A teacher of relaxed layers (tanh between them, the last one linear), each with exactly one path on (a
structure such as CCF: layer 1 CONV, layer 2 CONV, layer 3 a dense F-FC map no convolution expresses), each
layer rescaled so that its pre-activation has standard deviation --teacher-scale, generates regression data
from standard normal inputs. A student of the same depth with F-FC+CONV layers learns one precision per path,
every step exact as in known_symmetry.py (full-batch L-BFGS MAP, KFAC-Laplace, hyper-steps by --method).
--student sfc_sconv gives S-FC+S-CONV layers (the teacher's paths are then of the same types);
--student ffc_conv_gconv gives F-FC+CONV+GCONV layers on p4 maps (4 rotations of every channel; the inputs
independent standard normal p4 fields), where a G layer of the teacher is a p4 group convolution, which the CONV
path could also express with 16 times its parameters. Beside the relaxed student, students fixed to the true
structure and to one path in every layer (all-CONV, all-F-FC, all-GCONV) learn theirs the same way; every
student's final -log p(D)/N is the Laplace evidence with the MAP refitted (--final-map-iter) at its final
precisions.

A student layer is *recovered* when the paths the teacher layer does not use carry at most --share-threshold
of the layer's output power (what the layer computes), read beside its relative effective parameters and the
evidence against the true-structure student's.

With --init teacher (the default) a student starts from the teacher's weights on the paths the two share (its
other paths at their random initialisation), so that the question is the evidence's, not whether L-BFGS finds
a 3-layer network's global fit from a random start (--init random: it does not, docs/results.md).

    python experiments/layerwise_symmetry.py
    python experiments/layerwise_symmetry.py --structures CCF --seeds 0 --rounds 3 --n 128
    python experiments/layerwise_symmetry.py --student ffc_conv_gconv

Writes <out>/cells/<structure>_<seed>.json (one per structure and seed, written atomically; a rerun into an --out
whose config.json records the same settings continues the run, reusing them; one with other settings is refused:
choose another --out), <out>/layers.{json,csv} (one row per structure, seed and layer),
<out>/evidence.{json,csv} (one row per structure and seed: the final -log p(D)/N of every student),
config.json, and the figure recovery.png in figures/<path of --out below runs/> (or <out>/figures); prints the
recovery table, ending in `recovered N/M layers`.
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ella.bilinear_ray import MARGLIK_METHODS
from ella.cli import (
    add_exact_map_ray_argument, check_method_bound_flags, check_same_settings, figure_dir, method_flag_defaults,
    nonnegative_int, positive_float, positive_int, run_script, script_settings, setup_logging, write_table,
)
from ella.layers import Conv, FactoredFC, SparseConv, SparseFC
from ella.marglik import neg_log_marglik
from ella.priors import Prior
from ella.report import effective_layer_types, pyplot, save_figure
from ella.teacher import (
    STRUCTURE_LETTERS,
    PathTypes,
    Problem,
    deep_model,
    deep_teacher,
    fit_map_and_laplace,
    learn_precisions,
    report,
    start_from,
    structure_paths,
)

STUDENTS = {"ffc_conv": PathTypes(FactoredFC, Conv), "sfc_sconv": PathTypes(SparseFC, SparseConv),
            "ffc_conv_gconv": PathTypes(FactoredFC, Conv, group=True)}
STRUCTURES = {"ffc_conv": ("CCC", "CCF", "CFF", "FFF", "FCC"), "sfc_sconv": ("CCC", "CCF", "CFF", "FFF", "FCC"),
              "ffc_conv_gconv": ("GGG", "CGF", "GFC")}
"""The default --structures of each student."""
PATH_LETTERS = {path: letter for letter, path in STRUCTURE_LETTERS.items()}
"""Flags (by their argparse names) that act on one method only: given without it, they are refused."""
UNCOMPARED = ("out",)  # config.json entries that may differ between the runs of one folder
CELL_KEYS = ("structures", "seeds", "out")  # config.json entries that a cell's settings leave out


def train_student(problem: Problem, layers: list[tuple[str, ...]], teacher: torch.nn.Module, x: torch.Tensor,
                  y: torch.Tensor, args: argparse.Namespace, progress) -> tuple[float, list]:
    """Learn a student's precisions; returns ``(final -log p(D)/N with the MAP refitted, report rows)``."""
    model = deep_model(problem, layers, seed=args.student_seed, types=STUDENTS[args.student])
    if args.init == "teacher":
        start_from(model, teacher)
    prior = Prior(model)
    learn_precisions(model, prior, x, y, args.rounds, args.hyper_steps, args.hyper_lr, progress, method=args.method,
                     map_iter=args.map_iter, min_scale=args.ray_min_scale)
    fit = fit_map_and_laplace(model, prior, x, y, args.final_map_iter)
    with torch.no_grad():
        value = float(neg_log_marglik(fit, prior))
    return value, report(fit, model, prior, x)[1]


def run_cell(problem: Problem, structure: str, seed: int, args: argparse.Namespace, progress) -> dict:
    """One structure and seed: the relaxed student's layers and every student's evidence."""
    types = STUDENTS[args.student]
    teacher, x, y = deep_teacher(problem, structure, seed, types)  # paths of the student's types
    depth = len(structure)
    students = {"relaxed": [types.names] * depth, "true": structure_paths(structure),
                **{f"all_{path}": [(path,)] * depth for path in types.names}}
    evidence, relaxed_rows, trained = {}, [], {}
    for name, layers in students.items():
        key = tuple(map(tuple, layers))  # the true structure may be a one-path student: trained once
        if key not in trained:
            trained[key] = train_student(problem, layers, teacher, x, y, args, progress)
        else:
            progress(args.rounds)
        evidence[name], rows = trained[key]
        if name == "relaxed":
            relaxed_rows = rows
    student_types = effective_layer_types(relaxed_rows)
    layers = []
    for k, letter in enumerate(structure):
        used = STRUCTURE_LETTERS[letter]
        row = {r.path: r for r in relaxed_rows if r.layer == str(k)}
        others = [p for p in types.names if p != used]
        unused = max(others, key=lambda p: row[p].output_share)
        share = sum(row[p].output_share for p in others)
        layers.append({
            "structure": structure, "seed": seed, "layer": k + 1, "teacher": row[used].kind,
            "student": student_types[str(k)], "recovered": share <= args.share_threshold,
            "unused": row[unused].kind, "unused_relative": row[unused].relative, "unused_output_share": share,
            "unused_precision": row[unused].precisions[0], "used_precision": row[used].precisions[0],
            "largest": PATH_LETTERS[max(types.names, key=lambda p: row[p].output_share)],
        })
    gap = evidence["relaxed"] - evidence["true"]
    return {"structure": structure, "seed": seed, "layers": layers,
            "evidence": {"structure": structure, "seed": seed, **evidence, "relaxed_minus_true": gap}}


def write_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


def layer_letter(row: dict) -> str:
    """A student layer read by output share: its teacher's letter (``C``, ``F``, ``G``) where it is recovered,
    the letter of the path carrying most of its output in lower case where that is another path, ``?`` where the
    teacher's path carries most but the others more than the threshold."""
    teacher = row["structure"][row["layer"] - 1]
    if row["recovered"]:
        return teacher
    return row["largest"].lower() if row["largest"] != teacher else "?"


def recovery_grid(layers: list[dict], structures: list[str], seeds: list[int]) -> str:
    """A Markdown table, structures down and seeds across, each cell the student's layers by
    :func:`layer_letter`."""
    letters = {(row["structure"], row["seed"], row["layer"]): layer_letter(row) for row in layers}
    lines = ["| teacher | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    for structure in structures:
        cells = ["".join(letters.get((structure, seed, k + 1), " ") for k in range(len(structure))) for seed in seeds]
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LETTER_COLOURS = {"C": "tab:blue", "F": "tab:orange", "G": "tab:green"}


def plot_recovery(layers: list[dict], structures: list[str], seeds: list[int], out: Path) -> Path:
    """Grid: layers across (one sub-column per seed), structures down; each cell coloured by the student
    layer's type as its output shares read it (:func:`layer_letter`), a black cross where it is not the
    teacher's."""
    plt = pyplot()
    depth = max(len(s) for s in structures)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.35 * depth * len(seeds)), 1.2 + 0.5 * len(structures)))
    for row in layers:
        i = structures.index(row["structure"])
        j = (row["layer"] - 1) * len(seeds) + seeds.index(row["seed"])
        colour = LETTER_COLOURS.get(layer_letter(row).upper(), "tab:gray")
        ax.add_patch(plt.Rectangle((j, i), 1, 1, color=colour, ec="white"))
        if not row["recovered"]:
            ax.plot(j + 0.5, i + 0.5, "kx", markersize=8)
    for k in range(1, depth):
        ax.axvline(k * len(seeds), color="black", linewidth=2)
    ax.set_xlim(0, depth * len(seeds))
    ax.set_ylim(len(structures), 0)
    ax.set_xticks([(k + 0.5) * len(seeds) for k in range(depth)], [f"layer {k + 1}" for k in range(depth)])
    ax.set_yticks([i + 0.5 for i in range(len(structures))], structures)
    colours = "blue CONV, orange dense" + (", green GCONV" if any("G" in s for s in structures) else "")
    ax.set_title(f"student layers by output share, one column per seed\n{colours}, grey mixed; x: not the teacher's",
                 fontsize="small")
    return save_figure(fig, out)


def parse_args() -> argparse.Namespace:
    """The flags, checked (a flag given for a method the run leaves out is refused), with --out and --structures filled
    in, and --out checked against them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", nargs="+",
                        help="teacher structures, one letter per layer, layer 1 first (C: CONV, F: dense F-FC, G: p4 "
                             "GCONV, with --student ffc_conv_gconv); default: "
                             + "; ".join(f"{' '.join(v)} ({k})" for k, v in STRUCTURES.items()))
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="data and teacher seeds (default: 0 1 2 3 4)")
    parser.add_argument("--method", choices=MARGLIK_METHODS, default="ray",
                        help="how the precisions are learned (default: ray)")
    add_exact_map_ray_argument(parser)
    parser.add_argument("--student", choices=tuple(STUDENTS), default="ffc_conv",
                        help="the student's paths (ffc_conv_gconv: F-FC+CONV+GCONV layers on p4 maps; default: "
                             "ffc_conv)")
    parser.add_argument("--init", choices=("teacher", "random"), default="teacher",
                        help="start the students from the teacher's weights on shared paths, or at random (default: "
                             "teacher)")
    parser.add_argument("--rounds", type=positive_int, default=8,
                        help="MAP + Laplace rounds per student (default: 8)")
    parser.add_argument("--map-iter", type=positive_int, default=50,
                        help="L-BFGS iterations of every round's MAP fit, warm-started from the last round's "
                             "(default: 50)")
    parser.add_argument("--final-map-iter", type=positive_int, default=500,
                        help="L-BFGS iterations of the MAP refitted at a student's final precisions, whose evidence "
                             "is compared (default: 500)")
    parser.add_argument("--hyper-steps", type=positive_int, default=50, help="hyper-steps per round (default: 50)")
    parser.add_argument("--hyper-lr", type=positive_float, default=0.1,
                        help="learning rate of the alternation's Adam (default: 0.1)")
    parser.add_argument("--channels", type=positive_int, default=2, help="channels of every layer (default: 2)")
    parser.add_argument("--size", type=positive_int, default=4, help="image side (size x size; default: 4)")
    parser.add_argument("--n", type=positive_int, default=256, help="number of examples (default: 256)")
    parser.add_argument("--noise", type=positive_float, default=0.1,
                        help="standard deviation of the target noise (default: 0.1)")
    parser.add_argument("--teacher-scale", type=positive_float, default=1.0,
                        help="standard deviation of every teacher layer's pre-activation on the data (default: 1)")
    parser.add_argument("--share-threshold", type=positive_float, default=1e-3,
                        help="a layer is recovered when its unused paths' output share is at most this (default: "
                             "0.001)")
    parser.add_argument("--student-seed", type=int, default=0,
                        help="seed of the students' random initialisation (default: 0)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/layerwise_symmetry, "
                        "runs/layerwise_symmetry_<student> for another student than ffc_conv)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    defaults = method_flag_defaults(parser)
    args = parser.parse_args()
    check_method_bound_flags(parser, args, [args.method], defaults, "--method")
    if args.out is None:
        args.out = Path("runs") / ("layerwise_symmetry" + ("" if args.student == "ffc_conv" else f"_{args.student}"))
    if args.structures is None:
        args.structures = list(STRUCTURES[args.student])
    for structure in args.structures:
        try:
            paths = structure_paths(structure)
        except ValueError as error:
            parser.error(f"--structures: {error}")
        if any(path not in STUDENTS[args.student].names for (path,) in paths):
            parser.error(f"--structures: {structure} has a GCONV layer, which needs --student ffc_conv_gconv")
    check_same_settings(parser, args.out, script_settings(args), UNCOMPARED, "finished cells")
    return args












def finished_cell(path: Path, settings: dict) -> dict | None:
    """The cell at ``path`` where an earlier run finished it, else ``None``; a ValueError where it was computed
    with other ``settings``."""
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    if cell.get("settings") != settings:
        raise ValueError(f"{path} was computed with other settings than this run's: choose another --out")
    return cell


def compute_cells(args: argparse.Namespace, problem: Problem, settings: dict) -> list[dict]:
    """Every structure and seed: a cell finished earlier (:func:`finished_cell`) or computed and written."""
    cells, reused = [], 0
    per_cell = (2 + len(STUDENTS[args.student].names)) * args.rounds  # the relaxed, true and one-path students
    total = len(args.structures) * len(args.seeds) * per_cell
    with tqdm(total=total, desc=f"layer-wise, {args.method}") as bar:
        for structure in args.structures:
            for seed in args.seeds:
                path = args.out / "cells" / f"{structure}_{seed}.json"
                cell = finished_cell(path, settings)
                if cell is None:
                    cell = {**run_cell(problem, structure, seed, args, bar.update), "settings": settings}
                    write_atomic(path, cell)
                else:
                    bar.update(per_cell)
                    reused += 1
                cells.append(cell)
    if reused:
        print(f"reused {reused} finished cell(s) of an earlier run with the same settings in {args.out / 'cells'}")
    return cells


def main() -> None:
    args = parse_args()
    setup_logging(args.verbose)
    problem = Problem(channels=args.channels, size=args.size, n=args.n, noise=args.noise,
                      teacher_scale=args.teacher_scale)
    config = script_settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    try:
        cells = compute_cells(args, problem, {k: v for k, v in config.items() if k not in CELL_KEYS})
    except KeyboardInterrupt:
        print(f"interrupted; the same command continues the run, reusing the cells finished in {args.out / 'cells'}",
              file=sys.stderr)
        raise SystemExit(130) from None
    layers = [row for cell in cells for row in cell["layers"]]
    evidence = [cell["evidence"] for cell in cells]
    table = write_table(layers, args.out, "layers")
    evidence_table = write_table(evidence, args.out, "evidence")
    figure = plot_recovery(layers, args.structures, args.seeds, figure_dir(args.out) / "recovery.png")
    print(f"\n{asdict(problem)}, student {args.student}, {args.method}, {args.rounds} rounds, init {args.init}")
    print(f"per layer (recovered: the unused path's output share <= {args.share_threshold:g}):\n{table}")
    print(f"\nfinal -log p(D)/N per student (MAP refitted at its final precisions):\n{evidence_table}")
    close = sum(abs(row["relaxed_minus_true"]) <= 0.01 for row in evidence)
    print(f"evidence within 0.01 of the true-structure student's: {close}/{len(evidence)}")
    print(f"\nrecovery (the student's layers by output share; ? where the unused path carries more than "
          f"{args.share_threshold:g}):\n{recovery_grid(layers, args.structures, args.seeds)}")
    print(f"figure: {figure}")
    print(f"recovered {sum(row['recovered'] for row in layers)}/{len(layers)} layers")


if __name__ == "__main__":
    run_script(main, verbose_flag=True)
