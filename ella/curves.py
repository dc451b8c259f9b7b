"""Figures of how a run went, drawn from its per-epoch metrics (``metrics.jsonl``, :attr:`ella.train.Learner.history`)
and from a table's reports.

- :func:`plot_learning_curves`: accuracy, NLL and ``-log p(D)/N`` per epoch (``learning_curves.png``);
- :func:`plot_share_rounds`: every path's relative effective parameters after each marginal-likelihood round, one
  panel per relaxed layer (``relative_per_round.png``);
- :func:`plot_run`: both, into a run's figure folder (what :class:`~ella.train.Learner` draws at the end);
- :func:`plot_block_shares`: a results table's per-block relative and output shares, one panel per run
  (``experiments/paper_tables.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ella.report import pyplot, save_figure

CURVES_FILE = "learning_curves.png"
ROUNDS_FILE = "relative_per_round.png"


def read_history(metrics: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (one per epoch)."""
    return [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]


def plot_learning_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Three panels over the epochs of ``history``: accuracy (%), NLL (training cross-entropy and the evaluated
    data's NLL) and ``-log p(D)/N`` at the epochs with a marginal-likelihood round (an empty panel without one)."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for split in ("valid", "test"):
        if any(f"{split}_acc" in row for row in history):
            axes[0].plot(epochs, [row.get(f"{split}_acc") for row in history], marker=".", label=split)
            axes[1].plot(epochs, [row.get(f"{split}_nll") for row in history], marker=".", label=split)
    axes[1].plot(epochs, [row["train_loss"] for row in history], marker=".", label="train (augmented)")
    rounds = [(row["epoch"], row["neg_log_marglik"]) for row in history if row.get("neg_log_marglik") is not None]
    if rounds:
        axes[2].plot(*zip(*rounds), marker="o")
    else:
        axes[2].text(0.5, 0.5, "no marginal-likelihood round", ha="center", va="center", transform=axes[2].transAxes)
    for ax, label in zip(axes, ("accuracy (%)", "NLL", "-log p(D)/N")):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_share_rounds(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """One panel per relaxed layer: each path's relative effective parameters (``relative_n_eff``) after every
    marginal-likelihood round of ``history``; None (nothing drawn) when no round recorded them."""
    rounds = [row for row in history if row.get("relative_n_eff")]
    if not rounds:
        return None
    paths = list(dict.fromkeys(name for row in rounds for name in row["relative_n_eff"]))
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in paths))
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    plt = pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.4 * rows), sharey=True, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for name in paths:
            if name.rsplit(".", 1)[0] == layer:
                points = [(row["epoch"], row["relative_n_eff"][name]) for row in rounds if name in row["relative_n_eff"]]
                ax.plot(*zip(*points), marker="o", label=name.rsplit(".", 1)[1])
        ax.set_title(layer, fontsize=9)
        ax.set_ylim(0, 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_run(history: list[dict], figure_dir: str | Path, title: str = "") -> list[Path]:
    """A run's learning curves and, if it had marginal-likelihood rounds, its shares per round, in ``figure_dir``."""
    figure_dir = Path(figure_dir)
    drawn = [plot_learning_curves(history, figure_dir / CURVES_FILE, title),
             plot_share_rounds(history, figure_dir / ROUNDS_FILE, title)]
    return [path for path in drawn if path is not None]


def plot_block_shares(reports: dict[str, list[dict]], path: str | Path) -> Path | None:
    """One panel per run of a results table: each path kind's relative effective parameters (bars) and share of
    the output power (dots) in the relaxed blocks in order. ``reports``: run name -> the ``paths`` rows of its
    ``effective_parameters.json``; runs without relaxed-layer rows are left out (None when none is left)."""
    reports = {name: [r for r in rows if r["path"] is not None] for name, rows in reports.items()}
    reports = {name: rows for name, rows in reports.items() if rows}
    if not reports:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 2.4 * len(reports)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], reports.items()):
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        kinds = list(dict.fromkeys(r["kind"] for r in rows))
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            mine = {r["layer"]: r for r in rows if r["kind"] == kind}
            xs = [i + (k - (len(kinds) - 1) / 2) * width for i, layer in enumerate(layers) if layer in mine]
            bars = ax.bar(xs, [mine[layer]["relative"] for layer in layers if layer in mine], width, label=f"{kind} relative")
            shares = [(x, mine[layer]["output_share"]) for x, layer in zip(xs, [l for l in layers if l in mine])
                      if mine[layer].get("output_share") is not None]
            if shares:
                ax.plot(*zip(*shares), "o", color=bars.patches[0].get_facecolor(), markeredgecolor="black",
                        label=f"{kind} output share")
        ax.set_xticks(range(len(layers)), [layer.rsplit(".", 1)[-1] for layer in layers])
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("share")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel("block")
    return save_figure(fig, path)
