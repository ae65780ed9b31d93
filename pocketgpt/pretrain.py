"""Stage 2: pretraining, whole (02_pretrain). The loop itself is train.train.

Owns: init_from (a finished run's model starting a new one, its context grown where n_positions is larger)
and the model's lineage in its config (pocketgpt_init: what it started from, at which context, after how many
tokens), which metrics.json and 04's report card show.

Imports: common, data, config, tokenizer, device, model, batches, train, launch, plots.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .batches import TokenWindows
from .common import (
    PocketGPTError,
    duration,
    find_stage,
    is_main_process,
    quiet_library_bars,
    read_json,
    resolve_resume,
    stage_output,
    write_json,
)
from .config import MODEL_SHAPE, PretrainConfig
from .data import fingerprint
from .device import cpu_has_native_bf16
from .launch import processes_for
from .model import GROW_POSITIONS, build_model, count_params, flops_per_token, grow_positions
from .plots import plot_losses
from .tokenizer import load_tokenizer
from .train import Budget, RunState, load_checkpoint, save_hf_folder, train


@quiet_library_bars()
def run_pretrain_stage(cfg: PretrainConfig, stop_at_step: int | None = None, precision: str | None = None,
                       grow: str = GROW_POSITIONS) -> Path:
    """Stage 2, whole: data, model, the loop, then checkpoint, HF folder, log, plot, metrics.
    `stop_at_step` and `precision` (one already chosen) are for the tests, `grow` (how init_from grows the
    position embeddings) for tools/context_grow.py, which measures the candidates."""
    budget = Budget(cfg.max_hours)  # this session's budget counts from the stage's start
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    tokenizer = load_tokenizer(tok_dir)
    meta = read_json(tok_dir / "meta.json")
    init_dir = init_source(cfg, tok_dir, meta["vocab_size"]) if cfg.init_from else None
    resume_dir = resolve_resume(cfg.resume_from, "pretrain", cfg.out_dir)
    if resume_dir and init_dir and cfg.resume_from is None and resume_dir.resolve() == init_dir.resolve():
        resume_dir = None  # on Kaggle the attached run is the one to start from, not one to continue
    resume = load_checkpoint(resume_dir) if resume_dir else None
    if resume:
        old = resume["config"]
        for name in MODEL_SHAPE:
            if old[name] != getattr(cfg, name):
                raise PocketGPTError(f"resume_from={resume_dir}: that run has {name}={old[name]}, these parameters "
                                     f"say {getattr(cfg, name)}. Use the same model shape to resume"
                                     + (" (a longer context starts from a finished run: init_from=that folder)."
                                        if name == "n_positions" else "."))
        if is_main_process():
            print(f"resuming {resume_dir} at step {RunState.from_checkpoint(resume).step} of {cfg.max_steps} "
                  f"(this session's budget: {duration(cfg.max_hours * 3600)})")
    train_data = TokenWindows(tok_dir / "train.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    val_data = TokenWindows(tok_dir / "val.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    model = build_model(meta["vocab_size"], cfg)
    if resume:  # the weights come from the checkpoint; the lineage with them
        model.config.pocketgpt_init = resume.get("model_config", {}).get("pocketgpt_init")
    elif init_dir:
        start_from(model, init_dir, grow)
        if is_main_process():
            print(f"init_from {init_dir}: {lineage_line(model.config.pocketgpt_init, cfg.n_positions)}")
    inputs = {"tokenizer": tok_dir, **({"resumed_from": resume_dir / "ckpt.pt"} if resume else {}),
              **({"init_from": init_dir} if init_dir else {})}
    with stage_output(cfg.out_dir, "pretrain", dataclasses.asdict(cfg), inputs, resume_dir) as work:
        result = train(model, train_data, val_data.eval_batches(cfg.eval_windows), cfg, work, budget, resume,
                       stop_at_step, precision=precision, max_epochs=cfg.max_epochs)
        if not result.main_process:
            return Path(cfg.out_dir)
        model, result = result.model, result.metrics
        save_hf_folder(model, tokenizer, work / "model")
        write_json(work / "metrics.json", {**result, "train_tokens_available": meta["train_tokens"],
                                           "epochs": result["tokens"] / max(meta["train_tokens"], 1),
                                           "context": context_report(model.config, result["tokens"])})
        plot_losses({"pretrain": work / "log.csv"}, work / "loss.png", show=False)
    return Path(cfg.out_dir)


# -----------------------------------------------------------------------------
# init_from: a finished run's model starts this one

def init_source(cfg: PretrainConfig, tok_dir: Path, vocab_size: int) -> Path:
    """The finished pretrain folder init_from names (found by its manifest, as every input is), checked
    against this run: the same tokenizer, the same shape, and a context that may only grow."""
    init_dir = find_stage("pretrain", cfg.init_from)
    trained_with = read_json(init_dir / "manifest.json")["inputs"]["tokenizer"]
    theirs = Path(trained_with["path"])
    # the same folder, or one with the same vocabulary and merges (01 run again on the same corpus)
    if trained_with["fingerprint"] != fingerprint(tok_dir) and bpe_of(init_dir / "model") != bpe_of(tok_dir):
        raise PocketGPTError(f"init_from={cfg.init_from}: the model in {init_dir} was trained with the tokenizer "
                             f"{theirs}, and this run's tokenizer is {tok_dir}, another one (its vocabulary and merges "
                             f"differ): the same token id would mean other text. Use the tokenizer that model was "
                             f"trained with (tokenizer_dir={theirs}; on Kaggle attach that folder), or train from "
                             f"scratch (init_from=None).")
    old = read_json(init_dir / "model" / "config.json")
    given = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": vocab_size}
    wrong = [name for name in given if old[name] != given[name]]
    if wrong:
        raise PocketGPTError(f"init_from={init_dir}: that model has {', '.join(f'{n}={old[n]}' for n in wrong)}, and "
                             f"this run has {', '.join(f'{n}={given[n]}' for n in wrong)}. A model starts another run "
                             f"in its own shape (only n_positions may grow): set "
                             f"{', '.join(f'{n}={old[n]}' for n in wrong if n != 'vocab_size')}.")
    n = old["n_positions"]
    if cfg.n_positions < n:
        raise PocketGPTError(f"init_from={init_dir}: that model's context is n_positions={n} and these parameters "
                             f"say n_positions={cfg.n_positions}. A context does not shrink: the model already reads "
                             f"any text up to {n} tokens, and a shorter table would only drop trained position rows. "
                             f"Set n_positions={n} (continue at its length) or larger (grow it); for less memory per "
                             f"step lower batch_size instead.")
    return init_dir


def bpe_of(folder: Path) -> tuple:
    """A tokenizer's vocabulary and merges, from its tokenizer.json: what makes two tokenizers the same one."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    return model["vocab"], [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]


def start_from(model, init_dir: Path, grow: str = GROW_POSITIONS) -> None:
    """The finished run's weights (its HF folder's model.safetensors) into this run's model, the position
    table grown where this run's context is longer; the lineage goes into the model's config."""
    from safetensors.torch import load_file

    weights = load_file(init_dir / "model" / "model.safetensors")
    old_n, n = weights["transformer.wpe.weight"].shape[0], model.config.n_positions
    if n > old_n:
        weights["transformer.wpe.weight"] = grow_positions(weights["transformer.wpe.weight"], n, grow)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # lm_head is the tied embedding
        raise PocketGPTError(f"init_from={init_dir}: its model.safetensors does not fit a pocketGPT model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}): start from a folder 02 wrote.")
    model.tie_weights()
    before = read_json(init_dir / "metrics.json")
    model.config.pocketgpt_init = {"folder": str(init_dir), "n_positions": old_n, "tokens": before["tokens"],
                                   "positions": grow if n > old_n else None,
                                   "earlier": read_json(init_dir / "model" / "config.json").get("pocketgpt_init")}


def lineage_line(init: dict | None, n_positions: int, tokens: int | None = None) -> str:
    """The context a model was trained at and how it got there, in a line (the report card's row)."""
    now = f"{tokens:,} tokens at {n_positions}" if tokens is not None else f"this run trains at {n_positions}"
    if not init:
        return f"{n_positions} tokens, trained at it from the start" + (f" ({tokens:,} tokens)" if tokens else "")
    if init["positions"]:
        return (f"{n_positions} tokens, grown from {init['n_positions']} (positions: {init['positions']}) "
                f"after {init['tokens']:,} tokens at {init['n_positions']} in {init['folder']}; then {now}")
    return (f"{n_positions} tokens, continued from {init['folder']} (its {init['tokens']:,} tokens at "
            f"{init['n_positions']}); then {now}")


def context_report(config, tokens: int) -> dict:
    """metrics.json's "context": what the model was trained at, whether it grew (from what, after how many
    tokens), how many tokens this run trained at it, and the line the report card shows."""
    init = getattr(config, "pocketgpt_init", None)
    return {"n_positions": config.n_positions, "init_from": init and init["folder"],
            "grown_from": init["n_positions"] if init and init["positions"] else None,
            "positions": init and init["positions"], "tokens_before": init and init["tokens"],
            "tokens_at_context": tokens + (init["tokens"] if init and not init["positions"] else 0),
            "line": lineage_line(init, config.n_positions, tokens)}


def describe_pretrain(cfg: PretrainConfig) -> dict:
    """What is about to be trained: size, FLOPs per token, tokens per step (over the processes launch
    will start), data, and how many passes over it max_epochs allows."""
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    meta = read_json(tok_dir / "meta.json")
    model = build_model(meta["vocab_size"], cfg)
    processes, why = processes_for(cfg)
    init_dir = init_source(cfg, tok_dir, meta["vocab_size"]) if cfg.init_from else None  # its checks, before launch
    old_n = init_dir and read_json(init_dir / "model" / "config.json")["n_positions"]
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.n_positions * processes
    return {"tokenizer": str(tok_dir), "vocab_size": meta["vocab_size"], "parameters": count_params(model),
            "flops_per_token": flops_per_token(model), "tokens_per_step": tokens_per_step,
            "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
            "epochs_at_max_steps": (round(tokens_per_step * cfg.max_steps / meta["train_tokens"], 2)
                                    if isinstance(cfg.max_steps, int) else
                                    f"auto: what this session's budget allows, at most {cfg.max_epochs:g} epochs"),
            "init_from": (f"{init_dir}: its weights, a fresh optimizer and schedule; the context "
                          + (f"grown from {old_n} to {cfg.n_positions}" if cfg.n_positions > old_n else
                             f"stays {old_n}")) if init_dir else None,
            "optimizer": cfg.optimizer, "schedule": cfg.schedule,
            "processes": f"{processes} ({why})", "cpu_native_bf16": cpu_has_native_bf16()}
