"""How pocketGPT's training recipe was chosen: the measurements behind the defaults (README, "Training recipe").

    python tools/recipe.py sweep --out runs/recipe            # learning rates, decay share, fused vs split QKV
    python tools/recipe.py table --out runs/recipe            # (a) AdamW+cosine, (b) WSD, (c) Muon+WSD at 1x and 4x
    python tools/recipe.py table --out runs/recipe --corpus alt   # the same on a corpus the defaults never saw

Every run is the demo model (4 layers x 128, context 128) through the stage's own code
(`run_pretrain_stage`), one seed and data order, fp32, on whatever machine runs this; results go
to <out>/<corpus>/results.jsonl, one JSON line per run, and `table` prints the markdown table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg
from pocketgpt.common import HERE
from pocketgpt.train import read_log

# a second corpus: the docstrings of other installed packages (maths, graphs, plotting, notebooks, packaging)
ALT_PACKAGES = ["sympy", "networkx", "matplotlib", "IPython", "pygments", "jinja2", "fsspec", "huggingface_hub",
                "setuptools", "pip"]
STEPS_1X = 500  # 500 steps of 16 x 128 tokens: ~1M tokens; 4x: ~4M
BASE = dict(precision="fp32", compile=False, max_hours=10.0, checkpoint_minutes=600, log_interval=25)
RECIPES = {  # (a) is the recipe before this change; (b) and (c) use the defaults the sweep chose
    "a_adamw_cosine": dict(optimizer="adamw", schedule="cosine", learning_rate=2e-3, min_lr=2e-4),
    "b_adamw_wsd": dict(optimizer="adamw", schedule="wsd"),
    "c_muon_wsd": dict(optimizer="muon", schedule="wsd"),
}


def tokenizer_for(corpus: str, out: Path) -> Path:
    """The demo tokenizer stage (vocab 4096) of the demo corpus or of the alt corpus."""
    run = out / corpus
    if (run / "tokenizer" / "manifest.json").exists():
        return run / "tokenizer"
    data = run / "data"
    if corpus == "alt":
        pg.make_demo_data(data, packages=ALT_PACKAGES)
    else:
        pg.make_demo_data(data)
    cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(run), corpus_path=str(data / "corpus.txt"))
    return pg.build_tokenizer_stage(cfg)


def run(name: str, tok_dir: Path, out: Path, steps: int, split_qkv: bool = True, **params) -> dict:
    """One pretraining run of `steps` steps (evaluated 20 times); returns its figures and appends them."""
    folder = out / f"{name}-{steps}"
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(out), tokenizer_dir=str(tok_dir), out_dir=str(folder),
                         max_steps=steps, eval_interval=max(1, steps // 20), muon_split_qkv=split_qkv,
                         **{**BASE, **params})
    started = time.time()
    pg.run_pretrain_stage(cfg)
    m, meta = pg.read_json(folder / "metrics.json"), pg.read_json(tok_dir / "meta.json")
    rows = [r for r in read_log(folder / "log.csv") if r["val_loss"] is not None]
    result = {"name": name, "steps": steps, "split_qkv": split_qkv, **params, "tokens": m["tokens"],
              "val_loss": m["final_val_loss"],
              "bits_per_byte": m["final_val_loss"] / np.log(2) / (meta["val_bytes"] / meta["val_tokens"]),
              "seconds": time.time() - started, "train_seconds": m["hours"] * 3600,
              "curve": [(r["tokens"], r["elapsed_s"], r["val_loss"]) for r in rows]}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{name} {steps} {params} split={split_qkv}: val {result['val_loss']:.4f} in {result['seconds']:.0f}s",
          flush=True)
    return result


def sweep(out: Path) -> None:
    """Learning rates, the WSD decay share and fused vs split QKV, at the 1x budget, on the demo corpus."""
    tok = tokenizer_for("demo", out)
    out = out / "demo" / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    for lr in [1e-3, 2e-3, 4e-3]:
        run("adamw_wsd", tok, out, STEPS_1X, optimizer="adamw", schedule="wsd", learning_rate=lr, min_lr=lr / 10)
    muon = [run("muon_wsd", tok, out, STEPS_1X, split_qkv=False, optimizer="muon", schedule="wsd", learning_rate=2e-3,
                muon_lr=lr) for lr in [2e-3, 4e-3, 8e-3, 1.6e-2]]
    best = min(muon, key=lambda r: r["val_loss"])["muon_lr"]
    for fraction in [0.1, 0.4]:
        run("muon_wsd", tok, out, STEPS_1X, split_qkv=False, optimizer="muon", schedule="wsd", learning_rate=2e-3,
            muon_lr=best, decay_fraction=fraction)
    for seed in [1337, 7, 99]:  # fused vs split Q|K|V, paired by seed
        for split in [False, True]:
            run("muon_wsd", tok, out, STEPS_1X, split_qkv=split, optimizer="muon", schedule="wsd", learning_rate=2e-3,
                muon_lr=best, seed=seed)


def first_reach(curve, target: float, column: int) -> float | None:
    """The tokens (column 0) or seconds (column 1) at which a val curve first reaches `target`, interpolated."""
    for (x0, s0, v0), (x1, s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            a, b = ((x0, x1) if column == 0 else (s0, s1))
            return a + (b - a) * (v0 - target) / max(v0 - v1, 1e-12) if v0 > target else a
    return None


def table(out: Path, corpus: str) -> None:
    tok = tokenizer_for(corpus, out)
    folder = out / corpus / "table"
    folder.mkdir(parents=True, exist_ok=True)
    done = {(r["name"], r["steps"]) for r in map(json.loads, open(folder / "results.jsonl"))} \
        if (folder / "results.jsonl").exists() else set()
    for steps in [STEPS_1X, 4 * STEPS_1X]:
        for name, params in RECIPES.items():
            if (name, steps) not in done:
                run(name, tok, folder, steps, **params)
    results = {(r["name"], r["steps"]): r for r in map(json.loads, open(folder / "results.jsonl"))}
    print(f"\n{corpus} corpus: final val loss / bits per byte; tokens and seconds at which the val curve "
          f"first reaches (a)'s final loss (an upper bound: the curve before its decay)")
    print("| budget | recipe | val loss | bits/byte | vs (a) | tokens to (a)'s loss | seconds to (a)'s loss | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for steps in [STEPS_1X, 4 * STEPS_1X]:
        a = results[("a_adamw_cosine", steps)]
        a = {**a, "val_loss": round(a["val_loss"], 4)}  # the log rounds val losses to 4 places
        for name in RECIPES:
            r = results[(name, steps)]
            tok_x, sec_x = first_reach(r["curve"], a["val_loss"], 0), first_reach(r["curve"], a["val_loss"], 1)
            tok_x = f"{tok_x / a['tokens']:.2f}x" if tok_x else "-"
            sec_x = f"{sec_x / a['train_seconds']:.2f}x" if sec_x else "-"
            print(f"| {r['tokens'] / 1e6:.1f}M tokens | {name} | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} | "
                  f"{r['val_loss'] / a['val_loss'] - 1:+.2%} | {tok_x} | {sec_x} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sweep", "table"])
    parser.add_argument("--out", default=str(HERE / "runs" / "recipe"))
    parser.add_argument("--corpus", default="demo", choices=["demo", "alt"])
    args = parser.parse_args()
    sweep(Path(args.out)) if args.what == "sweep" else table(Path(args.out), args.corpus)
