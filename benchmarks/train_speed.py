"""Speed of training on one device: eager against captured epochs, and a marginal-likelihood round in parts.

Example (the GPU figures of docs/results.md are to come from this command; data from --data-dir, else $ELLA_DATA,
else ./data):

    python benchmarks/train_speed.py --device cuda --alpha 10 --n-images 10000 --layer ffc_conv conv

For each ``--layer`` two ``ella.train.Trainer`` s of the same run (SGD with momentum, batch 128, CIFAR-10
augmentation) time, in ``--repeats`` interleaved rounds after a warm-up (medians; ratios are medians of the
same-round ratios): one epoch of the plain loop (``capture=False``), one captured epoch (the static-shape steps
of ``ella.static_step`` replayed as CUDA graphs; on the CPU the same steps run eagerly), the evaluation of the
images, and the three parts of a marginal-likelihood round: the KFAC pass over the unaugmented images (exact
GGN; batched backward on CUDA, at the Trainer's KFAC batch), the eigendecomposition of every factor (for CUDA
factors also on the CPU, ``decompose(device="cpu")``, the alternative :mod:`kfac.decomposition` describes), the
same for a later round (``eigendecomp., later``: the latest pass's factors, with the eigenvalues a first round at
the initial weights left in a :class:`kfac.EigenvalueMemo`, as a training run keeps them; the round counts this
one, on the factors' device), and ``--hyper-steps`` hyper-steps. It then extrapolates the paper preset (45,000
training images, 4,000 epochs, a round every 5 epochs from epoch 10 on: 799 rounds; each epoch evaluated on
5,000 validation and 1,000 test images): epochs and the KFAC pass scale with the number of images, the
eigendecomposition and the hyper-steps do not.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from kfac_speed import Timing, measure, median_ratio

from ella.cli import positive_int, run_script
from ella.marglik import fit_laplace, optimise_prior
from ella.models import LAYER_NAMES
from ella.train import TrainConfig, Trainer, evaluate
from kfac import EigenvalueMemo, fit_kfac

LATER = "eigendecomp., later"  # the row a round counts: the decomposition with the previous rounds' memo
PAPER = {"images": 45_000, "epochs": 4000, "rounds": len(range(10, 4001, 5)), "evaluated": 6000}


def trainers(layer: str, args: argparse.Namespace, root: Path) -> tuple[Trainer, Trainer]:
    """The plain and the captured trainer of one run (same data, same initial weights)."""
    config = TrainConfig(layer=layer, alpha=args.alpha, n_train=args.n_images, n_valid=1000, laplace=True,
                         kfac_batch_size=args.kfac_batch_size, device=args.device, data_dir=args.data_dir)
    plain = Trainer(TrainConfig(**{**config.__dict__, "capture": False}), root / f"{layer}-plain")
    captured = Trainer(config, root / f"{layer}-captured")
    if captured.runner is None:  # no CUDA: time the static-shape steps eagerly instead
        captured.runner = captured._make_runner(capture=False)
    return plain, captured


def epoch_label(trainer: Trainer) -> str:
    """``captured epoch`` on CUDA; on the CPU the static-shape steps run eagerly."""
    return "captured epoch" if trainer.captured else "static-shape epoch"


def steps(plain: Trainer, captured: Trainer, hyper_steps: int) -> dict:
    """The timed steps; the KFAC factors and the Laplace fit they start from are computed once here."""
    model, prior, c = captured.model, captured.prior, captured.config
    options = {"curvature": c.curvature, "kfac_approx": c.kfac_approx, "grouped_mode": c.grouped_mode}
    kron = fit_kfac(model, captured.marglik_loader, **options)
    first_round = EigenvalueMemo()  # what a run's first round leaves for the next (the parameters at init)
    fit = fit_laplace(model, captured.marglik_loader, prior, memo=first_round, **options)
    start = prior.log_precision.detach().clone()
    latest = {"kron": kron}

    def kfac_pass() -> None:
        latest["kron"] = fit_kfac(model, captured.marglik_loader, **options)

    def later_decomposition() -> None:  # the latest factors (trained since) with the first round's memo
        latest["kron"].decompose(memo=copy.deepcopy(first_round))

    def hyper() -> None:
        with torch.no_grad():
            prior.log_precision.copy_(start)
        optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=c.hyper_lr), hyper_steps)

    timed = {
        "eager epoch": plain.train_epoch,
        epoch_label(captured): captured.train_epoch,
        "evaluation": lambda: evaluate(model, *captured.data.train),
        "KFAC pass": kfac_pass,
        "eigendecomposition": kron.decompose,
        LATER: later_decomposition,
    }
    if kron.blocks[kron.block_names[0]].out_factors.is_cuda:  # the alternative for CUDA factors (kfac.decomposition)
        timed["eigendecomp. on CPU"] = lambda: kron.decompose(device="cpu")
    timed[f"{hyper_steps} hyper-steps"] = hyper
    return timed


def paper_hours(rows: dict[str, Timing], n_images: int, label: str) -> float:
    """The paper preset's wall time extrapolated from the medians (see the module docstring)."""
    scale = PAPER["images"] / n_images
    per_epoch = rows[label].median * scale + rows["evaluation"].median * PAPER["evaluated"] / n_images
    labels = list(rows)
    per_round = rows["KFAC pass"].median * scale + rows[LATER].median + rows[labels[-1]].median
    return (PAPER["epochs"] * per_epoch + PAPER["rounds"] * per_round) / 3600


def report(layer: str, n_params: int, rows: dict[str, Timing], n_images: int, label: str) -> None:
    base = rows[label]
    print(f"\n[{layer}] {n_params:,} parameters, {n_images} images (medians; ratios: medians of same-round ratios)")
    for name, timing in rows.items():
        print(f"  {name:20s} {timing.median:8.3f} s  ({median_ratio(timing, base):6.2f} x {label})  "
              f"peak +{timing.peak_mb:8.1f} MiB")
    names = list(rows)
    round_s = sum(rows[k].median for k in ("KFAC pass", LATER, names[-1]))
    print(f"  eager / {label} = {median_ratio(rows['eager epoch'], base):.2f}; "
          f"marginal-likelihood round {round_s:.3f} s = {round_s / rows['eager epoch'].median:.2f} eager epochs")
    print(f"  paper preset extrapolated: {paper_hours(rows, n_images, 'eager epoch'):.1f} h eager, "
          f"{paper_hours(rows, n_images, label):.1f} h with the {label.split()[0]} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="'cpu', 'cuda', 'cuda:1', ... (default: cuda when available)")
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: $ELLA_DATA, then ./data)")
    parser.add_argument("--n-images", type=positive_int, default=10000, help="CIFAR-10 training images (default: 10000)")
    parser.add_argument("--alpha", type=positive_int, default=10, help="network width (default: 10, the paper's)")
    parser.add_argument("--layer", nargs="+", choices=LAYER_NAMES, default=["ffc_conv", "conv"],
                        help="networks to time (default: ffc_conv conv)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds after a warm-up (default: 3)")
    parser.add_argument("--hyper-steps", type=positive_int, default=20, help="hyper-steps per round (default: 20)")
    parser.add_argument("--kfac-batch-size", type=positive_int, default=None,
                        help="KFAC batch (default: the Trainer's, 1024 on CUDA and 150 on the CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, alpha {args.alpha}, {args.n_images} images, batch 128, "
          f"repeats {args.repeats}")
    with tempfile.TemporaryDirectory() as root:
        for layer in args.layer:
            plain, captured = trainers(layer, args, Path(root))
            rows = measure(steps(plain, captured, args.hyper_steps), args.repeats, device)
            report(layer, sum(p.numel() for p in captured.model.parameters()), rows, captured.n_train,
                   epoch_label(captured))


if __name__ == "__main__":
    run_script(main)
