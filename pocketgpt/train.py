"""The training loop that pretraining, SFT and DPO share: accelerate, accumulation, schedule, budget, checkpoints.

Read train() top to bottom: the set-up (start_run), the first minutes (fit_first_step), then one loop whose
passes come in order: where the run stands (the last pass comes at max_steps, at stop_at_step, or when the
budget says stop), every log_interval / eval_interval steps a log row and an evaluation (the last pass
evaluates its step too), the budget's word and the plan of max_steps="auto", a checkpoint every
checkpoint_minutes (and on the last pass), then one optimizer step and fp16's skipped steps. The end is the
last pass through the same blocks, as in nanochat. What the loop keeps lives in small objects: Run (this
session's machinery), RunState (where the run is, saved and restored whole: checkpoint.py), Budget and
LogWindow (budget.py). The config is read, never written.
Imports: common, files, stages, tokenizer, device, model, optim, checkpoint, step, budget.
"""
from __future__ import annotations

import csv
import dataclasses
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm import tqdm

from .budget import Budget, LogWindow
from .checkpoint import RunState, restore_checkpoint, restore_rng, rng_state
from .common import BOS_ID, EOS_ID, IGNORE_ID, PAD_ID, PocketGPTError, duration, is_number, watched
from .device import choose_precision, device_name, peak_flops, resolve_compile
from .files import csv_text, report_launch_event, tensor_bytes, torch_file, write_file, write_folder
from .model import LMLoss, count_params, flops_per_token
from .optim import lr_at, make_optimizers, set_lr
from .stages import StageDir
from .step import (
    CompiledOrEager,
    StepParts,
    agree,
    evaluate,
    fit_first_step,
    is_out_of_memory,
    micro_batches,
    out_of_memory,
    pieces_of,
    train_step,
)
from .tokenizer import save_tokenizer

FP16_MAX_SKIPS_IN_A_ROW = 25  # GradScaler halves its scale at each skip: 25 in a row means the run diverged
LOG_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
               "skipped_steps"]  # then the loss's own statistics (DPOLoss: reward accuracy and margin)


@dataclasses.dataclass
class TrainOptions:
    """How one train() call runs beyond its config: where it writes, what it resumes, and what a stage sets for
    itself (SFT counts its epochs in max_steps; the preference phase brings its loss and its schedule)."""
    work: Path                            # the stage folder: log.csv and ckpt.pt go there
    stage: str = "pretrain"               # its name in messages, the progress bar and the checkpoint
    budget: Budget | None = None          # this session's clock (03's two phases share one); cfg.max_hours' if None
    resume: dict | None = None            # a checkpoint (load_checkpoint) to carry on from
    loss_module: nn.Module | None = None  # what trains the model: LMLoss if None (DPOLoss for preference tuning)
    max_steps: int | str | None = None    # cfg's if None; "auto": as many as fit the budget, decay included
    warmup_steps: int | None = None       # cfg's if None
    max_epochs: float | None = None       # max_steps="auto" plans no more passes over the data than this
    precision: str | None = None          # one already chosen (the tests run a T4's fp16 on a CPU)
    stop_at_step: int | None = None       # cuts a run short (the resume tests)


@dataclasses.dataclass
class TrainResult:
    """What train() returns: the trained model, whether this process is the one that writes (rank 0), and the
    run's numbers for metrics.json."""
    model: nn.Module
    main_process: bool
    metrics: dict


# -----------------------------------------------------------------------------
# The loop

def train(model, train_data, val_batches, cfg, opts: TrainOptions) -> TrainResult:
    """The loop every stage trains with: `model` on `train_data`, evaluated on the fixed `val_batches`. Returns
    the trained model and the final numbers; writes log.csv and ckpt.pt into opts.work.

    Stops at max_steps, or when this session's budget would run out, keeping back the time the final
    evaluation, checkpoint and save need. With max_steps="auto" it plans as many steps as fit, decay included,
    but no more than max_epochs passes over the data take (the plan is then data-limited and the stage ends
    early), and shortens the plan if it falls behind.
    """
    opts = dataclasses.replace(opts, budget=opts.budget or Budget(cfg.max_hours),
                               max_steps=cfg.max_steps if opts.max_steps is None else opts.max_steps,
                               warmup_steps=cfg.warmup_steps if opts.warmup_steps is None else opts.warmup_steps)
    budget, auto = opts.budget, opts.max_steps == "auto"  # auto: this session plans max_steps to fit its budget
    run, state = start_run(model, train_data, cfg, opts)
    acc = run.acc
    if run.newton_schulz and state.step == 0:  # the precision Muon orthogonalizes in, said once per run
        run.say(f"Muon: Newton-Schulz in {run.newton_schulz}" + (" (this device has no native bf16)"
                                                                  if run.newton_schulz == "fp32" else ""))
    # the session's first minutes: compile (or fall back), fit the micro-batch; the clock for the plan starts after
    fit_first_step(run, state, train_data, max(val_batches, key=lambda b: b[0].numel(), default=None))
    val_batches = [piece for b in val_batches for piece in pieces_of(train_data, b, state.micro_batch)]
    budget.begin()
    run.begin_session(state, val_batches)
    window = LogWindow(len(run.loss_module.stat_names), acc.device)
    if state.window:  # a checkpoint taken mid-window
        window.restore(state.window, acc.is_main_process)
    last_ckpt, session_tokens, skips_in_a_row = time.time(), 0, 0
    said_plan = state.max_steps or 0  # the plan the last plan line gave
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    lr = lr_at(state.step, cfg, state.max_steps, opts.warmup_steps)
    stop_reason, new_step, grad_norm = None, False, None  # new_step: this pass follows an optimizer step (grad_norm's)

    # a live bar where someone watches; a headless run has the log lines (with the time left) alone
    bar = tqdm(total=state.max_steps, initial=state.step, desc=opts.stage, unit="step",
               disable=not (acc.is_main_process and watched()))
    try:
        while True:
            # where the run stands: the last pass comes at max_steps, at stop_at_step, or after the budget's stop
            if stop_reason is None and state.max_steps is not None and state.step >= state.max_steps:
                stop_reason = "max_steps"
            elif stop_reason is None and opts.stop_at_step is not None and state.step >= opts.stop_at_step:
                stop_reason = "stopped"
            last_step = stop_reason is not None
            # every log_interval steps a log row, every eval_interval steps (and at max_steps) an evaluation
            log_now = new_step and state.step % cfg.log_interval == 0
            eval_now = new_step and (state.step % cfg.eval_interval == 0 or state.step == state.max_steps)
            closes = log_now or eval_now  # the train-loss window closes into a row
            row = run.close_window(window, state, budget, lr, grad_norm) if closes else None
            if last_step and not eval_now and not evaluated(state.log, state.step):  # the last step, evaluated once
                row, eval_now = row or run.open_row(state, window, lr), True
            if eval_now:
                started_eval = time.time()
                state.val_loss = evaluate(run.loss_fn, val_batches, acc.device, run.precision, run.loss_module.units)
                budget.eval_s = time.time() - started_eval
                window.started += budget.eval_s  # tokens/s and the step time measure training alone
                budget.pause(budget.eval_s)
                row["val_loss"] = round(state.val_loss, 4)
            if row is not None:
                run.add_row(state, row)
            if closes:  # the progress line
                bar.set_postfix(loss=row["train_loss"], tok_s=f"{row['tokens_per_s']:,}")
                run.say(log_line(row, state, budget, lr, train_data.epochs_done()))
            if last_step and row is None:  # the last step has its row and evaluation (a finished run resumed again)
                state.val_loss = state.log[-1]["val_loss"] if state.val_loss is None else state.val_loss
                write_log(StageDir(opts.work).log, state.log, run.columns)  # also into a new folder resumed from one
            # every step but the last: the budget, on every process's clock (all must stop at the same step), the plan
            training = not last_step and state.step > run.first_step
            behind = (auto and state.max_steps is not None and training and (state.max_steps - state.step)
                      * budget.per_step(state.step, run.val_tokens, cfg.eval_interval) > budget.left(run.val_tokens))
            out_of_time, ckpt_due, behind = agree(acc, training and budget.left(run.val_tokens) < 0,
                                                  time.time() - last_ckpt > cfg.checkpoint_minutes * 60, behind)
            if behind and not out_of_time:  # slower than planned: end sooner, still on a decayed last step
                state.max_steps = bar.total = run.plan(budget, state.step)
                if state.max_steps < 0.95 * said_plan:  # a line when the plan has moved, not at every small step
                    said_plan = state.max_steps
                    run.say(f"re-planned: {plan_line(budget, state, cfg)}")
            if out_of_time:  # one pass more, with no step: this step's evaluation, row and checkpoint
                stop_reason, new_step = "time_budget", False
                continue
            # every checkpoint_minutes (on its own clock, not only on log steps), and on the last pass
            if ckpt_due or last_step:
                state.hours = run.hours()
                budget.ckpt_s = run.save_checkpoint(state, window)
                last_ckpt = time.time()
                window.started += budget.ckpt_s  # tokens/s and the step time measure training, not writing
                budget.pause(budget.ckpt_s)
            if last_step:
                break
            # one optimizer step
            lr = set_lr(run.optimizers, state.step, cfg, state.max_steps, opts.warmup_steps)
            batches, weights = micro_batches(train_data, [train_data.next_batch() for _ in range(cfg.grad_accum_steps)],
                                             state.micro_batch)
            loss, stats, grad_norm, real = train_step(run.parts, batches, weights)
            state.step, new_step = state.step + 1, True
            if state.step == run.first_step + 1 and acc.num_processes > 1:  # past the process group's first all-reduce
                run.say(f"{opts.stage}: {acc.num_processes} processes train together")
                report_launch_event("started", processes=acc.num_processes)  # launch(): no longer a start-up failure
            window.add(loss, stats, real)
            session_tokens += real
            bar.update(1)
            # max_steps="auto": the plan, once this session's first steps are timed
            if auto and state.max_steps is None and budget.probe(state.step, run.first_step, session_tokens, acc):
                run.plan_step_s = budget.step_s
                fit = run.plan(budget, state.step)
                data = (max(state.step + 1, train_data.steps_for(opts.max_epochs, cfg.grad_accum_steps))
                        if opts.max_epochs else fit)
                state.max_steps = bar.total = said_plan = min(fit, data)
                state.data_limited = data < fit
                run.say(plan_line(budget, state, cfg,
                                  (opts.max_epochs, train_data.n * train_data.T) if data < fit else None))
            # fp16: the GradScaler's scale drops exactly when it skipped the step (one GPU sync per step, fp16 only)
            if scale is not None:
                skipped, scale = run.scaler.get_scale() < scale, run.scaler.get_scale()
                skips_in_a_row = skips_in_a_row + 1 if skipped else 0
                window.skipped, state.skipped_steps = window.skipped + skipped, state.skipped_steps + skipped
                if skips_in_a_row >= FP16_MAX_SKIPS_IN_A_ROW:
                    raise run.diverged(f"the fp16 loss or gradients stayed inf/nan for {skips_in_a_row} steps in a "
                                       f"row (up to step {state.step}; GradScaler skipped each)")
    except Exception as e:  # an out-of-memory later than the first steps: the trial's test, the trial's words
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(opts.stage, state, acc.device) from None
    finally:
        bar.close()
    if cfg.log_with:
        acc.end_training()
    return TrainResult(run.model, acc.is_main_process, run.final_numbers(state, window, stop_reason))


def evaluated(log: list[dict], step: int) -> bool:
    """Whether the log's last row is this step's and holds an evaluation."""
    return bool(log) and log[-1]["step"] == step and log[-1].get("val_loss") is not None


# -----------------------------------------------------------------------------
# The set-up, and what the loop's periodic work needs

def start_run(model, train_data, cfg, opts: TrainOptions) -> tuple[Run, RunState]:
    """The set-up of train(), in the order a resumed run must repeat: the process group (accelerate), the seed,
    the optimizers, the checkpoint's state, compiling, the DDP wrap, then each process's random streams."""
    # device placement and multi-process DDP (cpu=True lets torchrun run several CPU processes on gloo);
    # precision is ours, explicit in Run
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.log_with,
                      project_dir=str(opts.work / "trackers") if cfg.log_with else None)
    if cfg.log_with:  # the trackers get the config once and every log row (tensorboard: <stage>/trackers/<stage>)
        acc.init_trackers(opts.stage, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                              for k, v in dataclasses.asdict(cfg).items()})
    set_seed(cfg.seed, device_specific=True)  # a dropout stream per process; rank 0 keeps the seed's
    train_data.rank, train_data.world = acc.process_index, acc.num_processes
    model.to(acc.device)
    run = Run(acc, model, train_data, cfg, opts)
    state = RunState(max_steps=None if opts.max_steps == "auto" else opts.max_steps)
    if opts.resume:
        state = restore_checkpoint(opts.resume, model, run.optimizers, run.kinds, run.scaler, train_data)
        state.max_steps = state.max_steps if opts.max_steps == "auto" else opts.max_steps  # a number given now is the plan
    run.prepare()
    if opts.resume:
        rngs = opts.resume["rng"]
        note = restore_rng(rngs if isinstance(rngs, list) else [rngs], acc)
        if note and acc.is_main_process:
            print(f"resume: {note}")
    return run, state


class Run:
    """What the loop's periodic work needs, in one place: the process group, the model and its optimizers,
    the data position, the config and the stage folder; it writes log rows and checkpoints (rank 0)."""

    def __init__(self, acc, model, train_data, cfg, opts: TrainOptions):
        self.acc, self.model, self.train_data, self.cfg = acc, model, train_data, cfg
        self.stage, self.work, self.opts = opts.stage, opts.work, opts
        self.precision = opts.precision or choose_precision(cfg.precision)
        self.compiled = resolve_compile(cfg.compile, cfg.max_hours)
        self.compile_strict = self.compiled and cfg.compile != "auto"  # compile=True: a compile that fails stops the stage
        self.compile_error = None
        self.optimizers = make_optimizers(model, cfg, acc.device)
        self.kinds = ["adamw", "muon"][:len(self.optimizers)]
        self.scaler = torch.amp.GradScaler(acc.device.type, enabled=self.precision == "fp16")
        self.loss_module = opts.loss_module or LMLoss(model)
        self.switch = self.loss_fn = self.loss_module  # until prepare()
        self.plan_step_s = None  # the step time max_steps="auto" planned with (this session)
        self.columns = LOG_COLUMNS + list(self.loss_module.stat_names)
        self.flops, peak = flops_per_token(model), peak_flops(acc.device, self.precision)
        self.newton_schulz = next((g.get("newton_schulz", "bf16") for o in self.optimizers for g in o.param_groups
                                   if "split_qkv" in g), None)  # Muon's groups; None without Muon
        self.peak = peak * acc.num_processes if peak else None

    def prepare(self) -> None:
        """The loss module on the device, compiled inside the DDP wrap as nanoGPT does (through CompiledOrEager,
        which can fall back to eager); batches of varying shape (SFT, DPO) compile with dynamic shapes at once: a
        train and an eval graph, not a recompile per new shape (measured on 03)."""
        self.loss_module.to(self.acc.device)
        if self.compiled:
            self.switch = CompiledOrEager(self.loss_module,
                                          True if getattr(self.train_data, "variable_shapes", False) else None)
        self.loss_fn, *self.optimizers = self.acc.prepare(self.switch, *self.optimizers)
        self.parts = StepParts(self.acc, self.loss_fn, self.optimizers, self.scaler, self.precision, self.cfg.grad_clip)

    def begin_session(self, state: RunState, val_batches: list) -> None:
        """This session's training starts (after the first minutes' fitting): its clock, its first step, the
        hours of the sessions before it, and the target tokens of one evaluation."""
        self.started, self.first_step, self.hours_before = time.time(), state.step, state.hours
        self.val_tokens = sum(int((y != IGNORE_ID).sum()) for _, y in val_batches)

    def hours(self) -> float:
        """Training hours of every session so far, this one included."""
        return self.hours_before + (time.time() - self.started) / 3600

    def say(self, line: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(line)

    def plan(self, budget: Budget, step: int) -> int:
        """The step this session can reach, the same on every process (the smallest of their clocks')."""
        fit = torch.tensor([budget.steps_that_fit(step, self.val_tokens, self.cfg.eval_interval)])
        fit = int(self.acc.gather(fit.to(self.acc.device)).min()) if self.acc.num_processes > 1 else int(fit)
        return max(step + 1, fit)

    def last_checkpoint(self) -> str:
        path = StageDir(self.work).ckpt
        return str(path) if path.exists() else "none yet"

    def diverged(self, what: str, fp32_hint: bool = False) -> PocketGPTError:
        return PocketGPTError(f"{self.stage}: {what}. The last good checkpoint ({self.last_checkpoint()}) is kept. Lower "
                              f"learning_rate (now {self.cfg.learning_rate})" + (" or use precision='fp32'" if fp32_hint
                              else "") + ", and resume_from that folder.")

    def totals(self, window: LogWindow, state: RunState) -> list[float]:
        """The window's sums over all processes; a non-finite loss in fp32 or bf16 ends the run (fp16's
        GradScaler skips such steps, and counts them)."""
        totals = window.totals(self.acc)
        if totals[2] and self.precision != "fp16":
            raise self.diverged(f"the training loss is inf or nan by step {state.step} ({int(totals[2])} such step(s) "
                                f"since the last log row)", fp32_hint=True)
        return totals

    def close_window(self, window: LogWindow, state: RunState, budget: Budget, lr: float, grad_norm) -> dict:
        """The log row of the window (the one sync per row), which then starts again; the step time is
        measured from here on."""
        totals = self.totals(window, state)
        (loss_sum, n_ok, _), stat_sums, n_tokens = totals[:3], totals[3:-1], totals[-1]
        dt = max(time.time() - window.started, 1e-9)
        budget.step_s, budget.tokens_per_s = dt / max(1, window.steps), max(n_tokens / dt, 1.0)
        state.tokens += int(n_tokens)
        stat_names = self.columns[len(LOG_COLUMNS):]
        row = {"step": state.step, "tokens": state.tokens, "train_loss": round(loss_sum / n_ok, 4) if n_ok else None,
               "lr": f"{lr:.3e}", "tokens_per_s": round(n_tokens / dt), "skipped_steps": window.skipped,
               "mfu": round(self.flops * n_tokens / dt / self.peak, 4) if self.peak else None,
               "elapsed_s": round(self.hours() * 3600, 1),
               **{name: round(v / n_ok, 4) for name, v in zip(stat_names, stat_sums) if n_ok}}
        row["grad_norm"] = round(float(grad_norm), 3)
        window.reset()
        budget.set_mark(state.step)
        return row

    def open_row(self, state: RunState, window: LogWindow, lr: float) -> dict:
        """The last pass's row where no window closes: the row this step already has, or a new one that leaves the
        train-loss window open (it goes into the checkpoint, so a resumed run logs the same rows as one that was
        never interrupted)."""
        if state.log and state.log[-1]["step"] == state.step:
            return state.log.pop()
        return {"step": state.step, "tokens": state.tokens + int(self.totals(window, state)[-1]),
                "lr": f"{lr:.3e}", "elapsed_s": round(self.hours() * 3600, 1)}

    def add_row(self, state: RunState, row: dict) -> None:
        """A log row into the state, log.csv and accelerate's trackers."""
        state.log.append(row)
        write_log(StageDir(self.work).log, state.log, self.columns)
        if self.cfg.log_with:  # rank 0 only, as accelerate does
            self.acc.log({k: float(v) for k, v in row.items() if k != "step" and is_number(v)}, step=int(row["step"]))

    def save_checkpoint(self, state: RunState, window: LogWindow) -> float:
        """Every process takes part (the window's sums and the random streams are gathered); rank 0 writes.
        Returns the seconds it took."""
        started = time.time()
        totals = self.totals(window, state)
        acc = self.acc
        rngs = gather_object([rng_state(acc.device)]) if acc.num_processes > 1 else [rng_state(acc.device)]
        if acc.is_main_process:
            state.window = window.saved(totals)
            ckpt = {"model": self.model.state_dict(), "optimizer": [opt.state_dict() for opt in self.optimizers],
                    "optimizers": self.kinds, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "data": self.train_data.state(), "rng": rngs, "config": dataclasses.asdict(self.cfg),
                    "model_config": self.model.config.to_dict(), "stage": self.stage, "state": dataclasses.asdict(state)}
            write_file(StageDir(self.work).ckpt, torch_file(ckpt), needed=tensor_bytes(ckpt))
        acc.wait_for_everyone()
        return time.time() - started

    def final_numbers(self, state: RunState, window: LogWindow, stop_reason: str) -> dict:
        """The run's numbers for metrics.json."""
        tokens = state.tokens + int(self.totals(window, state)[-1])  # the tokens of a window left open
        rates = [r["tokens_per_s"] for r in state.log if r.get("tokens_per_s")]
        mfus = [r["mfu"] for r in state.log if r.get("mfu")]
        log, auto = state.log, self.opts.max_steps == "auto"
        return {"steps": state.step, "tokens": tokens, "final_val_loss": state.val_loss,
                "val_tokens_evaluated": self.val_tokens,
                "final_train_loss": next((r["train_loss"] for r in reversed(log) if r.get("train_loss") is not None), None),
                "tokens_per_s": float(np.median(rates)) if rates else None,
                "mfu": float(np.median(mfus)) if mfus else None, "params": count_params(self.model),
                "flops_per_token": self.flops, "precision": self.precision, "compiled": self.compiled,
                "compile_error": self.compile_error, "micro_batch": state.micro_batch,
                "grad_accum_steps": state.grad_accum_steps, "plan_step_s": self.plan_step_s,
                "skipped_steps": state.skipped_steps, "device": device_name(self.acc.device),
                "processes": self.acc.num_processes, "stop_reason": stop_reason,
                "finished": state.max_steps is not None and state.step >= state.max_steps, "hours": state.hours,
                "max_steps": state.max_steps, "planned": auto, "optimizers": self.kinds,
                "newton_schulz": self.newton_schulz,
                "session_hours": (time.time() - self.started) / 3600, "session_steps": state.step - self.first_step,
                "max_epochs": self.opts.max_epochs if auto else None, "data_limited": state.data_limited}


def plan_line(budget: Budget, state: RunState, cfg, data_limit: tuple | None = None) -> str:
    """The plan in a line; `data_limit` (max_epochs, train tokens) when the data, not the budget, sets it."""
    tokens_per_step = budget.tokens_per_s * budget.step_s
    seconds = (state.max_steps - state.step) * budget.step_s
    end = datetime.fromtimestamp(time.time() + seconds).strftime("%H:%M")
    decay = (f"the last {max(1, round(cfg.decay_fraction * state.max_steps)):,} decaying" if cfg.schedule == "wsd"
             else "cosine decay")
    total = tokens_per_step * state.max_steps
    total = f"{total / 1e6:,.1f}M" if total >= 1e6 else f"{total:,.0f}"
    epochs = f"{data_limit[0]:g} epoch{'' if data_limit[0] == 1 else 's'}" if data_limit else ""
    limited = (f"data-limited: {epochs} of {data_limit[1] / 1e6:,.1f}M tokens, about "
               f"{duration(time.time() - budget.started + seconds)} of this {duration(budget.max_hours * 3600)} "
               f"session; a larger corpus or model would use the rest. " if data_limit else "")
    fitted = " (fitted to this device)" if state.micro_batch and state.micro_batch < cfg.batch_size else ""
    return (f"plan (max_steps='auto'): {limited}{state.max_steps:,} steps, about {total} tokens, {decay}; micro-batch "
            f"{state.micro_batch or cfg.batch_size} x {state.grad_accum_steps or cfg.grad_accum_steps} accumulated"
            f"{fitted}; ends about {end}, inside this session's {duration(budget.max_hours * 3600)}")


def log_line(row: dict, state: RunState, budget: Budget, lr: float, epochs: float) -> str:
    left = max(0.0, budget.deadline - time.time())
    left = min((state.max_steps - state.step) * budget.step_s, left) if state.max_steps is not None else left
    return (f"step {state.step}/{state.max_steps if state.max_steps is not None else 'auto'}"
            + (f" loss {row['train_loss']:.4f}" if row.get("train_loss") is not None else "")
            + (f" val {row['val_loss']:.4f}" if row.get("val_loss") is not None else "")
            + f" lr {lr:.2e} gnorm {row.get('grad_norm') or 0:.2f} {row['tokens_per_s']:,} tok/s"
            + (f" mfu {row['mfu']:.1%}" if row.get("mfu") else "")
            + (f" skipped {row['skipped_steps']}" if row.get("skipped_steps") else "")
            + f" epoch {epochs:.2f} | {duration(left)} left this session")


def write_log(path: Path, rows: list[dict], columns: list[str]) -> None:
    """log.csv, rewritten whole at each row through the one door (rank 0, atomic): a resumed run carries its
    earlier rows in the checkpoint, so nothing is appended twice."""
    write_file(path, csv_text(columns, [["" if r.get(k) is None else r[k] for k in columns] for r in rows]))

def save_hf_folder(model, tokenizer, out_dir) -> None:
    """A standard save_pretrained folder in fp32 (transformers 5 reloads in the saved dtype)."""
    model = model.float()
    tokenizer.model_max_length = model.config.n_positions
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS_ID, EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.config.use_cache = model.generation_config.use_cache = True  # users generate: keep the KV cache on

    def fill(tmp):
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    write_folder(out_dir, fill, needed=tensor_bytes(model.state_dict()))


def read_log(path) -> list[dict]:
    """log.csv as a list of rows, numbers as floats and empty cells as None."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]
