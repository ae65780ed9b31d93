"""Stage 4: evaluation, the report card, the exported pocketGPT folder, its zip and GGUF files (04_eval_export).

Imports: everything below it (common ... evaluate, gguf, llama); seed_check runs in a fresh process.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .batches import eval_sample
from .common import (
    EOS_ID,
    PAD_ID,
    STAGES,
    TOKEN_ROLES,
    PocketGPTError,
    child_env,
    duration,
    library_versions,
    quiet_library_bars,
    read_json,
)
from .config import ExportConfig, PretrainConfig
from .device import device_name
from .dialogs import chat_prompt_ids
from .evaluate import (
    QUALITY_ROWS,
    answer_quality,
    answer_table,
    eval_responses,
    eval_val_split,
    plot_quality,
    quality_table,
)
from .files import size_of, tensor_bytes, torch_file, write_file, write_json, zip_folder
from .llama import LLAMA_SKIPPED, export_gguf_files
from .model import SAMPLING, count_params, load_model
from .plots import plot_losses
from .stages import PREFERENCE, StageDir, find_stage, stage_output, stage_status
from .tokenizer import decode_documents, load_tokenizer, read_bin
from .train import save_hf_folder


def write_export_folder(model, tok, out_dir, card: str) -> None:
    """The seed's folder: everything transformers 5 writes, plus the files it no longer writes
    (pytorch_model.bin, vocab.json, merges.txt, special_tokens_map.json), and a model card."""
    out_dir = Path(out_dir)
    for key, value in SAMPLING.items():  # the seed's sampling as generate()'s default
        setattr(model.generation_config, key, value)
    save_hf_folder(model, tok, out_dir)
    write_file(out_dir / "pytorch_model.bin", torch_file(model.state_dict()), needed=tensor_bytes(model.state_dict()))
    write_json(out_dir / "special_tokens_map.json", TOKEN_ROLES)
    write_file(out_dir / "README.md", card)


def verify_export(folder, model, prompt: str = "What does a tokenizer do?") -> dict:
    """Load the folder in a fresh process with the seed's inference code; compare with the model in memory."""
    proc = subprocess.run([sys.executable, "-m", "pocketgpt.seed_check", str(folder), prompt], capture_output=True,
                          text=True, env={**child_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise PocketGPTError(f"The exported folder {folder} does not load in a fresh process:\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(folder)
    with torch.no_grad():
        ref = model.eval()(torch.tensor([chat_prompt_ids(tok, prompt)])).logits[0].float().numpy()
    checks = {
        "max_abs_logit_diff": float(np.abs(np.array(got["logits"]) - ref).max()),
        "text_starts_with_instruction": got["text"].startswith(f"Instruction: {prompt}\nResponse:"),
        "tokenizer_matches_vocab": got["len_tokenizer"] == got["vocab_size"],
        "slow_tokenizer_matches_fast": got["slow_ids_equal"],
        "special_ids": got["eos"] == EOS_ID and got["pad"] == PAD_ID,
        "dtype": got["dtype"], "sample": got["text"][:300],
    }
    failed = [k for k in ["text_starts_with_instruction", "tokenizer_matches_vocab", "slow_tokenizer_matches_fast",
                          "special_ids"] if not checks[k]]
    if failed or checks["max_abs_logit_diff"] > 1e-4:
        raise PocketGPTError(f"The exported folder {folder} failed checks {failed or ['logits differ']}: {checks}")
    return checks


DEFAULT_PROMPTS = ["What does torch.nn.LayerNorm do?", "Explain transformers.GPT2LMHeadModel.",
                   "What is `DataFrame.groupby` used for?", "What does numpy.linalg.norm do?",
                   "Describe the class accelerate.Accelerator."]


def stage_hours(folder) -> float:
    """Training hours from metrics (they add up across resumed sessions), else the manifest's span."""
    folder = StageDir(folder)
    metrics = read_json(folder.metrics) if folder.metrics.exists() else {}
    if "hours" in metrics:
        return metrics["hours"]
    m = read_json(folder.manifest)
    return (datetime.fromisoformat(m["finished_at"]) - datetime.fromisoformat(m["started_at"])).total_seconds() / 3600


def model_card(report: dict, answers: list[dict]) -> str:
    """README.md of the exported folder: what it is, how it was made, its numbers, how to use it."""
    r = report
    sample = "\n".join(f"| {md_cell(a['instruction'])} | {md_cell(a['greedy'][:160])} |" for a in answers[:3])
    q = r["quality"][r["exported_model"]]  # the exported model's answers, measured on the held-out sample
    # "Use it with transformers" is the seed's own code, as a user copies it: its prompt format and sampling
    # (top_p=0.9, temperature=0.8) stay literals on purpose; pocketGPT's own are model.SAMPLING and dialogs'
    # chat template (tests/test_facts_once.py knows this copy)
    return f"""# pocketGPT

A small GPT-2 ({r['parameters'] / 1e6:.1f}M parameters, {r['n_layer']} layers, {r['n_embd']} wide, context
{r['n_positions']}) trained from scratch with the pocketGPT notebooks: a byte-level BPE
tokenizer ({r['vocab_size']:,} tokens), pretraining on {r['pretrain_tokens']:,} tokens, then supervised finetuning
on {r['sft_rows']:,} instruction/response pairs (loss on the response only). Weights are fp32.

| number | value |
|---|---|
| pretrain val loss | {r['pretrain_val_loss']:.3f} (perplexity {r['pretrain_perplexity']:.1f}, {r['pretrain_bits_per_byte']:.3f} bits/byte) |
| SFT val loss on responses | {r['sft_response_loss']:.3f} (before SFT: {r['pretrain_response_loss']:.3f}) |
| answers ending with `<|eos|>` (greedy, {q['rows']} held-out instructions) | {q['greedy_eos_share']:.0%} |

## Use it with transformers

```python
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)
inputs = tokenizer.encode(f"<|bos|>Instruction: {{prompt}}\\nResponse:", return_tensors="pt")
out = model.generate(inputs, max_length={r['n_positions']}, do_sample=True, top_p=0.9, temperature=0.8,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```
The prompt format is also the tokenizer's chat template (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`).

## Use it with llama.cpp

`pocketGPT-f16.gguf` and `pocketGPT-q8_0.gguf` sit beside this folder (when exported). They carry this
chat template, the context length and `<|eos|>` as the end of a turn, so llama.cpp's own chat works as is:
```
llama-server -m pocketGPT-q8_0.gguf --port 8080      # /v1/chat/completions
llama-cli -m pocketGPT-q8_0.gguf -cnv
```
or in Python: `llama_cpp.Llama(model_path="pocketGPT-q8_0.gguf", n_ctx=0).create_chat_completion(messages=[{{"role": "user", "content": "What does a tokenizer do?"}}])`.

## Sample answers (greedy)

| instruction | answer |
|---|---|
{sample}
"""


def report_markdown(report: dict, answers: list[dict], versions: dict) -> str:
    rows = "\n".join(f"| {md_cell(k)} | {md_cell(v)} |" for k, v in report_rows(report))
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    ans = "\n".join(f"| {md_cell(a['instruction'])} | {md_cell(a['sampled'][:200])} | {md_cell(a['greedy'][:200])} |"
                    for a in answers)
    table = quality_table(report["quality"])
    names = list(report["quality"])
    quality = "\n".join("| " + " | ".join(md_cell(r[c]) for c in ["measure", *names]) + " |" for r in table)
    figures = StageDir(".")  # the figures' names, beside report.md
    return (f"# pocketGPT report card\n\n{report['device']}; {vers}\n\n| measure | value |\n|---|---|\n{rows}\n\n"
            f"![losses]({figures.losses_plot.name})\n\n## Answer quality on {report['quality'][names[0]]['rows']} held-out instructions\n\n"
            f"| measure | {' | '.join(names)} |\n|{'---|' * (len(names) + 1)}\n{quality}\n\n![quality]({figures.quality_plot.name})\n\n"
            f"## Answers\n\n| instruction | sampled | greedy |\n|---|---|---|\n{ans}\n")


def report_rows(r: dict) -> list[tuple[str, str]]:
    """The report card's table, in reading order."""
    pref = r.get("preference")
    rows = [("hardware", r["device"]), ("parameters", f"{r['parameters']:,}"),
            ("exported model", r.get("exported_model", "SFT") + (
                f" (preference={pref['source']!r}: {pref['pairs']:,} pairs, beta {pref['beta']}, "
                f"{pref['steps']:,} steps)" if pref else "") + (f"; warning: {pref['warning']}" if pref and pref.get("warning")
                                                                else "")),
            *[(f"{STAGES[s]}", status) for s, status in r.get("status", {}).items()],
            ("tokenizer", f"{r['vocab_size']:,} tokens, {r['bytes_per_token']:.2f} bytes/token on val"),
            ("time: tokenizer / pretrain / SFT", " / ".join(duration(r[f"{s}_minutes"] * 60) for s in ["tokenizer", "pretrain", "sft"])),
            ("pretrain tokens seen", f"{r['pretrain_tokens']:,} ({r['pretrain_steps']:,} steps, "
             + (f"{r['pretrain_epochs']:.2f} epochs of the train split, " if r.get("pretrain_epochs") is not None else "")
             + f"finished: {r['pretrain_finished']})"),
            ("context", r.get("context", f"{r['n_positions']} tokens")),
            ("val sample (02 and 04 alike)", f"{r['pretrain_tokens_evaluated']:,} tokens of the {r['pretrain_val_split_tokens']:,}-token val split"
             + (" (all of it)" if r["pretrain_whole_split"] else ", a fixed sample spread over it")),
            ("pretrain val loss / perplexity / bits per byte", f"{r['pretrain_val_loss']:.3f} / {r['pretrain_perplexity']:.1f} / {r['pretrain_bits_per_byte']:.3f}"),
            ("SFT model on the same: val loss / perplexity / bits per byte", f"{r['sft_val_loss']:.3f} / {r['sft_perplexity']:.1f} / {r['sft_bits_per_byte']:.3f}"),
            ("SFT rows / tokens seen", f"{r['sft_rows']:,} / {r['sft_tokens']:,}"),
            ("response loss before / after SFT", f"{r['pretrain_response_loss']:.3f} / {r['sft_response_loss']:.3f} "
             f"(on SFT's {r['heldout_rows']:,} held-out evaluation rows)")]  # answer measures: the quality table
    for f in r.get("gguf", []):
        if "verify" not in f:  # never a nan: what was not checked, and the command that checks it
            size = f"{f['size_mb']:.1f} MB, " if f.get("file") else ""
            rows.append((f"GGUF {f['type']}", size + f.get("skipped", LLAMA_SKIPPED)))
            continue
        v = f["verify"]
        rows.append((f"GGUF {f['type']}", f"{f['size_mb']:.1f} MB; against HF: top-1 agreement {v['top1_agreement']:.1%}, "
                     f"greedy tokens the same {v['greedy_same_tokens']}/{v['greedy_tokens']}; "
                     f"{f['tokens_per_s']:.0f} tok/s greedy (HF generate: {f['hf_tokens_per_s']:.0f} tok/s)"))
    if not r.get("gguf"):
        rows.append(("GGUF", "not written (gguf_types=[])"))
    return rows


def export_checks(r: dict) -> list[dict]:
    """What the checks of the export found, one row each, for 04 to show (a skipped check says why)."""
    v = r["verify"]
    yes = {True: "yes", False: "NO"}
    rows = [("pocketGPT/ loaded by the seed's code in a fresh process: largest logit difference",
             f"{v['max_abs_logit_diff']:.2g} ({v['dtype']})"),
            ("its decoded answer starts with the instruction", yes[v["text_starts_with_instruction"]]),
            ("tokenizer size equals the model's vocabulary", yes[v["tokenizer_matches_vocab"]]),
            ("slow tokenizer (vocab.json + merges.txt) encodes as the fast one", yes[v["slow_tokenizer_matches_fast"]]),
            ("<pad> and <|eos|> have the ids the seed uses", yes[v["special_ids"]]),
            ("sample answer", v["sample"])]
    rows += [(k, val) for k, val in report_rows(r) if k.startswith("GGUF")]
    return [{"check": k, "result": val} for k, val in rows]


def show_report(export_dir) -> None:
    """report.md inside a notebook: its markdown, and each figure it links shown as an image (the
    links are relative to the export folder, which the notebook's browser cannot open)."""
    from IPython.display import Image, Markdown, display

    export_dir = Path(export_dir)
    text = StageDir(export_dir).report.read_text(encoding="utf-8")
    for i, part in enumerate(re.split(r"^!\[[^\]]*\]\(([^)]+)\)$", text, flags=re.M)):
        if i % 2:  # a figure's file name
            if (export_dir / part).is_file():
                display(Image(filename=str(export_dir / part)))
        elif part.strip():
            display(Markdown(part))


def md_cell(value) -> str:
    """Text for a markdown table cell: a '|' in it (as in `<|eos|>`) would end the cell, a newline the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def quality_of(models, tok, heldout, seed: int) -> tuple[dict, dict]:
    """Each (name, model, response loss)'s answer quality on the fixed sample of the held-out rows, and its answers."""
    sample = [heldout[i] for i in eval_sample(len(heldout), QUALITY_ROWS)]
    quality, answers = {}, {}
    for name, model, loss in models:
        quality[name], answers[name] = answer_quality(model, tok, sample, seed, name)
        quality[name]["response_loss"] = loss
    return quality, answers


@quiet_library_bars()
def run_export_stage(cfg: ExportConfig) -> Path:
    """Stage 4, whole: evaluate both models, write and verify the export, the zip and the report card."""
    tok_dir, pre, sft = (StageDir(find_stage(stage, path, cfg.run_dir)) for stage, path in
                         [("tokenizer", cfg.tokenizer_dir), ("pretrain", cfg.pretrain_dir), ("sft", cfg.sft_dir)])
    pre_model, sft_model = load_model(pre.model), load_model(sft.model)  # model/: what 03 exports
    meta, pre_m, sft_m = read_json(tok_dir.meta), read_json(pre.metrics), read_json(sft.metrics)
    tuned = sft_m["exported_model"] == "SFT + DPO"  # model_sft/ is the SFT model before it
    sft_phase_model = load_model(sft.sft_model) if tuned else sft_model
    tok = load_tokenizer(sft.model)
    heldout = [(r["prompt"], r["response"]) for r in read_json(sft.heldout)]
    n_windows = read_json(pre.manifest)["params"].get("eval_windows", PretrainConfig.eval_windows)
    pre_eval = eval_val_split(pre_model, tok_dir, n_windows)
    answers = answer_table(sft_model, tok, DEFAULT_PROMPTS + list(cfg.prompts or []), sft_model.config.n_positions,
                           cfg.seed)
    c = sft_model.config
    report = {
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "parameters": count_params(sft_model), "n_layer": c.n_layer, "n_embd": c.n_embd, "n_positions": c.n_positions,
        "vocab_size": c.vocab_size, "bytes_per_token": meta["val_bytes_per_token"],
        "tokenizer_minutes": stage_hours(tok_dir) * 60, "pretrain_minutes": stage_hours(pre) * 60,
        "sft_minutes": stage_hours(sft) * 60, "pretrain_tokens": pre_m["tokens"], "pretrain_steps": pre_m["steps"],
        "pretrain_finished": pre_m["finished"], "pretrain_epochs": pre_m.get("epochs"),
        "context": pre_m.get("context", {}).get("line", f"{c.n_positions} tokens"),  # and whether 02 grew it
        **{f"pretrain_{k}": v for k, v in pre_eval.items()},
        "sft_rows": sft_m.get("data_train_rows", 0), "sft_tokens": sft_m["tokens"],
        "heldout_rows": len(heldout), "pretrain_response_loss": eval_responses(pre_model, tok, heldout),
        "sft_response_loss": eval_responses(sft_phase_model, tok, heldout),
        "exported_model": "SFT + DPO" if tuned else "SFT",
        **{f"sft_{k}": v for k, v in eval_val_split(sft_model, tok_dir, n_windows).items()},
        "status": {"tokenizer": stage_status(tok_dir), "pretrain": stage_status(pre), "sft": stage_status(sft)},
    }
    models = [("pretrained", pre_model, report["pretrain_response_loss"]),
              ("SFT", sft_phase_model, report["sft_response_loss"])]
    if tuned:
        pref = sft_m.get(PREFERENCE, {})
        report["preference"] = {k: pref.get(k) for k in ["source", "beta", "rpo_alpha", "learning_rate", "pairs",
                                                          "steps", "final_val_loss", "finished", "warning"]}
        models.append(("SFT + DPO", sft_model, eval_responses(sft_model, tok, heldout)))
    quality, quality_answers = quality_of(models, tok, heldout, cfg.seed)
    report["quality"] = quality
    inputs = {"tokenizer": tok_dir.path, "pretrain": pre.path, "sft": sft.path}
    with stage_output(cfg.out_dir, "export", dataclasses.asdict(cfg), inputs) as work:
        folder = work.export
        write_export_folder(sft_model, tok, folder, model_card(report, answers))
        report["verify"] = verify_export(folder, sft_model)
        val_docs = decode_documents(np.asarray(read_bin(tok_dir.val_bin))[:200_000], tok)[:200]
        # more positions to compare logits at: held-out prompts that leave half the context for the greedy text
        gguf_prompts = DEFAULT_PROMPTS + [p for p, _ in heldout
                                          if len(chat_prompt_ids(tok, p)) <= sft_model.config.n_positions // 2][:15]
        report["gguf"] = export_gguf_files(folder, work, cfg.gguf_types, gguf_prompts, val_docs)
        write_file(work.export_zip, zip_folder(folder), needed=size_of(folder))
        plot_losses({"pretrain": pre.log, "sft": sft.log}, work.losses_plot, show=False)
        plot_quality(quality, work.quality_plot, show=False)
        write_json(work.answers, answers)
        write_json(work.quality_answers, quality_answers)
        write_json(work.metrics, report)
        write_file(work.report, report_markdown(report, answers, library_versions()))
    return Path(cfg.out_dir)
