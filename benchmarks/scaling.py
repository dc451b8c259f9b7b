"""Data-parallel scaling of the KFAC pass: 1 process vs 2 processes (gloo, CPU) on the same CIFAR-10 images.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --n-images 2048 --alpha 4 --repeats 5

For each world size the script spawns that many processes (each limited to ``--threads`` intra-op threads),
loads the first ``--n-images`` training images with ``ella.data.load_dataset`` from ``--data-dir``, builds the
paper's network at width ``--alpha`` with ``ella.models.build_model`` (same seed everywhere), and times the KFAC
pass exactly as distributed training runs it: each rank fits KFAC on its shard (``TensorLoader`` with
``pad_shards=False``, batches of ``--kfac-batch-size``), then the factors, loss and ``n_data`` are all-reduced.
A pass's time is the slowest rank's; the script prints medians (and minima) over ``--repeats`` after one
warm-up pass, the all-reduce's share, the speed-up ``t(1) / t(2)``, and checks that both world sizes give the
same curvature (summed loss and the trace of every factor).

On a 2-core machine the 2 processes compete for the same 2 cores with everything else running (the load
average is printed before and after): the speed-up is bounded by 2 and is lower on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ella import distributed
from ella.cli import positive_int, run_script
from ella.data import TensorLoader, load_dataset
from ella.models import LAYER_NAMES, build_model
from kfac import fit_kfac


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds``."""
    if not distributed.is_distributed():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _timed_pass(model: torch.nn.Module, loader: TensorLoader) -> tuple[float, float, object]:
    """(local KFAC seconds, total seconds including the all-reduce, reduced curvature), slowest rank."""
    distributed.barrier()
    start = time.perf_counter()
    kron = fit_kfac(model, loader)
    local = time.perf_counter() - start
    distributed.all_reduce_curvature(kron)
    total = time.perf_counter() - start
    return _slowest(local), _slowest(total), kron


def _worker(rank: int, port: int, world: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = distributed.setup("cpu")
    torch.manual_seed(0)
    data = load_dataset("cifar10", args.data_dir, n_train=args.n_images, n_valid=10, seed=0, device=device)
    model = build_model(args.layer, data.in_channels, data.n_classes, args.alpha).to(device)
    loader = TensorLoader(*data.train, args.kfac_batch_size, rank=rank, world_size=world, pad_shards=False)
    _timed_pass(model, loader)  # warm-up
    local, total = [], []
    for _ in range(args.repeats):
        t_local, t_total, kron = _timed_pass(model, loader)
        local.append(t_local)
        total.append(t_total)
    if distributed.is_main():
        traces = [float(f.diagonal(dim1=-2, dim2=-1).sum()) for b in kron.blocks.values()
                  for f in (b.out_factors, b.in_factors) if f is not None]
        summary = {"local": local, "total": total, "loss": float(kron.loss), "n_data": kron.n_data,
                   "traces": traces, "n_params": sum(p.numel() for p in model.parameters())}
        Path(out, f"world{world}.json").write_text(json.dumps(summary))
    distributed.finish()


def _max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=positive_int, default=2048,
                        help="CIFAR-10 training images in the KFAC pass (default: 2048)")
    parser.add_argument("--alpha", type=positive_int, default=4, help="network width (the paper uses 10; default: 4)")
    parser.add_argument("--layer", default="ffc_conv", choices=LAYER_NAMES,
                        help="relaxed layer of every block (default: ffc_conv)")
    parser.add_argument("--kfac-batch-size", type=positive_int, default=150,
                        help="batch size of the KFAC pass (default: 150, the paper's)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes after one warm-up (default: 5)")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads per process (default: 1)")
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: $ELLA_DATA, then ./data)")
    args = parser.parse_args()

    print(f"KFAC pass ({args.layer}, alpha={args.alpha}) on {args.n_images} CIFAR-10 images, "
          f"KFAC batch {args.kfac_batch_size}, {args.threads} thread(s) per process, {os.cpu_count()} cores")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    # missing data or a bad --n-images fail here, with a message, rather than inside the spawned workers
    load_dataset("cifar10", args.data_dir, n_train=args.n_images, n_valid=10, seed=0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.spawn(_worker, args=(_free_port(), world, args, tmp), nprocs=world, join=True)
            results[world] = json.loads(Path(tmp, f"world{world}.json").read_text())
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"network: {results[1]['n_params']:,} parameters")
    print(f"{'processes':>9}  {'median s':>9}  {'min s':>7}  {'all-reduce share':>16}")
    for world, r in results.items():
        share = 1.0 - statistics.median(r["local"]) / statistics.median(r["total"])
        print(f"{world:>9}  {statistics.median(r['total']):>9.3f}  {min(r['total']):>7.3f}  {share:>15.1%}")
    speedup = statistics.median(results[1]["total"]) / statistics.median(results[2]["total"])
    print(f"speed-up t(1)/t(2) (medians): {speedup:.2f}x  (ideal 2x)")
    same_loss = abs(results[1]["loss"] - results[2]["loss"]) / abs(results[1]["loss"])
    print(f"same curvature: n_data {results[1]['n_data']} vs {results[2]['n_data']}, loss rel. diff {same_loss:.1e}, "
          f"max factor-trace rel. diff {_max_relative_difference(results[1]['traces'], results[2]['traces']):.1e}")
    print("note: both processes run on the same 2-core machine and compete with each other (and with any other "
          "load), so 2x is the ceiling; a busy machine makes these numbers noisy.")


if __name__ == "__main__":
    run_script(main)
