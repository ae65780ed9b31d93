"""A longer context from a trained model: grow it with init_from, or train at the long context from scratch?

    python tools/context_grow.py run --out runs/context_grow [--context 128] [--short-steps 500] [--long-steps 150]
                                     [--grow copy interpolate] [--lr-scale 1 0.25]
    python tools/context_grow.py table --out runs/context_grow

On the demo corpus (its own tokenizer stage, vocab 4096, 5% val so there are enough long windows) and the demo
model (4 layers x 128), through the stage's own code (run_pretrain_stage), fp32, fixed max_steps, the same
tokens per step (16 x context) in every run:
  (a) the short model: `context` positions, short-steps steps;
  (b) (a) grown with init_from to 4 x context and trained long-steps steps there (fresh optimizer and WSD
      schedule), once per way of growing the position table (copy, interpolate: model.grow_positions) and
      peak learning rate (lr-scale: a share of the demo profile's learning_rate and muon_lr);
  (c) from scratch at 4 x context for short-steps + long-steps steps: (a)'s tokens plus (b)'s.
Each is scored on every non-overlapping window of 4 x context (+1) tokens of the val split, loss per bucket of
`context` positions; (a), whose context is shorter, on sliding windows of its own length with a stride of half
of it (each token predicted with between context/2 and context tokens before it; the first window's all).
Results go to <out>/results.json; `table` prints the markdown table of the README.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg  # noqa: E402

from pocketgpt.files import write_json  # noqa: E402
from pocketgpt.tokenizer import read_bin  # noqa: E402

TOKENS_PER_STEP_WINDOWS = 16  # windows of the short context per step; the long runs take a quarter as many


def tokenizer_stage(out: Path) -> Path:
    if (out / "tokenizer" / "manifest.json").exists():
        return out / "tokenizer"
    pg.make_demo_data(out / "data")
    cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(out), corpus_path=str(out / "data" / "corpus.txt"),
                         val_fraction=0.05)
    return pg.build_tokenizer_stage(cfg)


def pretrain(out: Path, tok_dir: Path, name: str, context: int, steps: int, grow: str = "copy", **params) -> dict:
    """One run of the stage (skipped when its folder is finished); its seconds and metrics."""
    folder = out / name
    batch = TOKENS_PER_STEP_WINDOWS * params.pop("short_context") // context
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(out), tokenizer_dir=str(tok_dir), out_dir=str(folder),
                         n_positions=context, batch_size=batch, grad_accum_steps=1, max_steps=steps, precision="fp32",
                         compile=False, max_hours=10.0, checkpoint_minutes=600, log_interval=max(1, steps // 10),
                         eval_interval=max(1, steps // 4), eval_windows=64, **params)
    if not (folder / "manifest.json").exists():
        pg.run_pretrain_stage(cfg, grow=grow)
    m = pg.read_json(folder / "metrics.json")
    return {"name": name, "context": context, "steps": steps, "batch_size": batch, "tokens": m["tokens"],
            "seconds": round(m["hours"] * 3600, 1), "tokens_per_s": m["tokens_per_s"], "val_loss": m["final_val_loss"],
            "context_report": m["context"]}


@torch.no_grad()
def position_losses(model_dir: Path, windows: np.ndarray, stride: int | None = None) -> np.ndarray:
    """Loss at each position of each long window (windows: N x (L+1) ids). A model whose context is shorter
    than L reads sliding windows of its own length T, `stride` apart: each scores the tokens the one before
    it did not (so each token has between T - stride and T tokens before it)."""
    model = pg.load_model(model_dir)
    T, L = model.config.n_positions, windows.shape[1] - 1
    x, y = torch.from_numpy(windows[:, :-1]).long(), torch.from_numpy(windows[:, 1:]).long()
    out = torch.zeros(x.shape)
    starts = [0] + (list(range(stride, L - T + 1, stride)) if T < L else [])
    if T < L and starts[-1] != L - T:
        starts.append(L - T)
    scored = 0
    for s in starts:
        for i in range(0, len(x), 16):
            logits = model(x[i:i + 16, s:s + T]).logits
            loss = F.cross_entropy(logits.transpose(1, 2), y[i:i + 16, s:s + T], reduction="none")
            out[i:i + 16, scored:s + T] = loss[:, scored - s:]
        scored = s + T
    return out.numpy()


def long_windows(tok_dir: Path, length: int) -> np.ndarray:
    """Every non-overlapping window of length + 1 tokens of the val split."""
    data = np.asarray(read_bin(tok_dir / "val.bin")).astype(np.int64)
    n = (len(data) - 1) // length
    return np.stack([data[i * length:i * length + length + 1] for i in range(n)])


def run(out: Path, context: int, short_steps: int, long_steps: int, grows: list[str], lr_scales: list[float]) -> dict:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_stage(out)
    long = 4 * context
    runs = {"a": pretrain(out, tok_dir, "a_short", context, short_steps, short_context=context)}
    demo = pg.PROFILES["demo"]["pretrain"]
    for grow in grows:
        for scale in lr_scales:  # the peak learning rates of the grown run, as a share of the demo profile's
            name = f"b_{grow}" + (f"_lr{scale:g}" if scale != 1 else "")
            runs[name] = pretrain(out, tok_dir, name.replace("b_", "b_grown_"), long, long_steps, grow=grow,
                                  init_from=str(out / "a_short"), short_context=context,
                                  learning_rate=scale * demo["learning_rate"], muon_lr=scale * demo["muon_lr"])
            runs[name]["lr_scale"] = scale
    runs["c"] = pretrain(out, tok_dir, "c_scratch", long, short_steps + long_steps, short_context=context)
    windows = long_windows(tok_dir, long)
    for key, r in runs.items():
        losses = position_losses(out / r["name"] / "model", windows, stride=context // 2)
        r["buckets"] = [float(losses[:, i * context:(i + 1) * context].mean()) for i in range(4)]
        r["overall"] = float(losses.mean())
    result = {"context": context, "long": long, "windows": len(windows), "scored_tokens": int(windows[:, 1:].size),
              "runs": runs, "threads": torch.get_num_threads()}
    write_json(out / "results.json", result)
    table(out)
    return result


def table(out: Path) -> None:
    r = pg.read_json(out / "results.json")
    C, L = r["context"], r["long"]
    runs = r["runs"]
    c = runs["c"]
    print(f"{r['windows']} val windows of {L} tokens ({r['scored_tokens']:,} tokens scored); loss per position bucket\n")
    heads = [f"{i * C}-{(i + 1) * C - 1}" for i in range(4)]
    print(f"| model | steps at {C} / at {L} | tokens | train time | " + " | ".join(heads) + " | all | vs (c) |")
    print("|---|---|---|---|" + "---|" * 6)
    names = {"a": f"(a) short, {C}, sliding windows", "c": f"(c) from scratch at {L}"}
    for key, x in runs.items():
        at_short = x["steps"] if x["context"] == C else (runs["a"]["steps"] if key.startswith("b") else 0)
        at_long = x["steps"] if x["context"] == L else 0
        tokens = x["tokens"] + (runs["a"]["tokens"] if key.startswith("b") else 0)
        secs = x["seconds"] + (runs["a"]["seconds"] if key.startswith("b") else 0)
        lr = f", peak lr x{x['lr_scale']:g}" if x.get("lr_scale", 1) != 1 else ""
        name = names[key] if key in names else f"(b) (a) grown to {L} ({key.split('_')[1]}), then {x['steps']} steps{lr}"
        print(f"| {name} | {at_short:,} / {at_long:,} | {tokens / 1e6:.2f}M | {secs / 60:.1f} min | "
              + " | ".join(f"{v:.3f}" for v in x["buckets"])
              + f" | {x['overall']:.3f} | {x['overall'] / c['overall'] - 1:+.1%} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--out", type=Path, default=Path("runs/context_grow"))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--short-steps", type=int, default=500)
    ap.add_argument("--long-steps", type=int, default=150)
    ap.add_argument("--grow", nargs="+", default=["copy", "interpolate"])
    ap.add_argument("--lr-scale", type=float, nargs="+", default=[1.0, 0.25])
    args = ap.parse_args()
    if args.what == "run":
        run(args.out, args.context, args.short_steps, args.long_steps, args.grow, args.lr_scale)
    else:
        table(args.out)
