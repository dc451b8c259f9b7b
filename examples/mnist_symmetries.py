"""Learn the layer-wise symmetries of your own small network on MNIST, on the CPU in under a minute.

    python examples/mnist_symmetries.py [--data-dir DIR]

The network: three relaxed layers of F-FC + CONV (each halving the map) and a linear head, built with
``ella.layers.relaxed_layer``. ``ella.learn.learn`` trains it with Adam on 2,500 MNIST images for 6 epochs and
after epochs 2, 4 and 6 takes 50 steps on the prior precisions (one per path) against the KFAC-Laplace marginal
likelihood; then it prints the test accuracy and the effective-parameter report: for every path its precision,
its effective parameters and their share within its layer ("relative"), its share of the layer's output, and the
path each layer relies on. MNIST is read from --data-dir, else $ELLA_DATA, else ./data (``mnist.npz`` or
torchvision's layout). Runs on CUDA when there is a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ella.cli import positive_int, run_script
from ella.data import load_dataset
from ella.layers import relaxed_layer
from ella.learn import learn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with MNIST (default: $ELLA_DATA, then ./data)")
    parser.add_argument("--n-train", type=positive_int, default=2500, help="training images (default: 2500)")
    parser.add_argument("--epochs", type=positive_int, default=6, help="training epochs, at least 2 (default: 6; a "
                        "marginal-likelihood round after every second)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first marginal-likelihood round comes after epoch 2")
    start = time.perf_counter()

    torch.manual_seed(0)
    data = load_dataset("mnist", args.data_dir, n_train=args.n_train, n_valid=500)  # images (N, 1, 32, 32)
    model = nn.Sequential(
        relaxed_layer(1, 8, 32, "ffc_conv", downsample=True),  # F-FC + CONV paths: (B, 1, 32, 32) -> (B, 8, 16, 16)
        relaxed_layer(8, 16, 16, "ffc_conv", downsample=True),  # -> (B, 16, 8, 8)
        relaxed_layer(16, 16, 8, "ffc_conv", downsample=True),  # -> (B, 16, 4, 4)
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    result = learn(model, data.train, valid=data.valid, test=data.test, epochs=args.epochs, optimizer="adam",
                   lr=3e-3, burn_in=2, marglik_every=2, hyper_steps=50)
    print(f"test accuracy {result.metrics['test']['acc']:.2f}%, -log p(D)/N {result.metrics['neg_log_marglik']:.3f}")
    print(result.table())

    print(f"{time.perf_counter() - start:.0f} s (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'})")


if __name__ == "__main__":
    run_script(main)
