"""Stage 2: pretraining, whole (02_pretrain). The loop itself is train.train.

Imports: common, config, tokenizer, device, model, batches, train, launch, plots.
"""
from __future__ import annotations

import dataclasses
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
from .device import cpu_has_native_bf16
from .launch import processes_for
from .model import build_model, count_params, flops_per_token
from .plots import plot_losses
from .tokenizer import load_tokenizer
from .train import Budget, RunState, load_checkpoint, save_hf_folder, train


@quiet_library_bars()
def run_pretrain_stage(cfg: PretrainConfig, stop_at_step: int | None = None, precision: str | None = None) -> Path:
    """Stage 2, whole: data, model, the loop, then checkpoint, HF folder, log, plot, metrics.
    `stop_at_step` and `precision` (one already chosen) are for the tests."""
    budget = Budget(cfg.max_hours)  # this session's budget counts from the stage's start
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    tokenizer = load_tokenizer(tok_dir)
    meta = read_json(tok_dir / "meta.json")
    resume_dir = resolve_resume(cfg.resume_from, "pretrain", cfg.out_dir)
    resume = load_checkpoint(resume_dir) if resume_dir else None
    if resume:
        old = resume["config"]
        for name in MODEL_SHAPE:
            if old[name] != getattr(cfg, name):
                raise PocketGPTError(f"resume_from={resume_dir}: that run has {name}={old[name]}, these parameters "
                                     f"say {getattr(cfg, name)}. Use the same model shape to resume.")
        if is_main_process():
            print(f"resuming {resume_dir} at step {RunState.from_checkpoint(resume).step} of {cfg.max_steps} "
                  f"(this session's budget: {duration(cfg.max_hours * 3600)})")
    train_data = TokenWindows(tok_dir / "train.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    val_data = TokenWindows(tok_dir / "val.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    model = build_model(meta["vocab_size"], cfg)
    inputs = {"tokenizer": tok_dir, **({"resumed_from": resume_dir / "ckpt.pt"} if resume else {})}
    with stage_output(cfg.out_dir, "pretrain", dataclasses.asdict(cfg), inputs, resume_dir) as work:
        result = train(model, train_data, val_data.eval_batches(cfg.eval_windows), cfg, work, budget, resume,
                       stop_at_step, precision=precision, max_epochs=cfg.max_epochs)
        if not result.pop("is_main_process"):
            return Path(cfg.out_dir)
        model = result.pop("model")
        save_hf_folder(model, tokenizer, work / "model")
        write_json(work / "metrics.json", {**result, "train_tokens_available": meta["train_tokens"],
                                           "epochs": result["tokens"] / max(meta["train_tokens"], 1)})
        plot_losses({"pretrain": work / "log.csv"}, work / "loss.png", show=False)
    return Path(cfg.out_dir)


def describe_pretrain(cfg: PretrainConfig) -> dict:
    """What is about to be trained: size, FLOPs per token, tokens per step (over the processes launch
    will start), data, and how many passes over it max_epochs allows."""
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    meta = read_json(tok_dir / "meta.json")
    model = build_model(meta["vocab_size"], cfg)
    processes, why = processes_for(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.n_positions * processes
    return {"tokenizer": str(tok_dir), "vocab_size": meta["vocab_size"], "parameters": count_params(model),
            "flops_per_token": flops_per_token(model), "tokens_per_step": tokens_per_step,
            "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
            "epochs_at_max_steps": (round(tokens_per_step * cfg.max_steps / meta["train_tokens"], 2)
                                    if isinstance(cfg.max_steps, int) else
                                    f"auto: what this session's budget allows, at most {cfg.max_epochs:g} epochs"),
            "optimizer": cfg.optimizer, "schedule": cfg.schedule,
            "processes": f"{processes} ({why})", "cpu_native_bf16": cpu_has_native_bf16()}
