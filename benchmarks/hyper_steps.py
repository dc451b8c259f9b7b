"""Time the hyper-steps of one marginal-likelihood round (``ella.marglik.optimise_prior``) on a real fit.

    OMP_NUM_THREADS=1 python benchmarks/hyper_steps.py --layer ffc_conv --alpha 4

Fits KFAC-Laplace of the network at its initial weights on 300 class-balanced CIFAR-10 images (the number of
eigenvalues depends on the network, not on the images), then times ``--steps`` Adam steps on the log precisions
from the same start ``--repeats`` times and prints the median and the final objective. The ``ella`` on
``PYTHONPATH`` is timed, so two versions compare on the same fit, e.g. the code before the fused objective:
``git worktree add /tmp/before e675993 && PYTHONPATH=/tmp/before python benchmarks/hyper_steps.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ella.cli import positive_int, run_script
from ella.data import TensorLoader, load_dataset
from ella.marglik import fit_laplace, optimise_prior
from ella.models import LAYER_NAMES, build_model
from ella.priors import Prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", choices=LAYER_NAMES, default="ffc_conv", help="network (default: ffc_conv)")
    parser.add_argument("--alpha", type=positive_int, default=4, help="network width (default: 4)")
    parser.add_argument("--steps", type=positive_int, default=100, help="hyper-steps per repeat (default: 100)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (default: 5)")
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: $ELLA_DATA, then ./data)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = load_dataset("cifar10", args.data_dir, n_train=300, n_valid=100, seed=0)
    model = build_model(args.layer, 3, 10, alpha=args.alpha)
    prior = Prior(model)
    fit = fit_laplace(model, TensorLoader(*bundle.train, 150), prior)
    start = prior.log_precision.detach().clone()
    times, value = [], float("nan")
    for _ in range(args.repeats):
        with torch.no_grad():
            prior.log_precision.copy_(start)
        began = time.perf_counter()
        value = optimise_prior(fit, prior, torch.optim.Adam(prior.parameters(), lr=0.1), args.steps)
        times.append(time.perf_counter() - began)
    print(f"{args.layer}, width {args.alpha}: {int(sum(fit.n_params)):,} eigenvalues; {args.steps} hyper-steps: "
          f"median {statistics.median(times):.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}); "
          f"final -log p(D)/N {value:.9f}")


if __name__ == "__main__":
    run_script(main)
