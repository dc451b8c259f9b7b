"""The GPU check, for a short visit to a GPU machine without internet access (a cluster node, say).

Here, where the data is, one command prepares a self-contained folder: this repository's code, a CIFAR-10
subset (11,000 training and 1,000 exact test images, under 40 MB) and, if you say where they are, the wheels
to install there::

    python benchmarks/gpu_check.py prepare FOLDER [--data-dir DIR] [--wheels DIR]

Copy FOLDER to the GPU machine (install the wheels there if needed: FOLDER/README.txt says how), then::

    python FOLDER/repo/benchmarks/gpu_check.py run FOLDER

runs these stages, each in its own process with a time limit, going on after one that fails or runs out of
time, and writes ``FOLDER/results/summary.json`` and ``summary.txt`` (each stage's output in ``logs/``):

======================  ============================================================================  =====
stage                   what                                                                          limit
======================  ============================================================================  =====
environment             GPU model, memory, driver, torch, CUDA, cuDNN                                 20 s
cuda tests              tests/test_cuda.py (KFAC on CUDA against the CPU, captured against eager       120 s
                        steps, a precision changed in place between replays)
resume                  tests/test_cuda.py's resume across capture modes and onto the CPU             60 s
train speed             benchmarks/train_speed.py at width 10 on 10,000 images, F-FC+CONV and CONV     120 s
gpu preset              experiments/cifar10.py --preset gpu, F-FC+CONV Laplace, 2 epochs, 2 rounds     90 s
fc+conv                 FC+CONV at width 10 (134 M parameters, Adam): peak memory and step time,       60 s
                        captured and plain
======================  ============================================================================  =====

The limits add up to 470 s, under 8 minutes on one GPU; they are estimates (no GPU was measured when they were
set), and ``--budget`` (default 480 s) caps the whole check: a stage gets at most what is left.
``--tiny --device cpu`` runs every stage at a tiny size on the CPU (the CUDA tests then skip), which is how
tests/test_gpu_check.py checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ella, wherever this script is started from
from ella.options import COUNT, POSITIVE  # noqa: E402  (numpy only: no torch for the commands that need none)

CODE = ("ella", "kfac", "tests", "benchmarks", "experiments", "pyproject.toml", "README.md")  # what `prepare` copies
N_TRAIN, N_TEST = 11_000, 1_000  # train_speed.py needs 10,000 training images and 1,000 for validation
MAX_DATA_BYTES = 40 * 2**20
IMAGE_BYTES = 32 * 32 * 3  # one uint8 CIFAR-10 image


@dataclass
class Stage:
    """One stage: ``command`` run in the repository with ``limit`` seconds; ``result``: a JSON file the stage
    writes, read into the summary."""

    name: str
    command: list[str]
    limit: float
    result: Path | None = None


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timed out, skipped (the CUDA tests without a GPU), not run (no time left)
    seconds: float
    limit: float
    returncode: int | None
    command: str
    log: str
    result: dict | None = field(default=None)
    tail: str = ""


def check_data_size(n_train: int, n_test: int) -> None:
    """A ValueError, naming the flags, where ``n_train`` and ``n_test`` images make more than
    :data:`MAX_DATA_BYTES`."""
    size = (n_train + n_test) * IMAGE_BYTES
    if size > MAX_DATA_BYTES:
        raise ValueError(f"--n-train {n_train} and --n-test {n_test} make {size / 2**20:.1f} MiB of images, more than "
                         f"{MAX_DATA_BYTES // 2**20} MiB (at most {MAX_DATA_BYTES // IMAGE_BYTES} images in all)")


def prepare(folder: Path, data_dir: str | None, wheels: Path | None, n_train: int = N_TRAIN, n_test: int = N_TEST) -> None:
    """Write the self-contained folder: ``repo/`` (the code), ``data/cifar10.npz`` (the first ``n_train``
    training and ``n_test`` test images), ``wheels/`` (the ``.whl`` files of ``wheels``, if given). Every check
    (a ValueError or FileNotFoundError) comes before anything is written."""
    import numpy as np

    from ella.data.readers import read_cifar10

    check_data_size(n_train, n_test)
    x_train, y_train, x_test, y_test = read_cifar10(data_dir)
    if len(x_train) < n_train or len(x_test) < n_test:
        raise ValueError(f"the CIFAR-10 in {data_dir or 'the data folder'} has {len(x_train)} training and "
                         f"{len(x_test)} test images; the check needs {n_train} and {n_test}")
    found = [] if wheels is None else sorted(wheels.glob("*.whl"))
    if wheels is not None and not found:
        raise ValueError(f"--wheels {wheels} holds no .whl file")
    folder.mkdir(parents=True, exist_ok=True)
    repo = folder / "repo"
    for name in CODE:
        source, target = ROOT / name, repo / name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (folder / "data").mkdir(exist_ok=True)
    target = folder / "data" / "cifar10.npz"
    np.savez(target, x_train=x_train[:n_train], y_train=y_train[:n_train], x_test=x_test[:n_test],
             y_test=y_test[:n_test])
    install = ""
    if found:
        (folder / "wheels").mkdir(exist_ok=True)
        for wheel in found:
            shutil.copy2(wheel, folder / "wheels" / wheel.name)
        install = ("Install the wheels first, from the folder that holds it (no internet needed):\n"
                   f"    python -m pip install --no-index --find-links {folder.name}/wheels {folder.name}/wheels/*.whl\n")
    (folder / "README.txt").write_text(
        f"The GPU check of ella, prepared {time.strftime('%Y-%m-%d %H:%M')}.\n{install}"
        f"Run, from the folder that holds {folder.name} (at most about 8 minutes):\n    python {folder.name}/repo/benchmarks/gpu_check.py run {folder.name}\n"
        f"Results: {folder.name}/results/summary.txt and summary.json (logs in results/logs/).\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder} ({size / 2**20:.1f} MiB; data {target.stat().st_size / 2**20:.1f} MiB); "
          f"on the GPU machine run: python {folder}/repo/benchmarks/gpu_check.py run {folder}")


def stages(folder: Path, out: Path, device: str, tiny: bool) -> list[Stage]:
    """The stages of the check (see the module docstring); ``tiny``: each at a tiny size (for the CPU test)."""
    py, data, results = sys.executable, str(folder / "data"), out
    script = str(Path(__file__).resolve())
    alpha, images = ("1", "64") if tiny else ("10", "10000")
    n_valid = "16" if tiny else "1000"
    return [
        Stage("environment", [py, script, "environment", "--device", device, "--json", str(results / "environment.json")],
              20, results / "environment.json"),
        Stage("cuda tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k",
                             "not resumes_across"], 120),
        Stage("resume", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k", "resumes_across"],
              60),
        Stage("train speed", [py, "benchmarks/train_speed.py", "--device", device, "--alpha", alpha, "--n-images",
                              images, "--layer", *(["ffc_conv"] if tiny else ["ffc_conv", "conv"]),
                              "--repeats", "1" if tiny else "3",
                              "--data-dir", data], 120),
        Stage("gpu preset", [py, "experiments/cifar10.py", "--layer", "ffc_conv", "--laplace", "--preset", "gpu",
                             "--epochs", "2", "--burn-in", "1", "--marglik-every", "1", "--n-train", images,
                             "--n-valid", n_valid, "--cifar-test", "exact", "--data-dir", data, "--device", device,
                             "--out", str(out / "gpu-preset"), *(["--alpha", alpha] if tiny else [])],
              90, out / "gpu-preset" / "final.json"),
        Stage("fc+conv", [py, script, "fc-conv", "--device", device, "--alpha", alpha, "--n-images",
                          "256" if tiny else "2560", "--json", str(results / "fc_conv.json")], 60,
              results / "fc_conv.json"),
    ]


def run_stage(stage: Stage, limit: float, logs: Path, env: dict) -> Outcome:
    """Run ``stage`` for at most ``limit`` seconds; its output goes to ``logs/<name>.log``."""
    log = logs / f"{stage.name.replace(' ', '_').replace('+', '')}.log"
    shown = " ".join(stage.command)
    if limit <= 1:
        return Outcome(stage.name, "not run", 0.0, stage.limit, None, shown, str(log), tail="no time left in --budget")
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the stage and whatever it started
            process.wait()
            returncode = None
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    tail = "\n".join(text.strip().splitlines()[-15:])
    if returncode is None:
        status = "timed out"
    elif returncode != 0:
        status = "failed"
    elif stage.command[1:3] == ["-m", "pytest"] and " passed" not in tail and " skipped" in tail:
        status = "skipped"
    else:
        status = "passed"
    result = None
    if stage.result is not None and stage.result.is_file():
        result = json.loads(stage.result.read_text())
        if stage.name == "gpu preset":  # what matters of a run's final.json
            result = {key: result.get(key) for key in ("test", "valid", "neg_log_marglik", "training", "seconds")}
    return Outcome(stage.name, status, round(seconds, 1), stage.limit, returncode, shown, str(log), result, tail)


def run_check(out: Path, plan: list[Stage], budget: float, env: dict | None = None) -> list[Outcome]:
    """Run every stage of ``plan`` in order within ``budget`` seconds in all; write ``summary.json`` and
    ``summary.txt`` into ``out`` after every stage (so a check cut short still leaves one)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    deadline = time.perf_counter() + budget
    outcomes: list[Outcome] = []
    for stage in plan:
        limit = min(stage.limit, deadline - time.perf_counter())
        outcomes.append(run_stage(stage, limit, logs, env))
        print(f"{stage.name:12s} {outcomes[-1].status:9s} {outcomes[-1].seconds:6.1f} s", flush=True)
        write_summary(out, outcomes, budget)
    return outcomes


def write_summary(out: Path, outcomes: list[Outcome], budget: float) -> None:
    summary = {"budget_s": budget, "stages": [asdict(o) for o in outcomes]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"ella GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}, budget {budget:.0f} s", ""]
    for o in outcomes:
        lines.append(f"== {o.name}: {o.status} in {o.seconds:.1f} s (limit {o.limit:.0f} s)")
        lines.append(f"   $ {o.command}")
        if o.result is not None:
            lines.append("   " + json.dumps(o.result))
        lines.extend("   " + line for line in o.tail.splitlines())
        lines.append("")
    (out / "summary.txt").write_text("\n".join(lines))


def environment(device: str) -> dict:
    """The machine: GPU model, memory and driver, torch, CUDA and cuDNN versions, CPU threads."""
    import torch

    from ella.static_step import device_description

    described = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 **device_description(torch.device(device))}
    if torch.device(device).type == "cuda":
        described["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10)
            described["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
    return described


def fc_conv(device: str, alpha: int, n_images: int) -> dict:
    """FC+CONV trained with Adam on random images, captured and plain (on the CPU: plain only): peak memory and
    seconds per step of an epoch after two (warm-up and recording) epochs."""
    import torch

    from ella.config import TrainConfig
    from ella.models import build_model
    from ella.train import Learner

    torch.manual_seed(0)
    x, y = torch.randn(n_images, 3, 32, 32), torch.randint(0, 10, (n_images,))
    measured = {"alpha": alpha, "images": n_images, "batch": 128}
    for capture in (True, False) if torch.device(device).type == "cuda" else (False,):
        config = TrainConfig(layer="fc_conv", alpha=alpha, optimizer="adam", laplace=False, epochs=3, device=device,
                             capture=capture)
        model = build_model("fc_conv", 3, 10, alpha)
        learner = Learner(model, config, (x, y))
        cuda = learner.device.type == "cuda"
        for _ in range(2):
            learner.train_epoch()
        if cuda:
            torch.cuda.synchronize(learner.device)
            torch.cuda.reset_peak_memory_stats(learner.device)
        start = time.perf_counter()
        learner.train_epoch()
        if cuda:
            torch.cuda.synchronize(learner.device)
        key = "captured" if capture else "plain"
        measured[key] = {"training": learner.training_path()["steps"],"seconds_per_step": (time.perf_counter() - start) / len(learner.train_loader),
                         "peak_mib": torch.cuda.max_memory_allocated(learner.device) / 2**20 if cuda else None}
        measured["parameters"] = sum(p.numel() for p in model.parameters())
        del learner, model
        if cuda:
            torch.cuda.empty_cache()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare,run}")
    p = commands.add_parser("prepare", help="write the self-contained folder (here, where the data is)")
    p.add_argument("folder", type=Path, help="the folder to write (created if needed)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (default: $ELLA_DATA, then ./data)")
    p.add_argument("--wheels", type=Path, default=None,
                   help="a folder of .whl files to take along (default: none, the GPU machine has the packages)")
    p.add_argument("--n-train", type=COUNT, default=N_TRAIN, help=f"training images (default: {N_TRAIN})")
    p.add_argument("--n-test", type=COUNT, default=N_TEST, help=f"exact test images (default: {N_TEST})")
    r = commands.add_parser("run", help="run the check (there, on the GPU machine)")
    r.add_argument("folder", type=Path, help="a folder written by the prepare command; the results go to its results/")
    r.add_argument("--device", default="cuda", help="the torch device every stage runs on (default: cuda)")
    r.add_argument("--budget", type=POSITIVE, default=480.0, help="seconds for the whole check (default: 480)")
    r.add_argument("--tiny", action="store_true", help="every stage at a tiny size (to test this script)")
    for name in ("environment", "fc-conv"):  # stages run in their own process, left out of the help (no help=)
        s = commands.add_parser(name)
        s.add_argument("--device", default="cuda", help="the torch device to describe or to train on (default: cuda)")
        s.add_argument("--json", type=Path, required=True, help="the JSON file the result is written to (required)")
        if name == "fc-conv":
            s.add_argument("--alpha", type=COUNT, default=10, help="width of the FC+CONV network (default: 10)")
            s.add_argument("--n-images", type=COUNT, default=2560, help="random images of an epoch (default: 2560)")
    parser.epilog = "\n".join(["the options of each command:", *(sub.format_help() for sub in (p, r))])
    args = parser.parse_args()
    if args.command == "prepare":
        try:
            prepare(args.folder, args.data_dir, args.wheels, args.n_train, args.n_test)
        except (ValueError, FileNotFoundError) as error:
            p.error(str(error))
    elif args.command == "run":
        if not (args.folder / "data" / "cifar10.npz").is_file():
            r.error(f"{args.folder} holds no data/cifar10.npz: write the folder first, where the data is, with "
                    f"python benchmarks/gpu_check.py prepare {args.folder}")
        out = args.folder.resolve() / "results"
        outcomes = run_check(out, stages(args.folder.resolve(), out, args.device, args.tiny), args.budget)
        print(f"summary: {out / 'summary.txt'}")
        sys.exit(0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1)
    else:
        result = environment(args.device) if args.command == "environment" else fc_conv(args.device, args.alpha,
                                                                                          args.n_images)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
