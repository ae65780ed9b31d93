"""Figures: returned for the notebook to show, saved as PNG beside the data (through the write door).

Imports: common, train (the log it plots).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import write_file
from .train import read_log


def plot_length_distributions(stage_dir):
    """Histograms of document length in bytes and in tokens (log scale: corpora have long tails)."""
    import matplotlib.pyplot as plt

    d = np.load(Path(stage_dir) / "doc_stats.npz")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, unit in zip(axes, ["bytes", "tokens"], ["bytes", "tokens"]):
        values = np.maximum(d[key], 1)
        bins = np.logspace(0, np.log10(values.max() + 1), 50)
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"document length ({unit})")
        ax.set_ylabel("documents")
        ax.set_title(f"median {np.median(values):,.0f} {unit}, max {values.max():,} {unit}")
    fig.tight_layout()
    return finish_figure(fig, Path(stage_dir) / "lengths.png")


def save_figure(fig, path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def finish_figure(fig, out_png=None, show: bool = True):
    """Saved as PNG when asked; show=False closes it, so a stage that only saves a figure does not
    draw it in the notebook."""
    import matplotlib.pyplot as plt

    if out_png:
        save_figure(fig, out_png)
    if not show:
        plt.close(fig)
    return fig


def plot_losses(logs: dict, out_png=None, show: bool = True):
    """Train and val loss against tokens seen, one panel per stage; saved as PNG when asked.
    show=False closes the figure, so a stage that only saves it does not draw it in the notebook."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(7 * len(logs), 4.2), squeeze=False)
    for ax, (name, path) in zip(axes[0], logs.items()):
        rows = read_log(path)
        train = [(r["tokens"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
        val = [(r["tokens"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if train:  # each logged train loss is the mean over its log window
            ax.plot(*zip(*train), color="C0", label="train")
        if val:
            ax.plot(*zip(*val), "o-", color="C1", label="val")
        accuracy = [(r["tokens"], r["reward_accuracy"]) for r in rows if r.get("reward_accuracy") is not None]
        if accuracy:  # DPO: the share of pairs whose chosen answer the model now prefers
            twin = ax.twinx()
            twin.plot(*zip(*accuracy), color="C2", label="reward accuracy")
            twin.set_ylim(0, 1)
            twin.set_ylabel("reward accuracy")
            twin.legend(loc="upper right")
        ax.set_title(name)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return finish_figure(fig, out_png, show)
