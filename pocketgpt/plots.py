"""Figures: returned for the notebook to show, saved as PNG beside the data (through the write door).

Imports: common, files, stages, tokenizer (document lengths), train (the log it plots).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import read_json
from .files import write_file
from .stages import PREFERENCE, StageDir, stage_status
from .tokenizer import document_lengths
from .train import read_log


INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # what a Jupyter kernel draws figures with


def pyplot():
    """matplotlib.pyplot, drawing inline in a notebook kernel whatever MPLBACKEND says: a headless server often
    exports MPLBACKEND=Agg, the kernel inherits it, and the saved notebook would come out without its figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    try:
        from IPython import get_ipython
    except ImportError:
        return plt
    shell = get_ipython()
    if getattr(shell, "kernel", None) is not None and matplotlib.get_backend() != INLINE_BACKEND:
        shell.run_line_magic("matplotlib", "inline")
    return plt


def plot_length_distributions(stage_dir):
    """Histograms of document length in bytes and in tokens (log scale: corpora have long tails)."""
    plt = pyplot()

    d = document_lengths(stage_dir)
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
    """Train and val loss against tokens seen, one panel per stage, pretraining's epoch boundaries dotted (an
    over-trained run shows at a glance); saved as PNG when asked. show=False closes the figure, so a stage that
    only saves it does not draw it in the notebook."""
    plt = pyplot()

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
        metrics = StageDir(Path(path).parent).metrics
        epoch = read_json(metrics).get("train_tokens_available") if metrics.is_file() else None
        if epoch and rows:  # pretraining: one pass over train.bin is this many tokens
            for k in range(1, int(rows[-1]["tokens"] // epoch) + 1):
                ax.axvline(k * epoch, color="grey", linestyle=":", linewidth=1)
            name = f"{name}: {rows[-1]['tokens'] / epoch:.2f} epochs (dotted: each epoch's end)"
        ax.set_title(name)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return finish_figure(fig, out_png, show)


# -----------------------------------------------------------------------------
# Tables that fit the page

class Table:
    """Rows (dicts) shown as a table: in a notebook or its saved HTML the columns share the page, long cells
    wrap (an unbroken one too) and a newline in a cell is a line break; in a terminal or a pipeline's log,
    plain text with each cell cut short."""

    def __init__(self, rows: list[dict], columns: list[str] | None = None):
        self.rows = list(rows)
        self.columns = columns or list(dict.fromkeys(k for r in self.rows for k in r))

    def cell(self, row: dict, column: str) -> str:
        value = row.get(column, "")
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    def _repr_html_(self) -> str:
        import html

        style = ("<style>table.pocketgpt{table-layout:auto;max-width:100%}table.pocketgpt th,table.pocketgpt td"
                 "{text-align:left;vertical-align:top;white-space:pre-wrap;overflow-wrap:anywhere;max-width:40em}</style>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "\n".join("<tr>" + "".join(f"<td>{html.escape(self.cell(r, c))}</td>" for c in self.columns) + "</tr>"
                         for r in self.rows)
        return f"{style}<table class=\"pocketgpt\"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"

    def __repr__(self) -> str:
        cut = lambda text: text.replace("\n", " / ")[:70] + ("..." if len(text) > 70 else "")  # noqa: E731
        cells = [[cut(c) for c in self.columns]] + [[cut(self.cell(r, c)) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in cells)


def table(rows, columns: list[str] | None = None) -> Table:
    """A notebook's table: rows (dicts), or a dict shown as measure / value rows."""
    if isinstance(rows, dict):
        rows = [{"measure": k, "value": v} for k, v in rows.items()]
    return Table(rows, columns)


def metrics_rows(stage_dir) -> list[dict]:
    """A training stage's metrics.json as a small table: how it ended, and its key numbers."""
    m = read_json(StageDir(stage_dir).metrics)
    numbers = [("how it ended", stage_status(stage_dir)), ("steps", f"{m['steps']:,} of {m['max_steps']:,}"),
               ("tokens trained on", f"{m['tokens']:,}"), ("final train loss", m.get("final_train_loss")),
               ("final val loss", m.get("final_val_loss")),
               ("tokens/s (median of the log rows)", f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else None),
               ("MFU", f"{m['mfu']:.1%}" if m.get("mfu") else None), ("precision", m["precision"]),
               ("device", f"{m['device']}, {m['processes']} process(es)"), ("hours, all sessions", f"{m['hours']:.3f}"),
               ("epochs of the training data", f"{m['epochs']:.2f}" if "epochs" in m else None)]
    if m.get(PREFERENCE):
        p = m[PREFERENCE]
        numbers += [("preference phase: steps", f"{p['steps']:,} of {p['max_steps']:,}"),
                    ("preference phase: final val loss", p.get("final_val_loss")),
                    ("preference phase: held-out pairs ranked right", f"{p['heldout_reward_accuracy']:.0%}"
                     if p.get("heldout_reward_accuracy") is not None else None),
                    ("preference phase: warning", p.get("warning")),
                    ("exported model", m.get("exported_model"))]
    return [{"measure": k, "value": f"{v:.4f}" if isinstance(v, float) else v} for k, v in numbers if v is not None]
