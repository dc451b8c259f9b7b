"""Effective number of parameters per path and layer (paper App. D.2; spec section 6).

MacKay's effective number of parameters of a parameter tensor ``t`` under the KFAC-Laplace posterior is
``N_eff(t) = sum_i lambda_i / (lambda_i + delta_t)`` over the eigenvalues of its GGN block. For a path (all its
tensors, weights and biases; U and V for F-FC) we report
- ``n_eff``: the sum over its tensors, ``n_params``: its size,
- ``normalised = n_eff / n_params``,
- ``relative = normalised / sum of normalised over the paths of the same layer`` (the paper's R),
and the *effective layer type* of a layer is the kind of its path with the largest relative value.
With sparse (S-) paths the normalisation counts anchor values, not induced weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ella.priors import Prior


@dataclass(frozen=True)
class PathReport:
    """Effective parameters of one prior group (a path of a relaxed layer, or a head layer)."""

    layer: str
    path: str | None
    kind: str
    precision: float
    n_params: int
    n_eff: float
    normalised: float
    relative: float


def path_reports(prior: Prior, n_eff: torch.Tensor, n_params: torch.Tensor) -> list[PathReport]:
    """Aggregate per-tensor effective parameters into per-path rows.

    ``n_eff``, ``n_params``: ``(n_tensors,)`` in ``model.named_parameters()`` order (the prior's order).
    """
    if n_eff.shape != (len(prior.param_names),) or n_params.shape != n_eff.shape:
        raise ValueError(
            f"expected one effective-parameter value per parameter tensor ({len(prior.param_names)}), "
            f"got shapes {tuple(n_eff.shape)} and {tuple(n_params.shape)}"
        )
    index = prior.group_of_tensor.cpu()
    n_groups = len(prior.groups)
    eff = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, index, n_eff.detach().double().cpu())
    size = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, index, n_params.double().cpu())
    normalised = eff / size
    layer_total: dict[str, float] = {}
    for group, value in zip(prior.groups, normalised.tolist()):
        layer_total[group.layer] = layer_total.get(group.layer, 0.0) + value
    precisions = prior.precisions().detach().cpu().tolist()
    rows = []
    for g, group in enumerate(prior.groups):
        total = layer_total[group.layer]
        rows.append(
            PathReport(
                layer=group.layer,
                path=group.path,
                kind=group.kind,
                precision=precisions[g],
                n_params=int(size[g]),
                n_eff=float(eff[g]),
                normalised=float(normalised[g]),
                relative=float(normalised[g] / total) if total > 0 else float("nan"),
            )
        )
    return rows


def effective_layer_types(rows: list[PathReport]) -> dict[str, str]:
    """Layer -> kind of its path with the largest relative effective parameters (relaxed layers only)."""
    best: dict[str, PathReport] = {}
    for row in rows:
        if row.path is None:
            continue
        if row.layer not in best or row.relative > best[row.layer].relative:
            best[row.layer] = row
    return {layer: row.kind for layer, row in best.items()}


def format_report(rows: list[PathReport]) -> str:
    """A text table in the style of the paper's App. D Table 4, one line per path."""
    types = effective_layer_types(rows)
    lines = [
        f"{'layer':<12}{'path':<7}{'kind':<8}{'precision':>12}{'params':>12}{'N_eff':>12}"
        f"{'normalised':>12}{'relative':>10}  effective type"
    ]
    for row in rows:
        relative = f"{row.relative:>10.4f}" if row.path is not None else f"{'':>10}"
        lines.append(
            f"{row.layer:<12}{row.path or '-':<7}{row.kind:<8}{row.precision:>12.4g}{row.n_params:>12,}"
            f"{row.n_eff:>12.2f}{row.normalised:>12.3g}{relative}  {types.get(row.layer, '')}"
        )
    return "\n".join(lines)


def write_report(rows: list[PathReport], out_dir: Path, stem: str = "effective_parameters") -> tuple[Path, Path]:
    """Write ``<stem>.txt`` (the table) and ``<stem>.json`` (rows and effective layer types) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path, json_path = out_dir / f"{stem}.txt", out_dir / f"{stem}.json"
    text_path.write_text(format_report(rows) + "\n")
    payload = {"paths": [asdict(r) for r in rows], "effective_layer_types": effective_layer_types(rows)}
    json_path.write_text(json.dumps(payload, indent=2))
    return text_path, json_path


def plot_relative(rows: list[PathReport], path: Path, title: str = "") -> Path:
    """Stacked bars of the relative effective parameters of every path, one bar per relaxed layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
