"""The preference (DPO) table of the README: one DPO phase per setting on the same SFT model, scored by 04's
answer measures (answer ranking, ROUGE-L, endings, repetition) on the same held-out rows.

    python tools/preference_table.py --run runs/demo [--settings "0.1,5e-5,0" "0.1,1e-4,1"]

`--run` is a finished demo pipeline (its sft/ is the SFT model every setting starts from). Each setting is
beta,learning_rate,rpo_alpha; its phase runs in <run>/preference/<setting>/. Prints a markdown table.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg  # noqa: E402

from pocketgpt.batches import eval_sample  # noqa: E402
from pocketgpt.evaluate import QUALITY_ROWS, answer_quality, eval_responses  # noqa: E402


def scores(model_dir: Path, tok, sample, heldout) -> dict:
    model = pg.load_model(model_dir)
    numbers, _ = answer_quality(model, tok, sample, name=model_dir.parent.name)
    return {**numbers, "response_loss": eval_responses(model, tok, heldout)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--settings", nargs="+", default=["0.1,5e-5,0", "0.1,1e-4,1", "0.1,5e-5,1"])
    args = p.parse_args(argv)
    run = Path(args.run)
    tok = pg.load_tokenizer(run / "sft" / "model")
    heldout = [(r["prompt"], r["response"]) for r in pg.read_json(run / "sft" / "heldout.json")]
    sample = [heldout[i] for i in eval_sample(len(heldout), QUALITY_ROWS)]
    rows = [("SFT", "", "", "", scores(run / "sft" / "model", tok, sample, heldout))]
    for setting in args.settings:
        beta, lr, rpo = (float(v) for v in setting.split(","))
        out = run / "preference" / setting
        if not (out / "manifest.json").exists():
            pg.run_sft_stage(pg.make_config(pg.SFTConfig, "demo", run_dir=str(run), out_dir=str(out), preference="self",
                                            beta=beta, preference_learning_rate=lr, rpo_alpha=rpo,
                                            resume_from=str(run / "sft"), max_hours=5.0))
        m = pg.read_json(out / "metrics.json")["preference"]
        rows.append(("SFT + DPO", beta, lr, rpo, {**scores(out / "model", tok, sample, heldout),
                                                   "warning": m.get("warning")}))
    print("| model | beta | lr | rpo_alpha | answer likeliest after its own question, of 8 (95% interval) | response loss | greedy ROUGE-L | "
          "greedy ends with eos | greedy repeated 3-grams | warned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, beta, lr, rpo, q in rows:
        print(f"| {name} | {beta} | {lr} | {rpo} | {q['ranking_top1']:.1%} ({q['ranking_low']:.1%}-{q['ranking_high']:.1%}) | "
              f"{q['response_loss']:.3f} | {q['greedy_rougeL']:.3f} | {q['greedy_eos_share']:.1%} | "
              f"{q['greedy_repeated_3gram_share']:.1%} | {'yes' if q.get('warning') else ''} |")
    print(json.dumps([{"model": r[0], "beta": r[1], "lr": r[2], "rpo_alpha": r[3], **r[4]} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
