"""Speed of our exact-GGN KFAC pass vs one SGD epoch and vs curvlinops' KFAC, on real CIFAR-10 images.

Example (the figures of docs/kfac.md come from this command; data from --data-dir, else $ELLA_DATA, else ./data):

    OMP_NUM_THREADS=1 python benchmarks/kfac_speed.py --n-images 2048 --alpha 4 --repeats 7 --threads 1 --skip-variant

For each network (``conv`` and ``ffc_conv`` from ``ella.models.build_model``) it prints median wall-clock
times over ``--repeats`` interleaved rounds (each round runs every step once, so a slow phase of a noisy machine
slows all of them; ratios are medians of the same-round ratios) of: one SGD epoch (batch 128, momentum 0.9);
our exact-GGN KFAC pass (default: one backward per direction) and, unless ``--skip-variant``, the same with one
vmapped backward (``backward="batched"``); curvlinops' ``KFACLinearOperator`` (type-2 = exact GGN, expand) on the
CONV network (it supports only stock modules, so it runs the network's stock form,
``ella.layers.with_stock_strided_convs``: the stride-2 CONV paths as ``nn.Conv2d(stride=2)`` on phase windows
instead of stride-1 convolutions of phase stacks; same function and factors); the ratios; and the peak extra resident memory of each step
(sampled from /proc, CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). ``--stages`` adds two parts of our pass
(indented): its recording forward alone, and with the backward of every square-root direction.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ella.cli import positive_int, run_script
from ella.data import TensorLoader, load_dataset
from ella.distributed import parse_device
from ella.layers import with_stock_strided_convs
from ella.models import build_model
from kfac.capture import Recorder, output_gradients
from kfac.fit import fit_kfac
from kfac.rules import curvature_modules
from kfac.sqrt_hessian import hessian_sqrt

Images = tuple[torch.Tensor, torch.Tensor]


def load_cifar(n_images: int, data_dir: str | None, device: torch.device) -> Images:
    """A seeded class-balanced subset of ``n_images`` CIFAR-10 training images, normalised as for training:
    ``x (N, 3, 32, 32)``, ``y (N,)``."""
    return load_dataset("cifar10", data_dir, n_train=n_images, n_valid=10, seed=0, device=device).train


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


@dataclass
class Timing:
    """Seconds of every repeat, and the largest peak extra memory (MiB), of one step."""

    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, Timing]:
    """Time every step ``repeats`` times, interleaved (round ``r`` runs each step once, in order) after one
    warm-up of each, so that slow phases of a noisy machine hit all steps alike; see :func:`median_ratio`."""
    timings = {label: Timing() for label in steps}
    for fn in steps.values():
        fn()
    for _ in range(repeats):
        for label, fn in steps.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings[label].seconds.append(time.perf_counter() - start)
            timings[label].peak_mb = max(timings[label].peak_mb, mem.peak_mb)
    return timings


def median_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a``'s time over ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(a.seconds, b.seconds))


def sgd_epoch(model: nn.Module, data: Images, batch_size: int) -> Callable[[], None]:
    """One epoch of SGD steps (momentum 0.9) over shuffled, unaugmented mini-batches."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loader = TensorLoader(*data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    return run


def ours(model: nn.Module, data: Images, batch_size: int, **options) -> Callable[[], object]:
    loader = TensorLoader(*data, batch_size)
    return lambda: fit_kfac(model, loader, "classification", "ggn", **options)


def ours_without_factors(model: nn.Module, data: Images, batch_size: int, backward: bool) -> Callable[[], None]:
    """Our pass up to the factors: the recording forward of every batch, and with ``backward`` the backward of
    every loss-Hessian square-root direction to the recorded outputs, the gradients discarded (what is left of
    ``ours`` is the factor work)."""
    loader = TensorLoader(*data, batch_size)
    modules = {name: module for name, (module, _) in curvature_modules(model).items()}

    def run() -> None:
        for x, y in loader:
            with torch.enable_grad(), Recorder(modules) as recorder:
                logits = model(x)
            if backward:
                seeds = hessian_sqrt(logits, y, "classification", "ggn")
                output_gradients(logits, list(recorder.records.values()), seeds, lambda i, grads: None)

    return run


def curvlinops_kfac(model: nn.Module, data: Images, batch_size: int) -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    loader = TensorLoader(*data, batch_size)
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
            num_data=len(data[1]),
            num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()
        return op

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: $ELLA_DATA, then ./data)")
    parser.add_argument("--n-images", type=positive_int, default=2048, help="class-balanced CIFAR-10 images (default: 2048)")
    parser.add_argument("--alpha", type=positive_int, default=4, help="network width alpha (default: 4; the paper uses 10)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds after a warm-up (default: 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="batch size of both steps (default: 128)")
    parser.add_argument(
        "--networks", default="conv,ffc_conv", help="comma-separated ella.models layer names (default: conv,ffc_conv)"
    )
    parser.add_argument(
        "--skip-variant", "--skip-loop", action="store_true",
        help="skip the vmapped-backward variant (--skip-loop is the old name, from when the loop was the variant)",
    )
    parser.add_argument(
        "--stages", action="store_true",
        help="also time our pass's recording forward alone and with the backward of every direction (gradients "
        "discarded); the rest of the pass is the factor work",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    data = load_cifar(args.n_images, args.data_dir, device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.n_images} CIFAR-10 images, alpha {args.alpha}, batch {args.batch_size}, repeats {args.repeats}")
    for name in args.networks.split(","):
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, n_classes=10, alpha=args.alpha).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        steps = {"sgd epoch": sgd_epoch(model, data, args.batch_size), "ours": ours(model, data, args.batch_size)}
        if not args.skip_variant:
            steps["ours (vmapped)"] = ours(model, data, args.batch_size, backward="batched")
        if args.stages:
            steps["  forward"] = ours_without_factors(model, data, args.batch_size, backward=False)
            steps["  + backward"] = ours_without_factors(model, data, args.batch_size, backward=True)
        if name == "conv":
            steps["curvlinops"] = curvlinops_kfac(with_stock_strided_convs(model), data, args.batch_size)
        rows = measure(steps, args.repeats, device)
        epoch = rows["sgd epoch"]
        print(f"\n[{name}] {n_params:,} parameters (times: medians; ratios: medians of same-round ratios)")
        for label, timing in rows.items():
            print(f"  {label:16s} {timing.median:8.3f} s  ({median_ratio(timing, epoch):5.2f} x epoch)  "
                  f"peak +{timing.peak_mb:8.1f} MiB")
        if "curvlinops" in rows:
            print(f"  ours / curvlinops = {median_ratio(rows['ours'], rows['curvlinops']):.2f}")


if __name__ == "__main__":
    run_script(main)
