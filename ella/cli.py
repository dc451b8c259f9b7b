"""Command-line plumbing shared by the training experiments: flags, presets, output folders, logging.

A preset fills the :class:`~ella.train.TrainConfig`; any flag given explicitly overrides it. Every experiment
also runs data-parallel under ``torchrun --nproc_per_node=N experiments/<name>.py ...`` (see
:mod:`ella.distributed`); then only rank 0 prints and logs below warnings.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import Field, asdict, fields, replace
from pathlib import Path

from ella import distributed
from ella.bilinear_ray import RAY_MIN_SCALE
from ella.checkpoint import CheckpointError, OutputError, write_text
from ella.marglik import MarglikError
from ella.options import COUNT, OPTIONAL_COUNT, POSITIVE, Range, flag, is_option
from ella.config import TrainConfig, option_flags
from ella.train import Interrupted
from kfac import CurvatureError

DEFAULT_PRESET = "cpu"

# argparse ``type``s of the other scripts' numeric flags (argparse names the flag in its message)
positive_int = COUNT  # counts and sizes: an integer >= 1
nonnegative_int = OPTIONAL_COUNT  # counts that may be zero
positive_float = POSITIVE  # scales and rates: a finite number > 0
nonnegative_float = Range(float, 0)  # a finite number >= 0


def add_training_arguments(parser: argparse.ArgumentParser, presets: dict[str, dict],
                           default_preset: str = DEFAULT_PRESET, out_default: str = "see the script's description") -> None:
    """Add the flags every training experiment shares: ``--preset`` (``default_preset`` when not given), one flag
    per option field of :class:`~ella.train.TrainConfig` (see :mod:`ella.options`; its help shows the default it
    takes under the default preset), ``--out`` (its help shows ``out_default``, the folder the script writes to
    without it), ``--resume`` and ``--verbose``."""
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                        help=_preset_help(presets, default_preset))
    group = parser.add_argument_group("training options (a preset sets some of them; a flag given overrides it)")
    for item in fields(TrainConfig):
        if is_option(item):
            _add_option(group, item, presets[default_preset], default_preset)
    parser.add_argument("--out", type=Path, default=None, help=_escape(f"output folder (default: {out_default})"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")


def _add_option(group: argparse._ArgumentGroup, item: Field, preset: dict, preset_name: str) -> None:
    """The flag of the option field ``item``; its default is ``None``, so that a flag not given can be told apart
    from a preset's value."""
    text = item.metadata["help"]
    if isinstance(item.default, bool):  # a switch
        if item.name in preset and preset[item.name] != item.default:
            text += f" (already so with --preset {preset_name})"
        action = "store_false" if item.default else "store_true"
        group.add_argument(flag(item), dest=item.name, action=action, default=None, help=_escape(text))
        return
    if item.name in preset:
        text += f" (default: {preset[item.name]}, from --preset {preset_name})"
    elif item.default is not None and isinstance(item.default, (int, float, str)):
        text += f" (default: {item.default})"
    values = item.metadata["values"]
    group.add_argument(flag(item), dest=item.name, default=None, help=_escape(text),
                       type=values if isinstance(values, Range) else str,
                       choices=values if isinstance(values, tuple) else None)


def _preset_help(presets: dict[str, dict], default_preset: str) -> str:
    options = {item.name: item for item in fields(TrainConfig) if is_option(item)}

    def as_flags(values: dict) -> str:
        words = []
        for name, value in values.items():
            item = options[name]
            if not isinstance(item.default, bool):
                words.append(f"{flag(item)} {value}")
            elif value != item.default:
                words.append(flag(item))
        return " ".join(words)

    names = sorted(presets, key=lambda name: name != default_preset)
    listed = "; ".join(f"{name}{' (the default)' if name == default_preset else ''}: {as_flags(presets[name])}"
                       for name in names)
    return _escape(f"a named configuration; flags given explicitly override its values. {listed}")


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help texts with %


# option -> the option that overrides it when both are set
_OVERRIDDEN_BY = {"valid_fraction": "n_valid", "checkpoint_minutes": "checkpoint_every"}


def config_from_args(args: argparse.Namespace, presets: dict[str, dict], **fixed) -> TrainConfig:
    """Preset values, then explicit flags, then ``fixed`` (the experiment's own choices such as the dataset). A
    flag given explicitly also clears the preset's value of an option that would override it (``--valid-fraction``
    takes effect under a preset that sets ``--n-valid``; :func:`check_method_flags` refuses both given)."""
    values = dict(presets[args.preset])
    names = {item.name for item in fields(TrainConfig)}
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
            overriding = _OVERRIDDEN_BY.get(name)
            if overriding is not None and getattr(args, overriding, None) is None:
                values.pop(overriding, None)
    values.update(fixed)
    if values.get("device") is None:
        values.pop("device", None)
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


_ROUND_OPTIONS = ("marglik_method", "ray_min_scale", "burn_in", "marglik_every", "hyper_steps", "hyper_lr")
_REPORT_OPTIONS = ("curvature", "kfac_approx", "grouped_mode", "kfac_batch_size", "per_tensor_prior")


def check_method_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, config: TrainConfig,
                       laplace: bool | None = None) -> None:
    """Refuse (``parser.error``, exit status 2) a flag given explicitly that the runs would ignore: an option of
    the marginal-likelihood rounds (:data:`_ROUND_OPTIONS`) without a Laplace run (``laplace``: whether there is
    one, default ``config.laplace``); an option of the curvature or of the precision groups
    (:data:`_REPORT_OPTIONS`) without a Laplace run or ``--report``; ``--ray-min-scale`` with ``--marglik-method
    alternation``, ``--hyper-lr`` (Adam's step) with the ray (L-BFGS), and two flags of which one overrides the
    other (``--n-valid`` and ``--valid-fraction``, ``--checkpoint-every`` and ``--checkpoint-minutes``)."""
    learns = config.laplace if laplace is None else laplace
    flags = option_flags()

    def given(name: str) -> bool:
        return getattr(args, name, None) is not None

    for name, overriding in _OVERRIDDEN_BY.items():
        if given(name) and given(overriding):
            parser.error(f"{flags[overriding]} overrides {flags[name]}: give one of them")

    for name in _ROUND_OPTIONS:
        if given(name) and not learns:
            parser.error(f"{flags[name]} is an option of the marginal-likelihood rounds that --laplace adds; a MAP "
                         "run has none: add --laplace or leave it out")
    for name in _REPORT_OPTIONS:
        if given(name) and not (learns or config.report):
            parser.error(f"{flags[name]} acts on the Laplace fit, which a MAP run makes only for --report: add "
                         "--laplace or --report, or leave it out")
    if given("ray_min_scale") and config.marglik_method != "ray":
        parser.error("--ray-min-scale is the trust region of the ray (--marglik-method ray, the default); the "
                     "alternation has none: leave out one of them")
    if given("hyper_lr") and config.marglik_method == "ray":
        parser.error("--hyper-lr is the Adam step size of --marglik-method alternation; the ray (the default) takes "
                     "L-BFGS iterations: add --marglik-method alternation or leave it out")


def refuse_given(parser: argparse.ArgumentParser, args: argparse.Namespace, reasons: dict[str, str]) -> None:
    """Refuse (``parser.error``) a training flag given explicitly that the script decides itself: ``reasons``
    maps the option's field name to why (what decides it instead)."""
    flags = option_flags()
    for name, why in reasons.items():
        if getattr(args, name, None) is not None:
            parser.error(f"{flags[name]} is not taken here: {why}")


METHOD_FLAGS = {"ray_min_scale": "ray", "hyper_lr": "alternation"}  # flag -> the one precision update it acts on


def method_flag_defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    """Set the defaults of the flags of :data:`METHOD_FLAGS` that ``parser`` has to ``None``, so that a value given
    can be told from none, and return the defaults their help texts name (for :func:`check_method_bound_flags`)."""
    defaults = {name: parser.get_default(name) for name in METHOD_FLAGS}
    parser.set_defaults(**dict.fromkeys(METHOD_FLAGS))
    return defaults


def check_method_bound_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, methods: list[str],
                             defaults: dict[str, object], methods_flag: str) -> None:
    """Refuse (``parser.error``) a flag of :data:`METHOD_FLAGS` given without its method among ``methods`` (chosen
    by ``methods_flag``); fill in the ``defaults`` of those not given, so that a flag a run does not use always
    holds its default and never tells two runs' settings apart."""
    for name, method in METHOD_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
        elif method not in methods:
            dashed = "--" + name.replace("_", "-")
            parser.error(f"argument {dashed}: acts on the {method} method only, which {methods_flag} "
                         f"{' '.join(methods)} leaves out: choose {method} with {methods_flag} or leave {dashed} out")


def script_settings(args: argparse.Namespace) -> dict:
    """What a script's config.json records: its flags but ``--verbose`` (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "verbose"}


def check_same_settings(parser: argparse.ArgumentParser, out: Path, settings: dict, uncompared: tuple[str, ...],
                        finished: str) -> None:
    """Refuse (``parser.error``) an ``out`` whose config.json records other settings than ``settings`` (but the
    ``uncompared`` ones), naming each difference; ``finished`` names what the same settings would reuse."""
    path = out / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    names = sorted((set(saved) | set(settings)) - set(uncompared))
    changed = [f"--{name.replace('_', '-')} {_as_flag_value(saved.get(name))} there, "
               f"{_as_flag_value(settings.get(name))} now" for name in names if saved.get(name) != settings.get(name)]
    if changed:
        parser.error(f"argument --out: {out} holds a run with other settings ({'; '.join(changed)}): choose another "
                     f"--out (the same settings continue that run, reusing its {finished})")


def _as_flag_value(value: object) -> str:
    """A config.json value as typed after its flag (a list space-separated); ``unset`` for none."""
    if value is None:
        return "unset"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_exact_map_ray_argument(parser: argparse.ArgumentParser) -> None:
    """``--ray-min-scale`` for the scripts whose every round refits the exact MAP (known_symmetry,
    layerwise_symmetry): 0 by default, no trust region, because a round that moved too far is corrected by the
    next; training runs, which continue from a few epochs of SGD, use :data:`~ella.bilinear_ray.RAY_MIN_SCALE`."""
    parser.add_argument("--ray-min-scale", type=Range(float, 0, False, 1), default=0.0,
                        help="the ray's trust region: the least factor by which one round may scale an F-FC path's "
                             f"output (0, the default: none, as every round refits the exact MAP; training runs use "
                             f"{RAY_MIN_SCALE:g})")


def default_out_dir(experiment: str, config: TrainConfig, preset: str) -> Path:
    """``runs/<experiment>/<dataset>[-<task>]-<layer>-<map|laplace>-<preset>[-s<seed>]``: the seed is named when
    it is not the default one, so that runs of two seeds never share a folder."""
    mode = "laplace" if config.laplace else "map"
    task = f"-{config.task}" if config.task else ""
    seed = "" if config.seed == TrainConfig.seed else f"-s{config.seed}"
    return Path("runs") / experiment / f"{config.dataset}{task}-{config.layer}-{mode}-{preset}{seed}"


def default_out_pattern(experiment: str, dataset: str) -> str:
    """:func:`default_out_dir` with placeholders for the layer, the mode, the preset and the seed, for help texts."""
    folder = default_out_dir(experiment, TrainConfig(layer="<layer>", dataset=dataset, laplace=True), "<preset>")
    return str(folder).replace("-laplace-", "-<map|laplace>-") + "[-s<seed>, for a --seed other than the default]"


def figure_dir(out: Path) -> Path:
    """Where a run's figures go: ``figures/<path below runs/>`` for runs under ``runs/``, else ``<out>/figures``."""
    if out.parts and out.parts[0] == "runs":
        return Path("figures", *out.parts[1:])
    return out / "figures"


def run_script(main: Callable[[], None], verbose_flag: bool = False) -> None:
    """Run an experiment's ``main``, then :func:`ella.distributed.finish` (a no-op in a single process).

    A user error (bad option, missing data, an output folder that cannot be written or already holds a run
    without ``--resume``, a checkpoint that cannot be resumed, a training loss that diverged, a marginal
    likelihood or a curvature that cannot be computed) ends with its message and exit status 2 instead of a
    traceback (with ``verbose_flag``, where the script has ``-v`` / ``--verbose``, the message says that it shows
    the traceback too). Ctrl-C ends with one line and status 130: where
    a training run stopped and the command that continues it (:func:`resume_command`). SIGTERM (a batch
    scheduler's notice before it kills a job, or torchrun's way of stopping the others when one process fails)
    counts as Ctrl-C until the process reports why it ends (then it is ignored, so that the report is whole); in
    one process it is the first Ctrl-C during the epochs (the run stops once the epoch in progress is saved:
    :class:`ella.train.StopAfterEpoch`). In a data-parallel launch rank 0 prints that line for all processes (each
    ends with 130), and a failed wait for the other processes (:class:`~ella.distributed.ProcessGroupError`)
    prints what it waited for and the command that continues.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
        distributed.finish()
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, MarglikError, CurvatureError,
            OutputError, CheckpointError) as error:
        _ending()
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        print(f"error: {error}" + ("\n(run with -v for the traceback)" if verbose_flag else ""), file=sys.stderr)
        raise SystemExit(2) from None
    except distributed.ProcessGroupError as error:
        _ending()
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        print(f"error: {error}; continue with: {resume_command()}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:
        _ending()
        if distributed.env_rank() != 0:
            raise SystemExit(130) from None  # rank 0 says where the run stopped
        if isinstance(stop, Interrupted):
            print(f"{stop}; continue with: {resume_command()}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _ending() -> None:
    """Ignore SIGTERM from here on: the process is ending anyway, and a KeyboardInterrupt raised while it says why
    would cut its message short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resume_command(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The command line that continues this run: the same one (``argv``, default ``sys.argv``) with ``--resume``,
    under ``python``, or under ``torchrun`` with the same number of processes when torchrun's variables
    (``environ``, default ``os.environ``: ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``) announce several."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    command = [*argv, *([] if "--resume" in argv else ["--resume"])]
    world = int(environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return shlex.join(["python", *command])
    per_node = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = ["--standalone"] if per_node == world else [f"--nnodes={world // per_node}"]
    return shlex.join(["torchrun", *nodes, f"--nproc_per_node={per_node}", *command])


def setup_logging(verbose: bool) -> None:
    """Log to stderr; in a multi-process launch, ranks other than 0 print nothing and log warnings only."""
    rank = distributed.env_rank()
    if rank == 0:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        return
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    sys.stdout = open(os.devnull, "w")  # the experiment's summary is printed once, by rank 0


def model_runs(base: TrainConfig, entries, prefix: str = "") -> dict[str, TrainConfig]:
    """``LAYER:map`` / ``LAYER:laplace`` entries as configurations named ``<prefix><layer>-<mode>``."""
    runs = {}
    for entry in entries:
        layer, _, mode = entry.partition(":")
        runs[f"{prefix}{layer}-{mode}"] = replace(base, layer=layer, laplace=mode == "laplace")
    return runs


def run_many(runs: dict[str, TrainConfig], root: Path, resume: bool) -> dict[str, dict]:
    """Train every named configuration into ``root/<name>``. On ``resume`` a finished run is reused when its
    ``final.json`` records the same configuration, and refused (ValueError naming the fields) otherwise."""
    from ella.train import check_finished, train

    def finished(path: Path, config: TrainConfig) -> dict:
        final = json.loads(path.read_text())
        check_finished(final, path, asdict(config))
        return final

    results = {}
    for name, config in runs.items():
        out = root / name
        final_path = out / "final.json"
        distributed.setup(config.device, config.process_timeout)  # so that rank 0 alone decides what is finished
        if resume and distributed.on_main(final_path.exists):
            results[name] = distributed.on_main(lambda: finished(final_path, config))
            continue
        if distributed.is_main():
            logging.getLogger(__name__).warning("run %s -> %s", name, out)
        results[name] = train(config, out, resume=resume, figure_dir=figure_dir(out))
    return results


def write_table(rows: list[dict], root: Path, stem: str = "summary") -> str:
    """Write ``rows`` as ``<stem>.json`` and ``<stem>.csv`` (lists and dicts as JSON) into ``root`` (rank 0 only);
    return a Markdown table."""
    if distributed.is_main():
        _write_rows(rows, root, stem)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _write_rows(rows: list[dict], root: Path, stem: str) -> None:
    """``rows`` as ``root/<stem>.json`` and ``root/<stem>.csv`` (lists and dicts as JSON in their cells), each
    written atomically."""
    root.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(rows, indent=2), root / f"{stem}.json")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows)
    write_text(text.getvalue(), root / f"{stem}.csv")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return "" if value is None else str(value)
