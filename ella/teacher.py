"""Known-symmetry check: does the marginal likelihood switch off the path the data do not need?

A *teacher* F-FC+CONV relaxed layer with only one path nonzero (``active="conv"``: a translation-equivariant
map; ``active="fc"``: a rank-one-per-channel-pair dense map that no convolution can express) generates regression
data ``y = teacher(x) + noise`` from standard normal inputs. A *student* F-FC+CONV layer of the same shape then
learns its path precisions by the method's alternation (the paper's online loop of MAP steps on the weights and
hyper-steps on the precisions, here with every step made exact so that only the alternation itself is under
test): the MAP at fixed precisions by full-batch L-BFGS, then a KFAC-Laplace fit and steps on the log precisions
(:func:`learn_precisions`), either at fixed parameters (the paper's ``"alternation"``) or on the evidence profiled
along the F-FC path's scaling ray (``"ray"``, :mod:`ella.bilinear_ray`).

:func:`evidence_profile` answers the question the alternation only approximates: the Laplace evidence as a
function of one path's precision, with the MAP refitted at each value.

The student predicts ``y / noise`` (a fixed output scale), so the Gaussian likelihood of the noise level is the
unit-variance regression likelihood of the KFAC code, and its MAP loss is ``0.5 ||y / noise - f||^2``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ella.bilinear_ray import optimise_precisions
from ella.layers import Conv, FactoredFC, GroupConv, RelaxedLayer
from ella.layers.group import N_ROTATIONS
from ella.marglik import LaplaceFit, effective_parameters, fit_laplace, neg_log_marglik
from ella.priors import Prior
from ella.report import PathReport, path_output_power, path_reports, pyplot, save_figure, with_output_shares

log = logging.getLogger(__name__)

PATHS = ("fc", "conv")
STRUCTURE_LETTERS = {"C": "conv", "F": "fc", "G": "gconv"}
"""Letters of a deep teacher's structure (layer 1 first): ``C`` a CONV layer, ``F`` a dense (F-FC) layer, ``G`` a
p4 GCONV layer (in a group model, :class:`PathTypes`)."""


@dataclass(frozen=True)
class Problem:
    """Shape of the problem: ``channels -> channels`` on ``size x size`` images, ``n`` examples."""

    channels: int = 2
    size: int = 6
    n: int = 256
    noise: float = 0.1
    teacher_scale: float = 3.0


class OutputScale(nn.Module):
    """Multiplies by a fixed ``scale`` (no parameters)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def relaxed_model(problem: Problem, seed: int, fc: type[nn.Module] = FactoredFC) -> nn.Sequential:
    """F-FC+CONV relaxed layer (no downsampling), flattened and divided by the noise level, in float64.

    ``(N, C, S, S) -> (N, C * S * S)``; parameters named ``0.paths.fc.*`` and ``0.paths.conv.*``. ``fc``: the
    dense path's type (``SparseFC`` for S-FC+CONV).
    """
    torch.manual_seed(seed)
    c, s = problem.channels, problem.size
    layer = RelaxedLayer({"fc": fc(c, c, s, s), "conv": Conv(c, c, 3)}, downsample=False)
    return nn.Sequential(layer, nn.Flatten(), OutputScale(1.0 / problem.noise)).double()


def _path_of(name: str) -> str:
    """The path (``"fc"``, ``"conv"`` or ``"gconv"``) owning parameter ``<layer>.paths.<path>.*`` of a
    :func:`relaxed_model` or a :func:`deep_model`."""
    return name.split(".")[2]


class SmoothRelaxedLayer(RelaxedLayer):
    """A :class:`RelaxedLayer` (stride 1, paths summed and divided by ``sqrt(P)``) followed by ``activation``
    in place of the ReLU: ``torch.tanh`` between the layers of a :func:`deep_model`, the identity after its last.

    ``(B, C, S, S) -> (B, C', S, S)``. The prior, the KFAC rules and the report see an ordinary relaxed layer.
    """

    def __init__(self, paths: dict[str, nn.Module], activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(paths, downsample=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self._equivariant_sum(x)
        for name, path in self.paths.items():
            if not path.equivariant:
                total = self._add(total, name, path(x), x.shape[0], self._output_size(x))
        return self.activation(total / math.sqrt(len(self.paths)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def structure_paths(structure: str) -> list[tuple[str, ...]]:
    """``"CCF"`` -> ``[("conv",), ("conv",), ("fc",)]``: the one path of each layer of a teacher (layer 1 first)."""
    if not structure or any(letter not in STRUCTURE_LETTERS for letter in structure):
        raise ValueError(f"unknown teacher structure {structure!r}: one letter per layer, each one of "
                         f"{sorted(STRUCTURE_LETTERS)} (C: CONV, F: dense F-FC, G: p4 GCONV)")
    return [(STRUCTURE_LETTERS[letter],) for letter in structure]


@dataclass(frozen=True)
class PathTypes:
    """The paths a :func:`deep_model` 's layers may have: the dense ``fc`` (type ``fc``: ``FactoredFC`` or
    ``SparseFC``) and the convolution ``conv`` (``Conv`` or ``SparseConv``), and with ``group`` a third, the p4
    group convolution ``gconv`` (:class:`~ella.layers.GroupConv`, pointwise: rotation ``g`` of the output is
    the input's rotation ``g`` convolved with the filter turned ``g`` quarter turns, as in the paper's
    F-FC+CONV+GCONV layer). A group model acts on p4 maps ``(N, 4C, S, S)`` (group-major, as in
    :mod:`ella.layers.group`), its ``fc`` and ``conv`` paths on all ``4C`` channels, so a CONV path can express a
    GCONV map (with 16 times its parameters) and neither can express a dense one."""

    fc: type[nn.Module] = FactoredFC
    conv: type[nn.Module] = Conv
    group: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The path names, in the order of their parameters."""
        return ("fc", "conv", "gconv") if self.group else ("fc", "conv")

    def width(self, channels: int) -> int:
        """Channels of the maps a layer acts on: ``4 * channels`` for a group model."""
        return N_ROTATIONS * channels if self.group else channels

    def make(self, path: str, channels: int, size: int) -> nn.Module:
        """A new ``path`` (one of :attr:`names`) for ``channels`` channels (fields of 4 rotations in a group
        model) on ``size x size`` maps."""
        if path not in self.names:
            raise ValueError(f"unknown path {path!r} for a model with paths {self.names}"
                             + ("" if self.group else " (GCONV layers need a group model)"))
        width = self.width(channels)
        if path == "fc":
            return self.fc(width, width, size, size)
        if path == "conv":
            return self.conv(width, width, 3)
        return GroupConv(channels, channels, 3, mode="pointwise")


def deep_model(problem: Problem, layers: Sequence[Sequence[str]], seed: int,
               types: PathTypes = PathTypes()) -> nn.Sequential:
    """A stack of :class:`SmoothRelaxedLayer` s, ``layers[k]`` naming the paths of layer ``k`` (of
    ``types.names``), tanh between the layers, flattened and divided by the noise level, in float64.

    ``(N, W, S, S) -> (N, W * S * S)`` with ``W = types.width(C)`` (``4C`` channels of p4 maps in a group model);
    parameters named ``<k>.paths.<path>.*``.
    """
    torch.manual_seed(seed)
    c, s = problem.channels, problem.size
    stack = [SmoothRelaxedLayer({path: types.make(path, c, s) for path in paths},
                                torch.tanh if k + 1 < len(layers) else _identity) for k, paths in enumerate(layers)]
    return nn.Sequential(*stack, nn.Flatten(), OutputScale(1.0 / problem.noise)).double()


def deep_teacher(problem: Problem, structure: str, seed: int = 0,
                 types: PathTypes = PathTypes()) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """``(teacher, x (n, W, S, S), y / noise (n, W*S*S))``: a :func:`deep_model` teacher with one path per layer
    (``structure``, e.g. ``"CCF"``: :func:`structure_paths`; path types ``types``; seed ``seed + 1000``),
    standard normal inputs and its noisy targets. In a group model (``W = 4C``) the inputs are standard normal
    p4 fields, the four rotations of a channel independent: on lifted images (four equal copies) a first CONV
    layer would see only a quarter of its input directions, and a first GCONV layer would be a lifting
    convolution, so first layers would not be told apart as cleanly as deeper ones.

    Every teacher layer is rescaled in turn so that its pre-activation has standard deviation ``teacher_scale``
    on these inputs (tanh in its nonlinear range without saturating; the last layer's output, the noise-free
    target, then has ``teacher_scale / noise`` times the noise's standard deviation), and its bias is zeroed.
    """
    teacher = deep_model(problem, structure_paths(structure), seed + 1000, types)
    generator = torch.Generator().manual_seed(seed)
    width = types.width(problem.channels)
    x = torch.randn(problem.n, width, problem.size, problem.size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        h = x
        for layer in teacher[:len(structure)]:
            for name, p in layer.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
            pre = sum(path(h) for path in layer.paths.values())
            factor = problem.teacher_scale / float(pre.std())
            for path in layer.paths.values():  # the last factor of every path scales its output linearly
                last = path.stage_v.weight if hasattr(path, "stage_v") else next(path.parameters())
                last.mul_(factor)
            h = layer(h)
        y = teacher(x) + torch.randn(problem.n, width * problem.size**2, generator=generator, dtype=torch.float64)
    return teacher, x, y


def teacher_data(problem: Problem, active: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, C, S, S)`` standard normal and targets ``y / noise (n, C*S*S)`` of a teacher with one path on.

    The teacher is a :func:`relaxed_model` (seed ``seed + 1000``) whose ``active`` path's parameters are
    multiplied by ``teacher_scale`` and whose other path is zeroed.
    """
    if active not in PATHS:
        raise ValueError(f"unknown teacher path {active!r}; expected one of {PATHS}")
    teacher = relaxed_model(problem, seed + 1000)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            p.mul_(problem.teacher_scale if _path_of(name) == active else 0.0)
        x = torch.randn(problem.n, problem.channels, problem.size, problem.size, generator=generator,
                        dtype=torch.float64)
        y = teacher(x) + torch.randn(problem.n, problem.channels * problem.size**2, generator=generator,
                                     dtype=torch.float64)
    return x, y


def start_from(student: nn.Module, teacher: nn.Module) -> int:
    """Copy into ``student`` every parameter and buffer of ``teacher`` with the same name and shape (the
    teacher's paths that the student also has, with an S-path's anchors and interpolation basis, so that the
    copied anchor values mean the same map); the student's other paths keep their random initialisation.
    Returns how many tensors were copied."""
    own = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    copied = 0
    with torch.no_grad():
        for name, value in [*teacher.named_parameters(), *teacher.named_buffers()]:
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                copied += 1
    return copied


def fit_map(model: nn.Module, prior: Prior, x: torch.Tensor, y: torch.Tensor, max_iter: int = 500) -> None:
    """Full-batch L-BFGS on ``0.5 ||y - f(x)||^2 + 0.5 sum_t delta_t ||theta_t||^2`` (in place)."""
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum() + prior.penalty(model)
        loss.backward()
        return loss

    optimizer.step(closure)


def fit_map_and_laplace(model: nn.Module, prior: Prior, x: torch.Tensor, y: torch.Tensor,
                        map_iter: int = 500) -> LaplaceFit:
    """The MAP at the current precisions (:func:`fit_map`, at most ``map_iter`` L-BFGS iterations), then the
    KFAC-Laplace fit there."""
    fit_map(model, prior, x, y, max_iter=map_iter)
    return fit_laplace(model, [(x, y)], prior, likelihood="regression")


def report(fit: LaplaceFit, model: nn.Module, prior: Prior, x: torch.Tensor) -> tuple[float, list[PathReport]]:
    """``(-log p(D | delta) / N, path rows with output shares on x)`` of a fit at the model's parameters."""
    rows = path_reports(prior, effective_parameters(fit, prior), fit.n_params)
    with torch.no_grad():
        value = float(neg_log_marglik(fit, prior))
    return value, with_output_shares(rows, path_output_power(model, x))


def path_columns(value: float, rows: list[PathReport]) -> dict:
    """One machine-readable row: objective, and per path precision, relative N_eff, N_eff and output share,
    named ``<column>_<path>`` for a one-layer model and ``<column>_<layer>.<path>`` for a deeper one."""
    row: dict = {"neg_log_marglik": value}
    deep = len({r.layer for r in rows}) > 1
    for r in rows:
        key = f"{r.layer}.{r.path}" if deep else r.path
        row.update({f"precision_{key}": r.precisions[0], f"relative_{key}": r.relative,
                    f"n_eff_{key}": r.n_eff, f"output_share_{key}": r.output_share})
    return row


def learn_precisions(model: nn.Module, prior: Prior, x: torch.Tensor, y: torch.Tensor, rounds: int,
                     hyper_steps: int = 50, hyper_lr: float = 0.1, progress=None, method: str = "alternation",
                     map_iter: int = 500, min_scale: float = 0.0) -> list[dict]:
    """Per round, exact MAP, then KFAC-Laplace and ``hyper_steps`` Adam steps on the log precisions by ``method``
    (:data:`ella.bilinear_ray.MARGLIK_METHODS`). Returns one row (``round`` and :func:`path_columns`) per round,
    after its hyper-steps: the method's objective, and the paths' effective parameters and output shares at the
    round's MAP. ``progress``: optional callable invoked once per round; ``map_iter``: the MAP's
    L-BFGS iterations per round (:func:`fit_map_and_laplace`); ``min_scale``: the ray's trust region, none by
    default: every round starts from the exact MAP at the last round's precisions, so a round that moved too far
    is corrected by the next (measured: with ``0.5``, 4 rounds of the layer-wise experiment end 0.26-0.79 worse in
    evidence on CCC and FCC teachers than without, :data:`ella.bilinear_ray.RAY_MIN_SCALE` being meant for online
    training, where the next round starts from a few epochs of SGD)."""
    optimizer = torch.optim.Adam([prior.log_precision], lr=hyper_lr)
    history = []
    for index in range(rounds):
        fit = fit_map_and_laplace(model, prior, x, y, map_iter)
        value = optimise_precisions(method, fit, prior, model, optimizer, hyper_steps, min_scale)
        _, rows = report(fit, model, prior, x)
        history.append({"round": index, **path_columns(value, rows)})
        log.info("round %d: -log p(D)/N %.5f, precisions %s", index, value, prior.as_dict())
        if progress is not None:
            progress()
    return history


def path_squared_norm(model: nn.Module, path: str) -> float:
    """``||theta_path||^2`` over all tensors of ``path`` (weights and biases)."""
    return sum(float(p.detach().pow(2).sum()) for name, p in model.named_parameters() if _path_of(name) == path)


def evidence_profile(model: nn.Module, prior: Prior, x: torch.Tensor, y: torch.Tensor, path: str,
                     log_precisions: list[float], progress=None) -> list[dict]:
    """``-log p(D | delta) / N`` with ``path``'s log precision set to each value in turn (others kept) and the
    MAP refitted (warm-started from the previous value's). One row per value, with the path's squared norm."""
    group = prior.group_names.index(f"0.{path}")
    rows = []
    for log_precision in log_precisions:
        with torch.no_grad():
            prior.log_precision[group] = log_precision
        fit = fit_map_and_laplace(model, prior, x, y)
        value, reports = report(fit, model, prior, x)
        rows.append({f"log_precision_{path}": log_precision, f"squared_norm_{path}": path_squared_norm(model, path),
                     **path_columns(value, reports)})
        if progress is not None:
            progress()
    return rows


def plot_profile(runs: dict[str, tuple[list[dict], list[dict]]], path: str, out: Path, title: str = "") -> Path:
    """One line per method in ``runs`` (method -> (rounds, profile)). Left: the unused ``path``'s relative N_eff
    (solid) and output share (dashed) per round; right: the profiled ``-log p(D)/N`` against its precision (the
    first point of each line is where the method stopped)."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9.0, 3.2))
    for method, (rounds, profile) in runs.items():
        steps = [row["round"] for row in rounds]
        line, = left.plot(steps, [row[f"relative_{path}"] for row in rounds], "o-", label=f"{method}: relative N_eff")
        left.plot(steps, [row[f"output_share_{path}"] for row in rounds], "s--", color=line.get_color(),
                  label=f"{method}: output share")
        precisions = [math.exp(row[f"log_precision_{path}"]) for row in profile]
        right.plot(precisions, [row["neg_log_marglik"] for row in profile], "o-", label=method)
    left.set_yscale("log")
    left.set_xlabel("round")
    left.set_title(f"{path} path per round")
    left.legend(fontsize="small")
    right.set_xscale("log")
    right.set_xlabel(f"{path} precision (MAP refitted)")
    right.set_ylabel("-log p(D) / N")
    right.set_title("profiled evidence")
    right.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)
