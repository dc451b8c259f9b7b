"""Effective number of parameters per path and layer (the paper's App. D.2).

MacKay's effective number of parameters of a parameter tensor ``t`` under the KFAC-Laplace posterior is
``N_eff(t) = sum_i lambda_i / (lambda_i + delta_t)`` over the eigenvalues of its GGN block. For a path (all its
tensors, weights and biases; U and V for F-FC) we report
- ``n_eff``: the sum over its tensors, ``n_params``: its size,
- ``normalised = n_eff / n_params``,
- ``relative = normalised / sum of normalised over the paths of the same layer`` (the paper's R),
and the *effective layer type* of a layer is the kind of its path with the largest relative value (where the
output shares below point to another path, the type says so: :func:`effective_layer_types`).
With sparse (S-) paths the normalisation counts anchor values, not induced weights.

Beside it, ``output_share`` (optional) says how much a path actually contributes to its layer's output: its
share of the summed mean squares of the paths' outputs (before they are combined and rectified) on given
inputs. The two can disagree: a factored (F-FC) path can keep a large relative ``N_eff`` while contributing
almost nothing to the output (see ``docs/design.md``, "Known symmetry").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ella.layers import RelaxedLayer
from ella.priors import Prior


@dataclass(frozen=True)
class PathReport:
    """Effective parameters of one path of a relaxed layer (or of a head layer, ``path=None``).

    ``precisions``: the prior precision of each of the path's parameter tensors (one value repeated when they
    share a prior group, the default; different values with per-tensor priors). ``output_share``: the path's
    share of its layer's output power (:func:`with_output_shares`), ``None`` when not measured.
    """

    layer: str
    path: str | None
    kind: str
    precisions: tuple[float, ...]
    n_params: int
    n_eff: float
    normalised: float
    relative: float
    output_share: float | None = None

    @property
    def precision(self) -> float | None:
        """The path's precision when all its tensors share one, else ``None``."""
        return self.precisions[0] if len(set(self.precisions)) == 1 else None


def path_reports(prior: Prior, n_eff: torch.Tensor, n_params: torch.Tensor) -> list[PathReport]:
    """Aggregate per-tensor effective parameters into per-path rows (whatever the prior's grouping).

    ``n_eff``, ``n_params``: ``(n_tensors,)`` in ``model.named_parameters()`` order (the prior's order).
    With per-tensor priors the tensors of one path (e.g. F-FC's U, b_U, V, b_V) are still summed into one row,
    so ``relative`` always compares paths, as the paper defines it.
    """
    if n_eff.shape != (len(prior.param_names),) or n_params.shape != n_eff.shape:
        raise ValueError(
            f"expected one effective-parameter value per parameter tensor ({len(prior.param_names)}), "
            f"got shapes {tuple(n_eff.shape)} and {tuple(n_params.shape)}"
        )
    position = {name: i for i, name in enumerate(prior.param_names)}
    tensor_precision = prior.tensor_precisions().detach().cpu().tolist()
    eff, size = n_eff.detach().double().cpu().tolist(), n_params.double().cpu().tolist()
    members: dict[tuple[str, str | None], tuple[str, list[int]]] = {}  # (layer, path) -> (kind, tensor indices)
    for group in prior.groups:
        kind, index = members.setdefault((group.layer, group.path), (group.kind, []))
        index.extend(position[name] for name in group.param_names)
    totals = {key: (sum(eff[i] for i in index), sum(size[i] for i in index)) for key, (_, index) in members.items()}
    layer_total: dict[str, float] = {}
    for (layer, _), (path_eff, path_size) in totals.items():
        layer_total[layer] = layer_total.get(layer, 0.0) + path_eff / path_size
    rows = []
    for (layer, path), (kind, index) in members.items():
        path_eff, path_size = totals[(layer, path)]
        normalised = path_eff / path_size
        rows.append(
            PathReport(
                layer=layer,
                path=path,
                kind=kind,
                precisions=tuple(tensor_precision[i] for i in sorted(index)),
                n_params=int(path_size),
                n_eff=path_eff,
                normalised=normalised,
                relative=normalised / layer_total[layer] if layer_total[layer] > 0 else float("nan"),
            )
        )
    return rows


def path_output_power(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> dict[tuple[str, str], float]:
    """Mean square of every relaxed-layer path's output on inputs ``x (N, C, H, W)``: ``(layer, path) -> power``.

    Each path's output is taken as its layer receives it (a strided CONV path's at the chosen polyphase
    component, other paths' at their own resolution), before the paths are combined and rectified.
    """
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}

    def record(key: tuple[str, str]):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            sums[key] = sums.get(key, 0.0) + float(out.detach().double().pow(2).sum())
            counts[key] = counts.get(key, 0) + out.numel()
        return hook

    handles = [
        path.register_forward_hook(record((layer_name, path_name)))
        for layer_name, layer in model.named_modules() if isinstance(layer, RelaxedLayer)
        for path_name, path in layer.paths.items()
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}


def with_output_shares(rows: list[PathReport], power: dict[tuple[str, str], float]) -> list[PathReport]:
    """``rows`` with ``output_share = power / (summed power of the layer's paths)`` (from :func:`path_output_power`)."""
    layer_power: dict[str, float] = {}
    for (layer, _), value in power.items():
        layer_power[layer] = layer_power.get(layer, 0.0) + value
    shared = []
    for row in rows:
        key = (row.layer, row.path)
        if key in power:
            total = layer_power[row.layer]
            row = replace(row, output_share=power[key] / total if total > 0 else float("nan"))
        shared.append(row)
    return shared


def effective_layer_types(rows: list[PathReport]) -> dict[str, str]:
    """Layer -> its effective type (relaxed layers only): the kind of its path with the largest relative
    effective parameters, where that path also carries the largest output share (or no share was measured).

    Where the two readings point to different paths the type names both, ``"<kind>? (rel) / <kind> (out)"``
    (e.g. ``"F-FC? (rel) / CONV (out)"``: a path can keep a large relative ``N_eff`` while contributing almost
    nothing to the layer's output), rather than choosing one.
    """
    layers: dict[str, list[PathReport]] = {}
    for row in rows:
        if row.path is not None:
            layers.setdefault(row.layer, []).append(row)
    types = {}
    for layer, paths in layers.items():
        by_count = max(paths, key=lambda row: row.relative)
        shared = [row for row in paths if row.output_share is not None]
        by_output = max(shared, key=lambda row: row.output_share) if len(shared) == len(paths) else by_count
        if by_output is by_count:
            types[layer] = by_count.kind
        else:
            types[layer] = f"{by_count.kind}? (rel) / {by_output.kind} (out)"
    return types


def format_report(rows: list[PathReport]) -> str:
    """A text table in the style of the paper's App. D Table 4, one line per path (layers named by their module
    path)."""
    types = effective_layer_types(rows)
    shares = any(row.output_share is not None for row in rows)
    width = max([12] + [len(row.layer) + 2 for row in rows])  # the layer column fits nested module paths
    lines = [
        f"{'layer':<{width}}{'path':<7}{'kind':<8}{'precision':>12}{'params':>12}{'N_eff':>12}"
        f"{'normalised':>12}{'relative':>10}" + (f"{'output':>10}" if shares else "") + "  effective type"
    ]
    for row in rows:
        relative = f"{row.relative:>10.4f}" if row.path is not None else f"{'':>10}"
        if shares:
            relative += f"{row.output_share:>10.4f}" if row.output_share is not None else f"{'':>10}"
        lines.append(
            f"{row.layer:<{width}}{row.path or '-':<7}{row.kind:<8}{_precision_text(row):>12}{row.n_params:>12,}"
            f"{row.n_eff:>12.2f}{row.normalised:>12.3g}{relative}  {types.get(row.layer, '')}"
        )
    return "\n".join(lines)


def _precision_text(row: PathReport) -> str:
    """The shared precision, or the range ``min-max`` of per-tensor precisions."""
    if row.precision is not None:
        return f"{row.precision:.4g}"
    return f"{min(row.precisions):.3g}-{max(row.precisions):.3g}"


def write_report(rows: list[PathReport], out_dir: str | Path, stem: str = "effective_parameters",
                 caption: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.txt`` (the table, then ``caption`` if given: e.g. how the precisions were learned) and
    ``<stem>.json`` (rows, effective layer types and ``caption``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path, json_path = out_dir / f"{stem}.txt", out_dir / f"{stem}.json"
    text_path.write_text(format_report(rows) + "\n" + (f"{caption}\n" if caption else ""))
    payload = {"paths": [asdict(r) for r in rows], "effective_layer_types": effective_layer_types(rows),
               "caption": caption}
    json_path.write_text(json.dumps(payload, indent=2))
    return text_path, json_path


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` at 120 dpi (creating the folder) and close it; returns ``path``."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_relative(rows: list[PathReport], path: str | Path, title: str = "") -> Path:
    """Stacked bars of the relative effective parameters of every path, one bar per relaxed layer."""
    plt = pyplot()
    layers = list(dict.fromkeys(r.layer for r in rows if r.path is not None))
    kinds = list(dict.fromkeys(r.kind for r in rows if r.path is not None))
    values = {kind: [0.0] * len(layers) for kind in kinds}
    for row in rows:
        if row.path is not None:
            values[row.kind][layers.index(row.layer)] = row.relative
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(layers), 3.2))
    bottom = [0.0] * len(layers)
    for kind in kinds:
        ax.bar(range(len(layers)), values[kind], bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values[kind])]
    ax.set_xticks(range(len(layers)), [layer.rsplit(".", 1)[-1] for layer in layers])
    ax.set_xlabel("block")
    ax.set_ylabel("relative effective parameters")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
