"""Speed of our exact-GGN KFAC pass vs one SGD epoch and vs curvlinops' KFAC, on real CIFAR-10 images.

Example (the numbers reported by the kfac helper were produced with this command):

    /work/venv/bin/python benchmarks/kfac_speed.py --n-images 2048 --alpha 4 --repeats 3 --threads 2

For each network (``conv`` and ``ffc_conv`` from ``ella.models.build_model``) it prints median wall-clock
times over ``--repeats`` runs of: one SGD epoch (batch 128, momentum 0.9); our exact-GGN KFAC pass
(default: one backward per direction) and, unless ``--skip-variant``, the same with one vmapped backward
(``backward="batched"``); curvlinops' ``KFACLinearOperator`` (type-2 = exact GGN, expand) on the CONV network
(it supports only stock modules); the ratios; and the peak extra resident memory of each step (sampled from
/proc, CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ella.models import build_model
from kfac.fit import fit_kfac

DATA = Path("/work/shared/data/cifar10.npz")


def load_cifar(n_images: int, device: torch.device) -> TensorDataset:
    """First ``n_images`` training images, per-channel normalised, ``(N, 3, 32, 32)`` float32."""
    data = np.load(DATA)
    x = torch.from_numpy(data["x_train"][:n_images]).float().permute(0, 3, 1, 2) / 255.0
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    y = torch.from_numpy(data["y_train"][:n_images].astype(np.int64))
    return TensorDataset(((x - mean) / std).to(device), y.to(device))


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or RSS sampled every 2 ms from /proc (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._max = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.peak_mb = (peak - self._base) / 2**20


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds and max peak extra memory (MiB) of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak_mb)
    return statistics.median(times), max(peaks)


def sgd_epoch(model: nn.Module, dataset: TensorDataset, batch_size: int) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    return run


def ours(model: nn.Module, dataset: TensorDataset, batch_size: int, **options) -> Callable[[], object]:
    loader = DataLoader(dataset, batch_size=batch_size)
    return lambda: fit_kfac(model, loader, "classification", "ggn", **options)


def curvlinops_kfac(model: nn.Module, dataset: TensorDataset, batch_size: int) -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    loader = DataLoader(dataset, batch_size=batch_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> object:
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            loader,
            fisher_type="type-2",
            kfac_approx="expand",
            check_deterministic=False,
            num_data=len(dataset),
            num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()
        return op

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-images", type=int, default=2048)
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--networks", default="conv,ffc_conv")
    parser.add_argument(
        "--skip-variant", "--skip-loop", action="store_true",
        help="skip the vmapped-backward variant (--skip-loop is the old name, from when the loop was the variant)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = load_cifar(args.n_images, device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.n_images} CIFAR-10 images, alpha {args.alpha}, batch {args.batch_size}, repeats {args.repeats}")
    for name in args.networks.split(","):
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, n_classes=10, alpha=args.alpha).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        rows = {"sgd epoch": measure(sgd_epoch(model, dataset, args.batch_size), args.repeats, device)}
        model.eval()
        rows["ours"] = measure(ours(model, dataset, args.batch_size), args.repeats, device)
        if not args.skip_variant:
            rows["ours (vmapped)"] = measure(
                ours(model, dataset, args.batch_size, backward="batched"), args.repeats, device
            )
        if name == "conv":
            rows["curvlinops"] = measure(curvlinops_kfac(model, dataset, args.batch_size), args.repeats, device)
        epoch = rows["sgd epoch"][0]
        print(f"\n[{name}] {n_params:,} parameters")
        for label, (seconds, peak) in rows.items():
            print(f"  {label:16s} {seconds:8.3f} s  ({seconds / epoch:5.2f} x epoch)  peak +{peak:8.1f} MiB")
        if "curvlinops" in rows:
            ratio = rows["ours"][0] / rows["curvlinops"][0]
            print(f"  ours / curvlinops = {ratio:.2f}")


if __name__ == "__main__":
    main()
