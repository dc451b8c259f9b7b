"""Data-parallel runs on 2 CPU processes (gloo) against single-process ground truth.

- sharding of ``TensorLoader`` against ``torch.utils.data.DistributedSampler``;
- KFAC factors, loss, ``n_data``, the log marginal likelihood and one hyper-step from 2 shards equal the
  single-process fit on all the data (float64, 1e-6), and precisions are bit-identical on both ranks; likewise
  two ray-profiled hyper-steps (``ella.bilinear_ray``) on the S-FC paths;
- ``torchrun --nproc_per_node=2 experiments/cifar10.py`` with ``batch_size`` 8 (no augmentation) reproduces the
  single-process run with ``batch_size`` 16 (the same global batches) and writes the documented files once;
- an interrupted 2-process run resumes to exactly the uninterrupted one, and rank 1 writes nothing;
- Ctrl-C under torchrun prints one line with a torchrun command that finishes the run, and a resume with another
  number of processes is refused; a killed process leaves a resume command too, a frozen one a time-out that
  says what the others waited for.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

import ella.train as train_module
from ella import distributed
from ella.bilinear_ray import bilinear_rays, optimise_precisions
from ella.data import TensorLoader
from ella.marglik import effective_parameters, fit_laplace, neg_log_marglik, optimise_prior
from ella.models import build_model
from ella.priors import Prior
from ella.train import TrainConfig, Trainer, train
from kfac import fit_kfac
from test_train import (
    _Interrupt,
    _raise_in_epoch,
    _start_and_wait_for_two_epochs,
    _tiny_config,
    _without_timing,
    _write_tiny_cifar,
)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """Make this spawned process look like a torchrun worker and join the group the way ella does."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    assert distributed.is_distributed() and distributed.rank() == rank


def _float64_model() -> tuple[torch.nn.Module, Prior]:
    torch.manual_seed(0)
    model = build_model("sfc_sconv", 3, 10, alpha=1).double()  # kron, direct-sum and bias blocks
    prior = Prior(model).double()
    with torch.no_grad():
        prior.log_precision.copy_(torch.linspace(-1.0, 1.5, len(prior.log_precision), dtype=torch.float64))
    return model, prior


def _float64_data(n: int = 41) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=generator, dtype=torch.float64), torch.arange(n) % 10


def _fit_and_step(model, prior, loader, sharded: bool) -> dict:
    fit = fit_laplace(model, loader, prior, sharded=sharded)
    with torch.no_grad():
        value = float(neg_log_marglik(fit, prior))
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    after = optimise_prior(fit, prior, optimizer, steps=1)
    return {
        "neg_log_marglik": value, "after_step": after, "loss_sum": fit.loss_sum, "n_data": fit.n_data,
        "log_precision": prior.log_precision.detach().clone(),
        "effective": effective_parameters(fit, prior),
    }


# ----------------------------------------------------------------------------------------------------------
# sharding
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (11, 3), (2, 5)])
def test_shards_follow_distributed_sampler(n: int, world: int) -> None:
    x = torch.arange(n, dtype=torch.float64)[:, None]
    y = torch.arange(n)
    for rank in range(world):
        loader = TensorLoader(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(5), rank=rank, world_size=world)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        expected = [perm[i] for i in sampler]
        seen = torch.cat([yb for _, yb in loader]).tolist()
        assert seen == expected
        assert len(loader) == -(-len(sampler) // 3)
    exact = [yb for r in range(world) for _, yb in TensorLoader(x, y, 4, rank=r, world_size=world, pad_shards=False)]
    assert sorted(torch.cat(exact).tolist()) == list(range(n))


def test_unsharded_loader_is_unchanged_and_sharded_augmentation_differs_by_rank() -> None:
    x = torch.arange(12, dtype=torch.float64)[:, None, None, None].expand(12, 1, 2, 2).clone()
    y = torch.arange(12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    plain = TensorLoader(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(2))
    assert [yb.tolist() for _, yb in plain] == [perm[:5].tolist(), perm[5:10].tolist(), perm[10:].tolist()]

    def noise(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return xb + torch.rand(xb.shape[0], 1, 1, 1, generator=generator, dtype=xb.dtype)

    loaders = [TensorLoader(x, y, 3, shuffle=True, augment=noise, generator=torch.Generator().manual_seed(2),
                            rank=r, world_size=2) for r in range(2)]
    added = [torch.cat([xb[:, 0, 0, 0] - yb for xb, yb in loader]) for loader in loaders]
    assert not torch.allclose(added[0], added[1])
    assert torch.equal(loaders[0].generator.get_state(), loaders[1].generator.get_state())


# ----------------------------------------------------------------------------------------------------------
# KFAC, marginal likelihood and a hyper-step
# ----------------------------------------------------------------------------------------------------------
def _kfac_part(rank: int, out: Path) -> None:
    x, y = _float64_data()
    model, prior = _float64_model()
    loader = TensorLoader(x, y, 7, rank=rank, world_size=WORLD, pad_shards=False)
    kron = distributed.all_reduce_curvature(fit_kfac(model, loader))
    factors = {name: (b.out_factors, b.in_factors) for name, b in kron.blocks.items()}
    result = _fit_and_step(model, prior, loader, sharded=True)
    ray = _ray_steps(*_float64_model(), loader, sharded=True)
    torch.save({"factors": factors, "n_data": kron.n_data, "loss": float(kron.loss), **result, "ray": ray},
               out / f"rank{rank}.pt")


def test_sharded_kfac_marglik_and_hyper_step_equal_single_process(two_process_results: Path) -> None:
    tmp_path = two_process_results
    x, y = _float64_data()
    model, prior = _float64_model()
    full = TensorLoader(x, y, 25)
    kron = fit_kfac(model, full)
    reference = _fit_and_step(model, prior, full, sharded=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for got in ranks:
        assert got["n_data"] == kron.n_data == len(y)
        assert got["loss"] == pytest.approx(float(kron.loss), rel=1e-6)
        assert list(got["factors"]) == kron.block_names
        for name, block in kron.blocks.items():
            out_factor, in_factor = got["factors"][name]
            torch.testing.assert_close(out_factor, block.out_factors, rtol=1e-6, atol=1e-12)
            if block.in_factors is not None:
                torch.testing.assert_close(in_factor, block.in_factors, rtol=1e-6, atol=1e-12)
        for key in ("neg_log_marglik", "after_step", "loss_sum"):
            assert got[key] == pytest.approx(reference[key], rel=1e-6), key
        assert got["n_data"] == reference["n_data"]
        torch.testing.assert_close(got["log_precision"], reference["log_precision"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["effective"], reference["effective"], rtol=1e-6, atol=1e-9)
    assert not torch.equal(reference["log_precision"], _float64_model()[1].log_precision.detach())  # it moved
    assert torch.equal(ranks[0]["log_precision"], ranks[1]["log_precision"])  # in sync without communication


def _ray_steps(model, prior, loader, sharded: bool) -> dict:
    """Two ray-profiled hyper-steps (the model's S-FC paths have rays): their objective and the precisions."""
    fit = fit_laplace(model, loader, prior, sharded=sharded)
    rays = len(bilinear_rays(model, prior, fit))
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    value = optimise_precisions("ray", fit, prior, model, optimizer, steps=2)
    return {"rays": rays, "value": value, "log_precision": prior.log_precision.detach().clone()}


def test_sharded_ray_steps_equal_single_process(two_process_results: Path) -> None:
    x, y = _float64_data()
    model, prior = _float64_model()
    reference = _ray_steps(model, prior, TensorLoader(x, y, 25), sharded=False)
    ranks = [torch.load(two_process_results / f"rank{r}.pt")["ray"] for r in range(WORLD)]
    assert reference["rays"] == 8  # one per block
    for got in ranks:
        assert got["rays"] == reference["rays"]
        assert got["value"] == pytest.approx(reference["value"], rel=1e-6)
        torch.testing.assert_close(got["log_precision"], reference["log_precision"], rtol=1e-6, atol=1e-9)
    assert torch.equal(ranks[0]["log_precision"], ranks[1]["log_precision"])  # in sync without communication


# ----------------------------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return _without_timing([json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()])


def _assert_rows_close(ours: list[dict], theirs: list[dict], rel: float) -> None:
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs]
    for a, b in zip(ours, theirs):
        for key, value in a.items():
            assert value == pytest.approx(b[key], rel=rel), (a["epoch"], key)


def test_torchrun_run_equals_single_process_run_and_writes_once(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data")
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        str(REPO / "experiments" / "cifar10.py"), "--layer", "conv", "--laplace", "--alpha", "1", "--epochs", "4",
        "--batch-size", "8", "--n-train", "40", "--n-valid", "10", "--burn-in", "2", "--marglik-every", "1",
        "--hyper-steps", "3", "--kfac-batch-size", "25", "--seed", "3", "--no-augment", "--optimizer", "sgd",
        "--lr", "0.01", "--cifar-test", "exact", "--data-dir", str(data), "--device", "cpu", "--out", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("results in") == 1  # the summary is printed by rank 0 only
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in ("batch_size", "augment", "optimizer", "epochs", "laplace")} == {
        "batch_size": 8, "augment": False, "optimizer": "sgd", "epochs": 4, "laplace": True}
    config = TrainConfig(**{**saved, "batch_size": 16})  # the same global batches in a single process
    reference = train(config, tmp_path / "single")

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "single")) for p in (tmp_path / "single").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")]
    _assert_rows_close(_rows(out), _rows(tmp_path / "single"), rel=1e-5)  # one row per epoch, same values
    final = json.loads((out / "final.json").read_text())
    assert final["test"] == pytest.approx(reference["test"], rel=1e-5)
    assert final["precisions"] == pytest.approx(reference["precisions"], rel=1e-5)
    assert final["effective_layer_types"] == reference["effective_layer_types"]
    report = json.loads((out / "effective_parameters.json").read_text())
    theirs = json.loads((tmp_path / "single" / "effective_parameters.json").read_text())
    assert [r["path"] for r in report["paths"]] == [r["path"] for r in theirs["paths"]]


def _record_writes(writes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("write_text", "save_checkpoint", "write_metrics", "write_report", "plot_relative"):
        original = getattr(train_module, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            writes.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(train_module, name, recorded)


def _resume_part(rank: int, root_path: Path, config: TrainConfig) -> None:
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _record_writes(writes, monkeypatch)
        straight = train(config, root_path / "straight")
        original = _raise_in_epoch(monkeypatch, 3, _Interrupt)
        with pytest.raises(_Interrupt):
            train(config, root_path / "resumed")
        monkeypatch.setattr(Trainer, "train_epoch", original)
        resumed = train(config, root_path / "resumed", resume=True)
    (root_path / f"rank{rank}.json").write_text(json.dumps({"straight": straight, "resumed": resumed, "writes": writes}))


def _worker(rank: int, port: int, root: str) -> None:
    """Both 2-process checks in one spawn (starting processes dominates their cost)."""
    _join(rank, port)
    root_path = Path(root)
    _kfac_part(rank, root_path)
    _resume_part(rank, root_path, _tiny_config(root_path / "data", epochs=3, batch_size=8, augment=True))
    distributed.finish()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_processes")
    _write_tiny_cifar(root / "data")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def test_interrupted_distributed_run_resumes_exactly_and_only_rank0_writes(two_process_results: Path) -> None:
    tmp_path = two_process_results
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[1]["writes"] == [] and {"save_checkpoint", "write_metrics", "write_report"} <= set(ranks[0]["writes"])
    for got in ranks:  # every rank returns rank 0's final metrics
        assert got["resumed"]["test"] == got["straight"]["test"] == ranks[0]["straight"]["test"]
        assert got["resumed"]["precisions"] == got["straight"]["precisions"]
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    assert [row["epoch"] for row in _rows(tmp_path / "resumed")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# interrupted, killed and frozen processes
# ----------------------------------------------------------------------------------------------------------
def _torchrun_script(data: Path, out: Path, epochs: int) -> list[str]:
    return [str(REPO / "experiments" / "cifar10.py"), "--layer", "conv", "--alpha", "1", "--epochs", str(epochs),
            "--n-train", "100", "--n-valid", "20", "--cifar-test", "exact", "--data-dir", str(data), "--device",
            "cpu", "--out", str(out), "--checkpoint-every", "1"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_ctrl_c_under_torchrun_prints_a_torchrun_command_that_finishes_the_run(tmp_path: Path) -> None:
    """Issue 30, first table: Ctrl-C under ``torchrun --nproc_per_node=2``. One line (rank 0 speaks for both)
    with the checkpoint's epoch and a resume command that keeps torchrun and its processes; the workers end with
    130; one process refuses to continue the run; the printed command finishes it."""
    data = _write_tiny_cifar(tmp_path / "data", n_train=200)
    out = tmp_path / "run"
    script = _torchrun_script(data, out, epochs=30)
    process = _start_and_wait_for_two_epochs(_torchrun("--standalone", f"--nproc_per_node={WORLD}", *script),
                                             _env(), out)
    process.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun, which passes it to the workers
    err = process.communicate(timeout=120)[1]
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, err
    match = re.fullmatch(rf"interrupted (in|after) epoch (\d+) of 30; the checkpoint in {out} holds epoch (\d+); "
                         r"continue with: (.*)", said[0])
    assert match and int(match[3]) == int(match[2]) - (match[1] == "in"), said[0]
    assert match[4] == shlex.join(["torchrun", "--standalone", f"--nproc_per_node={WORLD}", *script, "--resume"])
    assert process.returncode != 0  # torchrun's own status for a stop by a signal (the workers end with 130)

    single = subprocess.run([sys.executable, *script, "--resume"], env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 2
    assert (f"error: --resume with 1 process, but {out / 'checkpoint.pt'} was written by a run of 2 processes "
            f"(torchrun --nproc_per_node=2): the batches and the result depend on it") in single.stderr

    done = subprocess.run(_torchrun(*shlex.split(match[4])[1:]), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [row["epoch"] for row in _rows(out)] == list(range(1, 31))


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of torchrun's worker of ``rank`` (from the workers' environments)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_a_killed_torchrun_process_leaves_a_resume_command(tmp_path: Path) -> None:
    data = _write_tiny_cifar(tmp_path / "data", n_train=200)
    out = tmp_path / "run"
    script = _torchrun_script(data, out, epochs=30)
    process = _start_and_wait_for_two_epochs(_torchrun("--standalone", f"--nproc_per_node={WORLD}", *script),
                                             _env(), out)
    os.kill(_worker_pid(process, 1), signal.SIGKILL)
    err = process.communicate(timeout=120)[1]
    assert process.returncode != 0
    resume = shlex.join(["torchrun", "--standalone", f"--nproc_per_node={WORLD}", *script, "--resume"])
    assert re.search(rf"the checkpoint in {out} holds epoch \d+; continue with: {re.escape(resume)}", err), err


def _frozen_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.setup("cpu", timeout=2.0)
    if rank == 1:
        time.sleep(6)  # frozen while rank 0 waits for its share of the loss
        return
    start = time.monotonic()
    try:
        distributed.all_reduce_sum(1.0)
    except distributed.ProcessGroupError as error:
        Path(root, "error.json").write_text(json.dumps({"message": str(error), "seconds": time.monotonic() - start}))


def test_a_frozen_process_ends_the_wait_with_a_message(tmp_path: Path) -> None:
    mp.spawn(_frozen_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["seconds"] < 5
    assert error["message"].startswith("process 0 of 2 stopped waiting for the others (summing the training loss): ")
    assert "Timed out" in error["message"] and error["message"].endswith("another process has ended, been killed, "
                                                                         "or hangs")
