"""Stage 3: supervised finetuning on instruction/response pairs, loss on the response only (03_sft).

Owns: reading, cleaning, encoding and splitting the dialogs for training; the SFT phase's plan; run_sft_stage
(the SFT phase, then with `preference` the DPO phase, each resumed from its own folder: stages.Phase); the
notebook's tables.
Imports: common, files, config, data, stages, tokenizer, model, batches, checkpoint, budget, train, plots, dialogs, dpo.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from .batches import DialogBatches, eval_sample
from .budget import Budget
from .checkpoint import RunState, load_checkpoint
from .common import IGNORE_ID, PocketGPTError, duration, is_main_process, quiet_library_bars, read_json, world_size
from .config import SFTConfig
from .data import files_summary, split_of
from .dialogs import CHAT_TEMPLATE, chat_prompt_ids, dialog_files, dialog_key, encode_dialogs, read_dialogs
from .dpo import read_preference_pairs, run_preference_phase
from .files import write_json
from .model import ANSWER_TOKENS, LMLoss, generate, load_model
from .plots import plot_losses
from .stages import PREFERENCE, Phase, StageDir, carry_over, find_stage, resolve_resume, stage_output
from .tokenizer import load_tokenizer
from .train import TrainOptions, save_hf_folder, train


def prepare_sft_data(cfg: SFTConfig, tok, context: int) -> dict:
    """Read, clean, encode and split the dialogs; every count is kept for the report.

    The evaluation rows are a fixed sample spread over the val split (all of it when small):
    SFT's val loss and 04's response loss are measured on the same rows (heldout.json)."""
    files = dialog_files(cfg.dialogs_path, cfg.run_dir)
    print(f"dialogs_path={cfg.dialogs_path}: {files_summary(files)}")
    pairs, report = read_dialogs(files, cfg.prompt_column, cfg.response_column)
    for f, how in report.get("read_as", {}).items():
        print(f"{Path(f).name}: read as {how} (found from its header and byte order mark)")
    kept, rows, lengths = encode_dialogs(tok, pairs, context, cfg.too_long)
    report.update(lengths)
    rows_by_split, pairs_by_split = {"train": [], "val": []}, {"train": [], "val": []}
    for pair, row in zip(kept, rows):  # split by a seeded hash of the row, as the corpus is
        s = split_of(dialog_key(*pair), cfg.seed, cfg.val_fraction)
        rows_by_split[s].append(row)
        pairs_by_split[s].append(pair)
    if not rows_by_split["val"] or len(rows_by_split["train"]) < world_size():
        raise PocketGPTError(f"{len(rows)} usable dialog rows cannot be split with val_fraction={cfg.val_fraction} "
                             f"across {world_size()} process(es): provide more rows or change val_fraction.")
    sample = eval_sample(len(rows_by_split["val"]), cfg.eval_rows)
    rows_by_split["eval"] = [rows_by_split["val"][i] for i in sample]
    pairs_by_split["eval"] = [pairs_by_split["val"][i] for i in sample]
    report.update(train_rows=len(rows_by_split["train"]), val_rows=len(rows_by_split["val"]),
                  eval_rows=len(sample), train_tokens=sum(len(r[0]) for r in rows_by_split["train"]),
                  response_tokens=sum(sum(t != IGNORE_ID for t in r[1]) for r in rows_by_split["train"]))
    return {"rows": rows_by_split, "pairs": pairs_by_split, "report": report}


def set_dropout(model, p: float) -> None:
    """Set every dropout of a loaded model (they are fixed when the model is built) and its config."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = p


@dataclasses.dataclass
class SFTPlan:
    """What the SFT phase trains on, and for how long; `report` holds the counts for data_report.json."""
    train: DialogBatches
    val: DialogBatches
    max_steps: int
    warmup_steps: int
    report: dict


def plan_sft(cfg: SFTConfig, data: dict) -> SFTPlan:
    """The batches and the step plan of the SFT phase: `epochs` passes over the train rows unless max_steps says."""
    # the global batch (batch_size rows on each process) is fixed before the padding share is measured
    train_data = DialogBatches(data["rows"]["train"], cfg.batch_size, cfg.seed, world=world_size())
    val_data = DialogBatches(data["rows"]["eval"], cfg.batch_size, cfg.seed)
    steps_per_epoch = -(-len(train_data) // cfg.grad_accum_steps)
    max_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, max_steps // 33)
    report = {**data["report"], "real_token_fraction": train_data.real_token_fraction(),
              "processes": world_size(), "steps_per_epoch": steps_per_epoch, "max_steps": max_steps}
    return SFTPlan(train_data, val_data, max_steps, warmup_steps, report)


@quiet_library_bars()
def run_sft_stage(cfg: SFTConfig, stop_at_step: int | None = None) -> Path:
    """Stage 3, whole: the pretrained model and tokenizer, the dialogs, the shared loop, the folder;
    then, with `preference`, DPO on the SFT model (the SFT model is kept in model_sft/, the tuned
    one is model/). Each phase resumes from its own folder in the run resumed from; an SFT phase that
    finished there is found by it (StageDir.sft_finished) and carried over. `stop_at_step` (tests) stops
    the last phase that runs."""
    budget = Budget(cfg.max_hours)  # this session's budget counts from the stage's start
    pre = StageDir(find_stage("pretrain", cfg.pretrain_dir, cfg.run_dir))
    tok = load_tokenizer(pre.model)
    tok.chat_template = CHAT_TEMPLATE
    model = load_model(pre.model).train()
    set_dropout(model, cfg.dropout)
    data = prepare_sft_data(cfg, tok, model.config.n_positions)
    if cfg.preference not in (None, "self"):  # a bad preference file stops the stage now, not after hours of SFT
        read_preference_pairs(cfg.preference)
    plan = plan_sft(cfg, data)
    resume_dir = resolve_resume(cfg.resume_from, "sft", cfg.out_dir)
    resumed = StageDir(resume_dir) if resume_dir else None
    sft_done = bool(cfg.preference and resumed and resumed.sft_finished())  # the preference phase is next
    resume = load_checkpoint(resume_dir) if resume_dir and not sft_done else None
    if resume_dir and is_main_process():
        print(f"resuming {resume_dir} " + ("in its preference phase" if sft_done else
              f"at step {RunState.from_checkpoint(resume).step} of {plan.max_steps}")
              + f" (this session's budget: {duration(cfg.max_hours * 3600)})")
    inputs = {"pretrain": pre.path, **{f"dialogs:{Path(f).name}": Path(f) for f in data["report"]["files"]},
              **({"resumed_from": resumed.newest_ckpt()} if resumed else {}),
              **({"preference": Path(cfg.preference)} if cfg.preference not in (None, "self") else {})}
    with stage_output(cfg.out_dir, "sft", dataclasses.asdict(cfg), inputs, resume_dir) as work:
        write_json(work.data_report, plan.report)
        write_json(work.heldout, [{"prompt": p, "response": r} for p, r in data["pairs"]["eval"]])
        if sft_done:  # the SFT phase ended in an earlier session: its model, log and numbers are there
            carry_over(resumed.sft_phase_files(), work)
            model, result = load_model(resumed.sft_model), read_json(resumed.sft_phase)
        else:
            phase = Phase(work, resumed, budget, None if cfg.preference else stop_at_step)
            model, result = train_sft_phase(cfg, model, tok, plan, phase, resume)
        logs = {"sft": work.log}
        if cfg.preference and result["finished"]:
            phase = Phase(work.preference, resumed.preference if sft_done else None, budget, stop_at_step)
            preferred = run_preference_phase(cfg, model, tok, data["pairs"]["train"], phase)
            result = {**result, PREFERENCE: preferred.metrics, "finished": preferred.metrics["finished"]}
            if is_main_process():  # a phase stopped by its budget leaves the SFT model as the one to use
                save_hf_folder(preferred.model if result["finished"] else model, tok, work.model)
            logs[PREFERENCE] = work.preference.log
        if not is_main_process():
            return Path(cfg.out_dir)
        write_json(work.metrics, {**result, **{f"data_{k}": v for k, v in plan.report.items() if k != "columns"},
                                  "pretrain_val_loss": read_json(pre.metrics).get("final_val_loss"),
                                  "exported_model": "SFT + DPO" if cfg.preference and result["finished"] else "SFT"})
        plot_losses(logs, work.loss_plot, show=False)
    return Path(cfg.out_dir)


def train_sft_phase(cfg: SFTConfig, model, tok, plan: SFTPlan, phase: Phase, resume: dict | None):
    """The SFT phase through the shared loop, from `resume` (the checkpoint of phase.resumed, or None). Saves model/
    (what 04 exports, until a preference phase finishes) and, when a preference phase follows a finished SFT
    phase, the SFT model and its numbers (model_sft/, sft_phase.json). Returns the model and its numbers."""
    trained = train(model, plan.train, plan.val.eval_batches(len(plan.val.rows)), cfg,
                    TrainOptions(phase.folder, stage="sft", budget=phase.budget, resume=resume,
                                 loss_module=LMLoss(model, padded=True), max_steps=plan.max_steps,
                                 warmup_steps=plan.warmup_steps, stop_at_step=phase.stop_at_step))
    work = phase.folder
    if is_main_process():
        save_hf_folder(trained.model, tok, work.model)
        if cfg.preference and trained.metrics["finished"]:  # the preference phase's reference, and 04's "SFT" row
            save_hf_folder(trained.model, tok, work.sft_model)
            write_json(work.sft_phase, trained.metrics)  # the mark of a finished SFT phase
    return trained.model, trained.metrics


def data_report_rows(stage_dir) -> list[dict]:
    """What reading and cleaning the dialogs did, as rows for the notebook's table."""
    r = read_json(StageDir(stage_dir).data_report)
    layouts = {f"rows_{k}": n for k, n in r.get("rows_by_layout", {}).items()}  # older reports have none
    r = {**r, **layouts}
    names = {"rows_read": "rows read", **{k: f"rows in the {k[5:]} layout" for k in layouts},
             "examples": "examples (one per answer; a chat row gives one per assistant turn)",
             "dropped_empty": "dropped: empty prompt or response",
             "dropped_duplicates": "dropped: exact duplicates", "history_cut": "earlier turns cut to fit the context",
             "truncated": "answer cut to fit the context",
             "dropped_too_long": "dropped: too long", "train_rows": "train rows", "val_rows": "val rows",
             "train_tokens": "train tokens", "response_tokens": "train tokens with loss (response + eos)",
             "real_token_fraction": "real (not padding) tokens per batch", "steps_per_epoch": "steps per epoch"}
    return [{"": label, "value": f"{r[k]:.1%}" if isinstance(r[k], float) else f"{r[k]:,}"}
            for k, label in names.items() if k in r]


def compare_answers(before_dir, after_dir, prompts, max_new_tokens: int = ANSWER_TOKENS) -> list[dict]:
    """Answers to the same instructions from two models (before and after SFT), sampled as the seed does."""
    models = {"before": load_model(before_dir), "after": load_model(after_dir)}
    tok = load_tokenizer(after_dir)
    rows = []
    for p in prompts:
        row = {"instruction": p}
        for name, model in models.items():
            ids = generate(model, chat_prompt_ids(tok, p), max_new_tokens)
            row[name] = tok.decode(ids, skip_special_tokens=True).strip()
        rows.append(row)
    return rows
