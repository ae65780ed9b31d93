"""How many passes over a corpus are worth it: held-out loss against epochs, at a fixed model size.

    python tools/epochs.py run --out runs/epochs [--corpus demo|alt] [--width 48] [--epochs 1 2 4 8 16]
    python tools/epochs.py table --out runs/epochs
    python tools/epochs.py plot --out runs/epochs --png docs/epochs.png

Each run trains the same small GPT-2 (2 layers, `width` wide, context 128, the demo recipe: Muon + WSD) on
the corpus's whole train split for E epochs, with the schedule max_steps="auto" gives a run (warmup, stable,
decayed at its own end), through the stage's own code (run_pretrain_stage), fp32, one seed and data order,
and evaluates it on the corpus's fixed val sample. The model is sized so that one epoch is about 6 tokens per
parameter, the seed's ratio (165M tokens for 27M parameters). The second corpus is tools/recipe.py's `alt`
(docstrings of packages the defaults were never tuned on). Results go to <out>/results.jsonl.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg  # noqa: E402
from recipe import tokenizer_for  # noqa: E402

from pocketgpt.model import build_model, count_params  # noqa: E402


def run(out: Path, corpus: str, width: int, epochs: int) -> dict:
    tok_dir = tokenizer_for(corpus, out)
    meta = pg.read_json(tok_dir / "meta.json")
    shape = dict(n_layer=2, n_head=4, n_embd=width, n_positions=128, batch_size=16, grad_accum_steps=1)
    tokens_per_step = 16 * 128
    steps = max(1, round(epochs * meta["train_tokens"] / tokens_per_step))
    folder = out / corpus / f"w{width}-e{epochs}"
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(out / corpus), tokenizer_dir=str(tok_dir),
                         out_dir=str(folder), max_steps=steps, warmup_steps=min(30, steps // 10), precision="fp32",
                         compile=False, max_hours=10.0, checkpoint_minutes=600, log_interval=max(1, steps // 20),
                         eval_interval=max(1, steps // 10), **shape)
    started = time.time()
    if not (folder / "manifest.json").exists():
        pg.run_pretrain_stage(cfg)
    m = pg.read_json(folder / "metrics.json")
    params = count_params(build_model(meta["vocab_size"], cfg))
    result = {"corpus": corpus, "width": width, "params": params, "epochs": epochs, "steps": steps,
              "train_tokens": meta["train_tokens"], "tokens_per_param_per_epoch": meta["train_tokens"] / params,
              "tokens": m["tokens"], "val_loss": m["final_val_loss"], "seconds": time.time() - started}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def table(out: Path) -> None:
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    latest = {(r["corpus"], r["width"], r["epochs"]): r for r in rows}
    print("| corpus | model | tokens/param per epoch | epochs | tokens | val loss | vs 1 epoch | vs half as many |")
    print("|---|---|---|---|---|---|---|---|")
    for (corpus, width, epochs), r in sorted(latest.items()):
        if sum((c, w) == (corpus, width) for c, w, _ in latest) < 2:
            continue  # a single run is no curve (as in the plot)
        one = latest.get((corpus, width, 1))
        half = latest.get((corpus, width, epochs // 2)) if epochs > 1 else None
        print(f"| {corpus} | {r['params'] / 1e6:.2f}M ({width} wide) | {r['tokens_per_param_per_epoch']:.1f} | {epochs} | "
              f"{r['tokens'] / 1e6:.1f}M | {r['val_loss']:.3f} | "
              f"{(r['val_loss'] / one['val_loss'] - 1) * 100:+.1f}% | "
              + (f"{(r['val_loss'] / half['val_loss'] - 1) * 100:+.1f}% |" if half else "|"))


def plot(out: Path, png: Path) -> None:
    """Held-out loss against epochs, one line per corpus (log-2 epoch axis), saved as `png`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    latest = {(r["corpus"], r["width"], r["epochs"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for corpus, width in sorted({(c, w) for c, w, _ in latest}):
        pts = sorted((e, r["val_loss"]) for (c, w, e), r in latest.items() if (c, w) == (corpus, width))
        if len(pts) < 2:
            continue  # a single run is no curve
        r = latest[(corpus, width, pts[0][0])]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o",
                label=f"{corpus} corpus, {r['params'] / 1e6:.2f}M params, {r['tokens_per_param_per_epoch']:.1f} tok/param/epoch")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({e for _, _, e in latest}), [str(e) for e in sorted({e for _, _, e in latest})])
    ax.set_xlabel("epochs over the train split (each run decayed at its own end)")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "table", "plot"])
    p.add_argument("--out", default="runs/epochs")
    p.add_argument("--corpus", default="demo", choices=["demo", "alt"])
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--png", default="docs/epochs.png")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "table":
        table(out)
        return 0
    if args.what == "plot":
        plot(out, Path(args.png))
        return 0
    for epochs in args.epochs:
        run(out, args.corpus, args.width, epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
