"""The eigendecomposition of a round on the CPU: numpy's LAPACK (the default for factors of 128+ rows) against torch's.

Example (the figures of docs/kfac.md, "Eigenvalues through numpy's LAPACK"):

    OMP_NUM_THREADS=1 python benchmarks/eigenvalues.py --layer ffc_conv --alpha 4 --n-images 2048

Fits the KFAC factors of a freshly initialised network once (exact GGN, the Trainer's KFAC batch, CIFAR-10 images
from --data-dir, else $ELLA_DATA, else ./data), then times, interleaved over --repeats rounds after a warm-up,
the whole decomposition (``KronCurvature.decompose``) with every factor's eigenvalues from
``torch.linalg.eigvalsh`` and with the default (:mod:`kfac.cpu_linalg`), and per factor size the two libraries'
``eigvalsh`` on the same float64 stack. Prints medians, the median ratio of the same rounds, and how far apart
the eigenvalues are (relative to the largest).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from kfac_speed import measure, median_ratio

from ella.cli import positive_int, run_script
from ella.models import LAYER_NAMES
from ella.train import TrainConfig, Trainer
from kfac import cpu_linalg, fit_kfac
from kfac.decomposition import _symmetric


def decompose_with(kron, numpy_min_size: float):
    """``kron.decompose`` with numpy's LAPACK for factors of at least ``numpy_min_size`` rows (inf: none)."""
    def run():
        default, cpu_linalg.NUMPY_EIGVALSH_MIN_SIZE = cpu_linalg.NUMPY_EIGVALSH_MIN_SIZE, numpy_min_size
        try:
            return kron.decompose()
        finally:
            cpu_linalg.NUMPY_EIGVALSH_MIN_SIZE = default

    return run


def stacks_by_size(kron) -> dict[int, torch.Tensor]:
    """Every factor stacked per size ``n`` as the decomposition stacks it (float64, symmetrised): ``(k, n, n)``."""
    found = defaultdict(list)
    for name in kron.block_names:
        for factor in kron.scaled_factors(name):
            if factor is not None:
                found[factor.shape[-1]].append(factor)
    return {n: _symmetric(parts) for n, parts in sorted(found.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: $ELLA_DATA, then ./data)")
    parser.add_argument("--layer", choices=LAYER_NAMES, default="ffc_conv", help="network (default: ffc_conv)")
    parser.add_argument("--alpha", type=positive_int, default=4, help="network width (default: 4)")
    parser.add_argument("--n-images", type=positive_int, default=2048, help="CIFAR-10 images (default: 2048)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds after a warm-up (default: 5)")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as root:
        config = TrainConfig(layer=args.layer, alpha=args.alpha, n_train=args.n_images, n_valid=1000, laplace=True,
                             device="cpu", capture=False, data_dir=args.data_dir)
        trainer = Trainer(config, Path(root))
        kron = fit_kfac(trainer.model, trainer.marglik_loader, curvature=config.curvature,
                        kfac_approx=config.kfac_approx, grouped_mode=config.grouped_mode)
    print(f"torch {torch.__version__} (LAPACK of its build), numpy {np.__version__}, {torch.get_num_threads()} "
          f"torch thread(s); {args.layer}, alpha {args.alpha}, factors of {args.n_images} images; medians of "
          f"{args.repeats} interleaved rounds")
    rows = measure({"torch": decompose_with(kron, float("inf")),
                    "default": decompose_with(kron, cpu_linalg.NUMPY_EIGVALSH_MIN_SIZE)}, args.repeats, cpu)
    default = kron.decompose().eigenvalues()
    gap = decompose_with(kron, float("inf"))().eigenvalues() - default
    largest = float(default.abs().max())
    print(f"  decomposition: torch.linalg.eigvalsh {rows['torch'].median:.3f} s, default {rows['default'].median:.3f} s"
          f" ({median_ratio(rows['default'], rows['torch']):.2f}x); eigenvalues apart by at most "
          f"{float(gap.abs().max()) / largest:.1e} of the largest")
    print(f"  {'size':>5} {'factors':>7} {'torch':>9} {'numpy':>9} {'ratio':>6}")
    for n, stack in stacks_by_size(kron).items():
        values = stack.numpy()
        sizes = measure({"torch": lambda: torch.linalg.eigvalsh(stack),
                         "numpy": lambda: np.linalg.eigvalsh(values)}, args.repeats, cpu)
        print(f"  {n:5d} {stack.shape[0]:7d} {sizes['torch'].median:8.4f}s {sizes['numpy'].median:8.4f}s "
              f"{median_ratio(sizes['numpy'], sizes['torch']):6.2f}")


if __name__ == "__main__":
    run_script(main)
