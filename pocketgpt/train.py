"""The training loop that pretraining, SFT and DPO share: accelerate, accumulation, schedule, budget, checkpoints.

Read train() top to bottom: the set-up, one loop whose steps come in order (the budget's word, a checkpoint
when its minutes have passed, one optimizer step, the plan of max_steps="auto", fp16's skipped steps, and
every log_interval / eval_interval steps a log row and an evaluation), then the final evaluation and
checkpoint. What the loop keeps lives in three small objects: Budget (this session's clock: the deadline
from max_hours, what the end keeps back, how many steps fit), LogWindow (the sums behind the next log row)
and RunState (where the run is: step, tokens, log rows, plan, hours; saved and restored whole). The config
is read, never written.
Imports: common, tokenizer, device, model, optim.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import math
import pickle
import random
import re
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm import tqdm

from .common import (
    BOS_ID,
    EOS_ID,
    IGNORE_ID,
    PAD_ID,
    PocketGPTError,
    csv_text,
    duration,
    is_number,
    report_launch_event,
    tensor_bytes,
    torch_file,
    watched,
    write_file,
    write_folder,
)
from .device import autocast, choose_precision, device_name, peak_flops, resolve_compile
from .model import LMLoss, count_params, flops_per_token
from .optim import lr_at, make_optimizers, set_lr
from .tokenizer import save_tokenizer

PLAN_PROBE_STEPS = (5, 20)  # max_steps="auto" times this session's steps 6..20, then plans
FP16_MAX_SKIPS_IN_A_ROW = 25  # GradScaler halves its scale at each skip: 25 in a row means the run diverged
LOG_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
               "skipped_steps"]  # then the loss's own statistics (DPOLoss: reward accuracy and margin)


# -----------------------------------------------------------------------------
# One step, one evaluation, the random streams, the checkpoint file

def train_step(acc, loss_fn, optimizers, scaler, batches, grad_clip: float, precision: str, weights=None):
    """One optimizer step over the micro-batches; gradients sync across GPUs only on the last one.

    `weights`: each micro-batch's share of the step (equal shares unless given: a data batch split into
    smaller micro-batches gives each its share of that batch).

    fp16 needs the GradScaler: the loss is scaled up so small gradients survive in fp16, the
    gradients are unscaled before clipping, and a step with inf/nan gradients is skipped.
    Returns the mean loss and the loss's other statistics (tensors, so nothing waits for the GPU),
    the gradient norm and the number of real (not padding) input tokens this process trained on.
    """
    total, stats, real = 0.0, 0.0, 0
    weights = weights or [1 / len(batches)] * len(batches)
    for i, ((x, y), w) in enumerate(zip(batches, weights)):
        sync = i == len(batches) - 1
        with nullcontext() if sync else acc.no_sync(loss_fn):
            with autocast(acc.device, precision):
                out = loss_fn(x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True))
            loss, step_stats = out if isinstance(out, tuple) else (out, torch.zeros(0, device=acc.device))
            scaler.scale(loss * w).backward()
        total, stats = total + loss.detach() * w, stats + step_stats.float() * w
        real += int((x != PAD_ID).sum())  # x is still on the CPU: no GPU sync
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), grad_clip)
    for opt in optimizers:
        scaler.step(opt)  # skipped (all of them) when fp16 gradients overflowed
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total, stats, grad_norm, real


def evaluate(loss_fn, batches, device, precision: str = "fp32", units=LMLoss.units) -> float:
    """Mean loss over fixed batches, per target token (per pair for DPO: `units`)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            y = y.to(device)
            out = loss_fn(x.to(device), y, reduction="sum")
            total += float(out[0] if isinstance(out, tuple) else out)
            count += units(y)
    loss_fn.train(was_training)
    return total / max(count, 1)


def rng_state(device) -> dict:
    """This process's random streams (dropout, sampling): each process has its own. Kept in plain types and
    tensors (numpy's key as a list of ints), so the checkpoint loads as data (load_checkpoint)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_numpy_state(state) -> None:
    """numpy's stream from a checkpoint: the dict rng_state keeps, or the tuple (with an array) of a checkpoint
    written before it did."""
    if isinstance(state, dict):
        state = {**state, "state": {**state["state"], "key": np.asarray(state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(state)


def restore_rng(states: list, acc) -> str | None:
    """Give each process the stream it had, where the checkpoint holds one for it.

    Returns a note when it cannot all be restored: a checkpoint of 2 GPUs resumed on 1 GPU or a
    CPU (or the reverse). The data position does not depend on this and carries over exactly."""
    rank, note = acc.process_index, None
    if len(states) != acc.num_processes:
        fate = (f"those of processes beyond {len(states)} start from the seed" if acc.num_processes > len(states)
                else f"the other {len(states) - acc.num_processes} are not used")
        note = (f"the checkpoint was written by {len(states)} process(es) and this run has {acc.num_processes}: "
                f"the data position carries over; the first {min(len(states), acc.num_processes)} process(es) keep "
                f"their random streams (dropout), {fate}")
    if rank < len(states):
        s = states[rank]
        random.setstate(s["python"])
        set_numpy_state(s["numpy"])
        torch.set_rng_state(s["torch"])
        cuda = s.get("cuda")
        cuda = cuda[0] if isinstance(cuda, list) and cuda else cuda  # checkpoints before per-process states
        if cuda is not None and acc.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, acc.device)
        elif (cuda is None) != (acc.device.type != "cuda"):
            note = note or "the checkpoint and this run differ in CPU/GPU: the GPU random stream starts from the seed"
    return note


CHECKPOINT_KEYS = ("model", "optimizer", "data", "rng", "config")  # what every pocketGPT checkpoint has held


def legacy_numpy_globals() -> list:
    """What a checkpoint written before rng_state kept plain types holds beyond them: numpy's random state, an
    array of uint32 (numpy's array rebuilder, by the names numpy 1.x and 2.x pickle it under; ndarray; dtype and
    the class of its uint32 instance, which is built). Nothing else of numpy, and nothing that runs code."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            *[(reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy.core", "numpy._core")]]


def load_checkpoint(folder) -> dict:
    """ckpt.pt from a stage folder (finished, or the .partial a stopped run left), read as data only.

    torch.load with weights_only=True builds tensors, numbers, strings, lists, tuples and dicts (and the numpy
    array of an older checkpoint's RNG state), never anything a pickle asks for beyond them: a file from
    someone else (an attached Kaggle input) cannot run code here. What is not a pocketGPT checkpoint is
    refused in one message."""
    path = Path(folder) / "ckpt.pt"
    if not path.is_file():
        raise PocketGPTError(f"resume_from={folder}: no ckpt.pt there. Point it at a pretrain/sft folder "
                             f"(or its .partial) written by an earlier run.")
    try:
        with torch.serialization.safe_globals(legacy_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise refused_checkpoint(path, why_unreadable(e)) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        held = (f"a dict of {len(ckpt)} entries ({', '.join(map(str, list(ckpt)[:4]))}{', ...' if len(ckpt) > 4 else ''})"
                if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        raise refused_checkpoint(path, f"it holds {held}, not a pocketGPT checkpoint (no {', '.join(missing)}): "
                                       f"perhaps another tool's file")
    return ckpt


def why_unreadable(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words: what a crafted pickle asks for (torch names
    it), a pickle the data-only reader cannot follow, or a file that is not whole."""
    if isinstance(e, pickle.UnpicklingError):
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if asked:
            return (f"it asks for {asked.group(1)} when read, and a checkpoint holds only data (tensors, numbers, "
                    f"text, lists, dicts)")
        said = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        return f"it is not a PyTorch file that holds only data (torch: {' '.join(said)[-160:]})"
    if isinstance(e, (PermissionError, IsADirectoryError)):
        return f"it cannot be read ({e.strerror or e})"
    return f"it is not a whole PyTorch file ({type(e).__name__}{': ' if str(e) else ''}{str(e)[:160]}); it may be truncated"


def refused_checkpoint(path: Path, why: str) -> PocketGPTError:
    """The one message of a ckpt.pt that is not ours: which file, that nothing of it was loaded or run, why,
    and what to do."""
    why = " ".join(why.split())  # one line, whatever the library's message held
    return PocketGPTError(f"{path} was not loaded (nothing in it was run): {why}. Resume only from a pretrain or sft "
                          f"folder a pocketGPT run wrote: point resume_from at one; to start afresh instead, move "
                          f"this file's folder away (on Kaggle: detach the input holding it).")


def agree(acc, *flags: bool) -> list[bool]:
    """Each flag, true on every process if it is true on any: each process reads its own clock,
    but all must stop (or checkpoint) at the same step, or the next collective call would wait
    forever. One small all-reduce for all the flags."""
    if acc.num_processes == 1:
        return list(flags)
    votes = acc.reduce(torch.tensor([float(f) for f in flags], device=acc.device), "sum")
    return [bool(v > 0) for v in votes.tolist()]


def out_of_memory(stage: str, state: "RunState", device) -> PocketGPTError:
    """What to lower when a batch stops fitting after the first steps (those fit it themselves: fit_first_step):
    the same tokens per step in smaller pieces than the micro-batch in use."""
    micro, accum = state.micro_batch, state.grad_accum_steps
    return PocketGPTError(
        f"{stage}: out of {'GPU ' if device.type == 'cuda' else ''}memory at step {state.step + 1} with a micro-batch "
        f"of {micro}. Try batch_size={max(1, micro // 2)} with grad_accum_steps={accum * 2} (the same tokens per step).")


def is_out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory, or a CPU allocation that failed (torch's allocator, numpy or Python), itself or
    as the cause of another error (a compiler that ran out while compiling)."""
    while e is not None:
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
                isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def short_error(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (a compiler's can run to pages)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class CompiledOrEager(nn.Module):
    """The loss module through torch.compile, until a compile fails: then eager, with the same weights.

    The DDP wrap goes around this module, so switching to eager needs no new wrap (and no new process group
    collective). The compiled module is kept out of the registered submodules: the parameters appear once."""

    def __init__(self, module: nn.Module, dynamic: bool | None):
        super().__init__()
        self.module = module
        object.__setattr__(self, "compiled", torch.compile(module, dynamic=dynamic))

    def forward(self, *args, **kwargs):
        return (self.module if self.compiled is None else self.compiled)(*args, **kwargs)

    def to_eager(self) -> None:
        object.__setattr__(self, "compiled", None)
        torch._dynamo.reset()  # drop the graphs (and guards) built so far


# -----------------------------------------------------------------------------
# The first minutes of a session: a compile that fails, a micro-batch that does not fit

OPTIMIZER_STATE_COPIES = {"adamw": 2, "muon": 1}  # state tensors per parameter: AdamW's two moments, Muon's momentum


def optimizer_state_bytes(optimizers, kinds) -> int:
    """The bytes the optimizers will allocate at their first step (nothing once they have state: a resumed run)."""
    return sum(OPTIMIZER_STATE_COPIES.get(kind, 2) * p.numel() * p.element_size()
               for opt, kind in zip(optimizers, kinds) if not opt.state for g in opt.param_groups for p in g["params"])


def try_micro_batch(run, batch, val_batch) -> tuple[BaseException | None, str | None]:
    """A forward and backward pass on `batch` and an evaluation forward on `val_batch`, as the first step and the
    first evaluation will run them (compiled where compile is on), holding the bytes the optimizers will take at
    their first step. On the undistributed module: no process waits for another here. The gradients are
    dropped and the random streams left as they were, so the run goes on as if this had not happened.
    Returns (an out-of-memory, a compile failure as a line); (None, None) when it all ran."""
    acc, module = run.acc, run.switch
    devices = [acc.device] if acc.device.type == "cuda" else []
    oom = failure = None
    try:
        with torch.random.fork_rng(devices=devices):
            reserve = torch.empty(optimizer_state_bytes(run.optimizers, run.kinds), dtype=torch.uint8, device=acc.device)
            x, y = batch
            with autocast(acc.device, run.precision):
                out = module(x.to(acc.device), y.to(acc.device))
            (out[0] if isinstance(out, tuple) else out).backward()
            del out, reserve
            if val_batch is not None:
                evaluate(module, [val_batch], acc.device, run.precision, run.loss_module.units)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()  # a kernel that fails to launch fails here, not at step 1
    except Exception as e:  # noqa: BLE001 - which failures are the compiler's is decided below
        if is_out_of_memory(e):
            oom = e
        elif getattr(module, "compiled", None) is not None:  # eager has not run yet: a failure here is the compiled path's
            failure = short_error(e)
        else:
            raise
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if oom is not None:  # the message alone: the traceback holds the activations, which go now
        oom = MemoryError(short_error(oom))
        gc.collect()
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()
    return oom, failure


def fit_first_step(run, state: RunState, train_data, val_batch) -> None:
    """Before the first step of a session: compile (falling back to eager where compile="auto") and find the
    micro-batch that fits, halving it (and doubling the accumulation: the same rows per optimizer step) until it
    fits or is 1. Every process agrees on each outcome, so they fall back or halve together. Tried on the largest
    batch the data holds. The fitted micro-batch goes into the run's state (and its checkpoint)."""
    cfg, acc = run.cfg, run.acc
    micro = min(state.micro_batch or cfg.batch_size, cfg.batch_size)
    batch, too_big = train_data.largest_batch(), []
    while True:
        oom, failure = try_micro_batch(run, pieces_of(train_data, batch, micro)[0],
                                       pieces_of(train_data, val_batch, micro)[0] if val_batch else None)
        oom_anywhere, failed_anywhere = agree(acc, oom is not None, failure is not None)
        if failed_anywhere:
            failure = next(f for f in (gather_object([failure]) if acc.num_processes > 1 else [failure]) if f)
            if run.compile_strict:
                raise PocketGPTError(
                    f"{run.stage}: torch.compile failed at the first step ({failure}). compile=True insists on "
                    f"compiling: set compile=False to train without it (compile='auto' falls back to eager by itself).")
            run.switch.to_eager()
            run.compiled, run.compile_error = False, failure
            run.say(f"{run.stage}: torch.compile failed ({failure}); training eager (compile=False skips the attempt)")
            continue
        if not oom_anywhere:
            break
        if micro == 1:
            raise PocketGPTError(f"{run.stage}: out of memory with a micro-batch of 1 row at n_positions="
                                 f"{getattr(run.model.config, 'n_positions', '?')} ({oom or 'on another process'}). "
                                 f"Lower n_positions, or train a smaller model (n_layer, n_embd).")
        too_big.append(micro)
        micro = max(1, micro // 2)
    pieces = -(-cfg.batch_size // micro)
    if too_big:
        run.say(f"{run.stage}: batch_size={cfg.batch_size} does not fit this device (out of memory at micro-batch "
                f"{', '.join(map(str, too_big))}): training with micro-batch {micro} and grad_accum_steps "
                f"{cfg.grad_accum_steps * pieces}, the same {cfg.batch_size * cfg.grad_accum_steps} rows per process "
                f"per optimizer step")
    state.micro_batch, state.grad_accum_steps = micro, cfg.grad_accum_steps * pieces


def pieces_of(train_data, batch, micro: int) -> list:
    """A data batch in micro-batches of `micro` rows; whole where the micro-batch is the data's own batch size
    (03's last batch of a chunk can hold a few rows more: it stays one micro-batch, as it always was)."""
    return train_data.split(batch, micro) if micro < train_data.B else [batch]


def micro_batches(train_data, batches: list, micro: int) -> tuple[list, list]:
    """The step's data batches in micro-batches of `micro` rows, each weighted by its share of the step."""
    pieces, weights = [], []
    for batch in batches:
        split = pieces_of(train_data, batch, micro)
        rows = sum(len(y) for _, y in split)
        pieces += split
        weights += [len(y) / rows / len(batches) for _, y in split]
    return pieces, weights




# -----------------------------------------------------------------------------
# What the loop keeps: the run's state, this session's budget, the open log window

@dataclasses.dataclass
class RunState:
    """Where a run is, besides its weights, optimizers and data position: saved whole in every checkpoint
    and restored whole, so a resumed run carries on as if it had never stopped."""
    step: int = 0
    tokens: int = 0                 # real tokens trained on by all processes, up to the last closed log window
    log: list = dataclasses.field(default_factory=list)  # the log rows so far (log.csv is written from them)
    hours: float = 0.0              # training hours of every session so far (for the report, not the budget)
    skipped_steps: int = 0          # fp16 steps the GradScaler skipped
    max_steps: int | None = None    # the plan: the run's max_steps, or what max_steps="auto" planned (None: not yet)
    data_limited: bool = False      # max_steps="auto" planned no more than max_epochs of the data (the budget had room)
    val_loss: float | None = None   # the last evaluation's loss
    window: dict | None = None      # the log window open when the checkpoint was taken (LogWindow.saved)
    micro_batch: int | None = None  # rows per process per micro-step, as fitted to the device (None: not yet)
    grad_accum_steps: int | None = None  # micro-steps per optimizer step that go with it

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        if "state" in ckpt:
            return cls(**ckpt["state"])
        planned = ckpt["config"].get("max_steps")  # a checkpoint from before RunState: its fields at the top
        return cls(step=ckpt["step"], tokens=ckpt.get("tokens", 0), log=list(ckpt.get("log", [])),
                   hours=ckpt.get("hours", ckpt.get("elapsed_s", 0.0) / 3600), skipped_steps=ckpt.get("skipped_steps", 0),
                   max_steps=planned if isinstance(planned, int) else None, val_loss=ckpt.get("val_loss"),
                   window=ckpt.get("window"))


class Budget:
    """This session's clock: the deadline (the stage's start + max_hours: a budget per session, never for the
    sessions together), the time the end needs kept back, and how many steps fit what is left.

    Step time is measured from marks (after the first steps' warm-up and compiling, then at each log row),
    with evaluations and checkpoints taken out, so a machine that slows down shows at once."""

    def __init__(self, max_hours: float):
        self.max_hours, self.started = max_hours, time.time()
        self.deadline = self.started + max_hours * 3600
        self.begin()

    def begin(self) -> None:
        """A training phase starts (03 has two in one budget): its steps are timed afresh."""
        self.step_s, self.tokens_per_s, self.eval_s, self.ckpt_s = 0.0, math.inf, None, 0.0
        self.mark = None  # (time, step) the current step time is measured from
        self.probed = None  # (time, this process's tokens) the plan's timing starts from

    def set_mark(self, step: int, at: float | None = None) -> None:
        self.mark = (at or time.time(), step)

    def pause(self, seconds: float) -> None:
        """An evaluation or a checkpoint took `seconds`: not training time (for the plan's timing either)."""
        if self.mark:
            self.mark = (self.mark[0] + seconds, self.mark[1])
        if self.probed:
            self.probed = (self.probed[0] + seconds, self.probed[1])

    def eval_estimate(self, val_tokens: int) -> float:
        """The last evaluation's seconds; before one, a forward pass is about a third of a training step."""
        return self.eval_s if self.eval_s is not None else val_tokens / (3 * self.tokens_per_s)

    def reserve(self, val_tokens: int) -> float:
        """Seconds the end of the session needs: a last step, the final evaluation, two checkpoints (the
        last one and the HF folder), plus a margin."""
        budget_s = max(0.0, self.deadline - self.started)
        return 2 * self.step_s + 1.5 * self.eval_estimate(val_tokens) + 2 * self.ckpt_s + min(120.0, max(1.0, 0.02 * budget_s))

    def left(self, val_tokens: int) -> float:
        return self.deadline - time.time() - self.reserve(val_tokens)

    def per_step(self, step: int, val_tokens: int, eval_interval: int) -> float:
        """What a step costs now, its share of the periodic evaluations included: the slower of the last log
        window and the steps since the mark."""
        recent = (time.time() - self.mark[0]) / (step - self.mark[1]) if self.mark and step - self.mark[1] >= 5 else 0.0
        return max(self.step_s, recent) + self.eval_estimate(val_tokens) / eval_interval

    def probe(self, step: int, first_step: int, session_tokens: int, acc) -> bool:
        """max_steps="auto": time this session's steps 6..20 (compiling and fitting came before the first, and the
        first steps pay for warm-up), evaluations and checkpoints taken out; True once they are timed and the plan
        can be made. `session_tokens`: this process's so far."""
        if step - first_step not in PLAN_PROBE_STEPS:
            return False
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        if step - first_step == PLAN_PROBE_STEPS[0]:
            self.probed = (time.time(), session_tokens)
            self.set_mark(step, self.probed[0])
            return False
        dt = time.time() - self.probed[0]
        self.step_s = dt / (PLAN_PROBE_STEPS[1] - PLAN_PROBE_STEPS[0])
        self.tokens_per_s = max(1.0, (session_tokens - self.probed[1]) * acc.num_processes / dt)
        return True

    def steps_that_fit(self, step: int, val_tokens: int, eval_interval: int) -> int:
        """The step this session can reach, ending inside the budget (3% kept spare)."""
        return step + max(1, int(0.97 * self.left(val_tokens) / self.per_step(step, val_tokens, eval_interval)))


class LogWindow:
    """The steps since the last log row: the loss summed over finite steps, finite and non-finite step counts
    and the loss's own statistics (tensors, so no step waits for the GPU), real tokens, steps, skipped steps
    and when it opened (evaluations and checkpoints taken out, so tokens/s measures training)."""

    def __init__(self, n_stats: int, device):
        self.sums = torch.zeros(3 + n_stats, dtype=torch.float64, device=device)
        self.tokens, self.steps, self.skipped, self.started = 0, 0, 0, time.time()

    def add(self, loss, stats, real_tokens: int) -> None:
        ok = torch.isfinite(loss)
        self.sums += torch.cat([torch.stack([torch.where(ok, loss, 0.0).double(), ok.double(), (~ok).double()]),
                                stats.double()])
        self.tokens, self.steps = self.tokens + real_tokens, self.steps + 1

    def totals(self, acc) -> list[float]:
        """The sums over every process, real tokens last (an all-reduce: every process calls it)."""
        return acc.reduce(torch.cat([self.sums, torch.tensor([float(self.tokens)], dtype=torch.float64,
                                                             device=self.sums.device)]), "sum").tolist()

    def reset(self) -> None:
        self.sums.zero_()
        self.tokens, self.steps, self.skipped, self.started = 0, 0, 0, time.time()

    def saved(self, totals: list[float]) -> dict:
        return {"sums": totals[:-1], "tokens": totals[-1], "steps": self.steps, "skipped": self.skipped,
                "seconds": time.time() - self.started}

    def restore(self, saved: dict, main_process: bool) -> None:
        """A window open at a checkpoint: its sums (over all processes) go to rank 0 alone, so they count once."""
        if main_process:
            self.sums += torch.tensor(saved["sums"], dtype=torch.float64, device=self.sums.device)
            self.tokens = int(saved["tokens"])
        self.steps, self.skipped = saved.get("steps", 0), saved["skipped"]
        self.started = time.time() - saved["seconds"]


# -----------------------------------------------------------------------------
# The loop

def train(model, train_data, val_batches, cfg, work: Path, budget: Budget | None = None, resume: dict | None = None,
          stop_at_step: int | None = None, stage: str = "pretrain", loss_module: nn.Module | None = None,
          max_steps: int | str | None = None, warmup_steps: int | None = None, precision: str | None = None,
          max_epochs: float | None = None) -> "TrainResult":
    """The loop every stage trains with. Returns the trained model and the final numbers; writes log.csv and
    ckpt.pt into `work`.

    Stops at max_steps (cfg's unless given: SFT counts its epochs), or when this session's `budget` would run
    out, keeping back the time the final evaluation, checkpoint and save need. With max_steps="auto" it
    plans as many steps as fit, decay included, but no more than `max_epochs` passes over the data take (the
    plan is then data-limited and the stage ends early), and shortens the plan if it falls behind. `stop_at_step`
    cuts a run short for the resume tests; `loss_module` is what trains `model` (LMLoss by default, DPOLoss
    for preference tuning); `precision`: one already chosen (the tests run a T4's fp16 on a CPU).
    """
    budget = budget or Budget(cfg.max_hours)
    max_steps = cfg.max_steps if max_steps is None else max_steps
    warmup_steps = cfg.warmup_steps if warmup_steps is None else warmup_steps
    auto = max_steps == "auto"  # this session plans max_steps to what fits its budget, decay included
    run, state = start_run(model, train_data, cfg, work, resume, stage, loss_module, max_steps, precision)
    acc, loss_fn, units = run.acc, run.loss_fn, run.loss_module.units
    if run.newton_schulz and state.step == 0:  # the precision Muon orthogonalizes in, said once per run
        run.say(f"Muon: Newton-Schulz in {run.newton_schulz}" + (" (this device has no native bf16)"
                                                                  if run.newton_schulz == "fp32" else ""))
    # the session's first minutes: compile (or fall back), fit the micro-batch; the clock for the plan starts after
    fit_first_step(run, state, train_data, max(val_batches, key=lambda b: b[0].numel(), default=None))
    val_batches = [piece for b in val_batches for piece in pieces_of(train_data, b, state.micro_batch)]
    budget.begin()
    session_started, first_step, hours_before = time.time(), state.step, state.hours
    val_tokens = sum(int((y != IGNORE_ID).sum()) for _, y in val_batches)
    window = LogWindow(len(run.loss_module.stat_names), acc.device)
    if state.window:  # a checkpoint taken mid-window
        window.restore(state.window, acc.is_main_process)
    last_ckpt, session_tokens, skips_in_a_row = time.time(), 0, 0
    said_plan = state.max_steps or 0  # the plan the last plan line gave
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    stop_reason, lr = "max_steps", lr_at(state.step, cfg, state.max_steps, warmup_steps)

    def hours() -> float:
        return hours_before + (time.time() - session_started) / 3600

    # a live bar where someone watches; a headless run has the log lines (with the time left) alone
    bar = tqdm(total=state.max_steps, initial=state.step, desc=stage, unit="step",
               disable=not (acc.is_main_process and watched()))
    try:
        while state.max_steps is None or state.step < state.max_steps:
            if stop_at_step is not None and state.step >= stop_at_step:
                stop_reason = "stopped"
                break
            # every step: the budget, on every process's clock (all must stop at the same step), and the plan
            started = state.step > first_step
            behind = (auto and state.max_steps is not None and started and (state.max_steps - state.step)
                      * budget.per_step(state.step, val_tokens, cfg.eval_interval) > budget.left(val_tokens))
            out_of_time, ckpt_due, behind = agree(acc, started and budget.left(val_tokens) < 0,
                                                  time.time() - last_ckpt > cfg.checkpoint_minutes * 60, behind)
            if behind and not out_of_time:  # slower than planned: end sooner, still on a decayed last step
                state.max_steps = bar.total = run.plan(budget, state.step, val_tokens)
                if state.max_steps < 0.95 * said_plan:  # a line when the plan has moved, not at every small step
                    said_plan = state.max_steps
                    run.say(f"re-planned: {plan_line(budget, state, cfg)}")
            if out_of_time:
                stop_reason = "time_budget"
                break
            # every checkpoint_minutes: a checkpoint (on its own clock, not only on log steps)
            if ckpt_due:
                state.hours = hours()
                budget.ckpt_s = run.save_checkpoint(state, window)
                last_ckpt = time.time()
                window.started += budget.ckpt_s  # tokens/s and the step time measure training, not writing
                budget.pause(budget.ckpt_s)
            # one optimizer step
            lr = set_lr(run.optimizers, state.step, cfg, state.max_steps, warmup_steps)
            batches, weights = micro_batches(train_data, [train_data.next_batch() for _ in range(cfg.grad_accum_steps)],
                                             state.micro_batch)
            loss, stats, grad_norm, real = train_step(acc, loss_fn, run.optimizers, run.scaler, batches, cfg.grad_clip,
                                                      run.precision, weights)
            state.step += 1
            if state.step == first_step + 1 and acc.num_processes > 1:  # past the process group's first all-reduce
                run.say(f"{stage}: {acc.num_processes} processes train together")
                report_launch_event("started", processes=acc.num_processes)  # launch(): no longer a start-up failure
            window.add(loss, stats, real)
            session_tokens += real
            bar.update(1)
            # max_steps="auto": the plan, once this session's first steps are timed
            if auto and state.max_steps is None and budget.probe(state.step, first_step, session_tokens, acc):
                run.plan_step_s = budget.step_s
                fit = run.plan(budget, state.step, val_tokens)
                data = max(state.step + 1, train_data.steps_for(max_epochs, cfg.grad_accum_steps)) if max_epochs else fit
                state.max_steps = bar.total = said_plan = min(fit, data)
                state.data_limited = data < fit
                run.say(plan_line(budget, state, cfg, (max_epochs, train_data.n * train_data.T) if data < fit else None))
            # fp16: the GradScaler's scale drops exactly when it skipped the step (one GPU sync per step, fp16 only)
            if scale is not None:
                skipped, scale = run.scaler.get_scale() < scale, run.scaler.get_scale()
                skips_in_a_row = skips_in_a_row + 1 if skipped else 0
                window.skipped, state.skipped_steps = window.skipped + skipped, state.skipped_steps + skipped
                if skips_in_a_row >= FP16_MAX_SKIPS_IN_A_ROW:
                    raise run.diverged(f"the fp16 loss or gradients stayed inf/nan for {skips_in_a_row} steps in a "
                                       f"row (up to step {state.step}; GradScaler skipped each)")
            # every log_interval steps a log row, every eval_interval steps an evaluation (and at the end)
            log_now = state.step % cfg.log_interval == 0
            eval_now = state.step % cfg.eval_interval == 0 or state.step == state.max_steps
            if log_now or eval_now:
                row = run.close_window(window, state, budget, lr, hours())
                row["grad_norm"] = round(float(grad_norm), 3)
                budget.set_mark(state.step)
                if eval_now:
                    started_eval = time.time()
                    state.val_loss = evaluate(loss_fn, val_batches, acc.device, run.precision, units)
                    budget.eval_s = time.time() - started_eval
                    window.started += budget.eval_s  # tokens/s and the step time measure training alone
                    budget.pause(budget.eval_s)
                    row["val_loss"] = round(state.val_loss, 4)
                run.add_row(state, row)
                bar.set_postfix(loss=row["train_loss"], tok_s=f"{row['tokens_per_s']:,}")
                run.say(log_line(row, state, budget, lr, train_data.epochs_done()))
        # the end, whatever stopped the loop: a final evaluation where the last row has none, and a checkpoint
        if not state.log or state.log[-1]["step"] != state.step or state.log[-1].get("val_loss") is None:
            if state.log and state.log[-1]["step"] == state.step:
                row = state.log.pop()
            else:  # a stop before max_steps: the train-loss window stays open and goes into the checkpoint,
                # so a resumed run logs the same rows as one that was never interrupted
                row = {"step": state.step, "tokens": state.tokens + int(run.totals(window, state)[-1]),
                       "lr": f"{lr:.3e}", "elapsed_s": round(hours() * 3600, 1)}
            state.val_loss = evaluate(loss_fn, val_batches, acc.device, run.precision, units)
            row["val_loss"] = round(state.val_loss, 4)
            run.add_row(state, row)
        else:  # the last row has its evaluation; a finished run resumed again has nothing left to train
            state.val_loss = state.log[-1]["val_loss"] if state.val_loss is None else state.val_loss
            write_log(work / "log.csv", state.log, run.columns)  # also into a new folder resumed from a finished one
    except Exception as e:  # an out-of-memory later than the first steps: the trial's test, the trial's words
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(stage, state, acc.device) from None
    finally:
        bar.close()
    state.hours = hours()
    run.save_checkpoint(state, window)
    if cfg.log_with:
        acc.end_training()
    return TrainResult(run.model, run.acc.is_main_process, {
        **final_numbers(run, state, window, auto, stop_reason, first_step, session_started, val_tokens),
        "max_epochs": max_epochs if auto else None, "data_limited": state.data_limited})


def start_run(model, train_data, cfg, work: Path, resume: dict | None, stage: str, loss_module, max_steps,
              precision: str | None) -> tuple["Run", RunState]:
    """The set-up of train(), in the order a resumed run must repeat: the process group (accelerate), the seed,
    the optimizers, the checkpoint's state, compiling, the DDP wrap, then each process's random streams."""
    precision, compiled = precision or choose_precision(cfg.precision), resolve_compile(cfg.compile, cfg.max_hours)
    strict = compiled and cfg.compile != "auto"  # compile=True: a compile that fails stops the stage
    # device placement and multi-process DDP (cpu=True lets torchrun run several CPU processes on gloo);
    # precision is ours, explicit below
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.log_with,
                      project_dir=str(work / "trackers") if cfg.log_with else None)
    if cfg.log_with:  # the trackers get the config once and every log row (tensorboard: <stage>/trackers/<stage>)
        acc.init_trackers(stage, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                         for k, v in dataclasses.asdict(cfg).items()})
    set_seed(cfg.seed, device_specific=True)  # a dropout stream per process; rank 0 keeps the seed's
    train_data.rank, train_data.world = acc.process_index, acc.num_processes
    model.to(acc.device)
    optimizers = make_optimizers(model, cfg, acc.device)
    kinds = ["adamw", "muon"][:len(optimizers)]
    scaler = torch.amp.GradScaler(acc.device.type, enabled=precision == "fp16")
    state = RunState(max_steps=None if max_steps == "auto" else max_steps)
    if resume:
        state = restore_checkpoint(resume, model, optimizers, kinds, scaler, train_data)
        state.max_steps = state.max_steps if max_steps == "auto" else max_steps  # a number given now is the plan
    loss_module = loss_module or LMLoss(model)
    loss_module.to(acc.device)
    # compiled inside the DDP wrap, as nanoGPT does; batches of varying shape (SFT, DPO) compile with dynamic
    # shapes at once: a train and an eval graph, not a recompile per new shape (measured on 03)
    switch = CompiledOrEager(loss_module, True if getattr(train_data, "variable_shapes", False) else None) \
        if compiled else loss_module
    loss_fn, *optimizers = acc.prepare(switch, *optimizers)
    if resume:
        note = restore_rng(resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]], acc)
        if note and acc.is_main_process:
            print(f"resume: {note}")
    run = Run(acc, model, loss_module, loss_fn, optimizers, kinds, scaler, train_data, cfg, stage, work, precision,
              compiled)
    run.switch, run.compile_strict = switch, strict
    return run, state


class Run:
    """What the loop's periodic work needs, in one place: the process group, the model and its optimizers,
    the data position, the config and the stage folder; it writes log rows and checkpoints (rank 0)."""

    def __init__(self, acc, model, loss_module, loss_fn, optimizers, kinds, scaler, train_data, cfg, stage, work,
                 precision, compiled):
        self.acc, self.model, self.loss_module, self.loss_fn = acc, model, loss_module, loss_fn
        self.optimizers, self.kinds, self.scaler, self.train_data = optimizers, kinds, scaler, train_data
        self.cfg, self.stage, self.work, self.precision, self.compiled = cfg, stage, work, precision, compiled
        self.switch, self.compile_strict, self.compile_error = loss_module, False, None  # set by start_run
        self.plan_step_s = None  # the step time max_steps="auto" planned with (this session)
        self.columns = LOG_COLUMNS + list(loss_module.stat_names)
        self.flops, peak = flops_per_token(model), peak_flops(acc.device, precision)
        self.newton_schulz = next((g.get("newton_schulz", "bf16") for o in optimizers for g in o.param_groups
                                   if "split_qkv" in g), None)  # Muon's groups; None without Muon
        self.peak = peak * acc.num_processes if peak else None

    def say(self, line: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(line)

    def plan(self, budget: Budget, step: int, val_tokens: int) -> int:
        """The step this session can reach, the same on every process (the smallest of their clocks')."""
        fit = torch.tensor([budget.steps_that_fit(step, val_tokens, self.cfg.eval_interval)])
        fit = int(self.acc.gather(fit.to(self.acc.device)).min()) if self.acc.num_processes > 1 else int(fit)
        return max(step + 1, fit)

    def last_checkpoint(self) -> str:
        path = self.work / "ckpt.pt"
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

    def close_window(self, window: LogWindow, state: RunState, budget: Budget, lr: float, hours: float) -> dict:
        """The log row of the window (the one sync per row), which then starts again."""
        totals = self.totals(window, state)
        (loss_sum, n_ok, _), stat_sums, n_tokens = totals[:3], totals[3:-1], totals[-1]
        dt = max(time.time() - window.started, 1e-9)
        budget.step_s, budget.tokens_per_s = dt / max(1, window.steps), max(n_tokens / dt, 1.0)
        state.tokens += int(n_tokens)
        stat_names = self.columns[len(LOG_COLUMNS):]
        row = {"step": state.step, "tokens": state.tokens, "train_loss": round(loss_sum / n_ok, 4) if n_ok else None,
               "lr": f"{lr:.3e}", "tokens_per_s": round(n_tokens / dt), "skipped_steps": window.skipped,
               "mfu": round(self.flops * n_tokens / dt / self.peak, 4) if self.peak else None,
               "elapsed_s": round(hours * 3600, 1),
               **{name: round(v / n_ok, 4) for name, v in zip(stat_names, stat_sums) if n_ok}}
        window.reset()
        return row

    def add_row(self, state: RunState, row: dict) -> None:
        """A log row into the state, log.csv and accelerate's trackers."""
        state.log.append(row)
        write_log(self.work / "log.csv", state.log, self.columns)
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
            write_file(self.work / "ckpt.pt", torch_file(ckpt), needed=tensor_bytes(ckpt))
        acc.wait_for_everyone()
        return time.time() - started


def restore_checkpoint(ckpt: dict, model, optimizers, kinds, scaler, train_data) -> RunState:
    """Model, optimizers, scaler and data position from a checkpoint (the random streams come after the DDP
    wrap, restore_rng); returns the run's state."""
    model.load_state_dict(ckpt["model"])
    saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
    saved_kinds = ckpt.get("optimizers", ["adamw"])  # checkpoints from before Muon hold one AdamW
    if saved_kinds != kinds:
        raise PocketGPTError(f"resume_from: that run trained with {' + '.join(saved_kinds)}, this one would use "
                             f"{' + '.join(kinds)}: set optimizer={'muon' if 'muon' in saved_kinds else 'adamw'!r} "
                             f"to resume it.")
    for opt, opt_state in zip(optimizers, saved):
        opt.load_state_dict(opt_state)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    train_data.load_state(ckpt["data"])
    return RunState.from_checkpoint(ckpt)


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


@dataclasses.dataclass
class TrainResult:
    """What train() returns: the trained model, whether this process is the one that writes (rank 0), and the
    run's numbers for metrics.json."""
    model: nn.Module
    main_process: bool
    metrics: dict


def final_numbers(run: Run, state: RunState, window: LogWindow, auto: bool, stop_reason: str, first_step: int,
                  session_started: float, val_tokens: int) -> dict:
    """The run's numbers for metrics.json."""
    tokens = state.tokens + int(run.totals(window, state)[-1])  # the tokens of a window left open
    rates = [r["tokens_per_s"] for r in state.log if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in state.log if r.get("mfu")]
    log = state.log
    return {"steps": state.step, "tokens": tokens, "final_val_loss": state.val_loss, "val_tokens_evaluated": val_tokens,
            "final_train_loss": next((r["train_loss"] for r in reversed(log) if r.get("train_loss") is not None), None),
            "tokens_per_s": float(np.median(rates)) if rates else None,
            "mfu": float(np.median(mfus)) if mfus else None, "params": count_params(run.model),
            "flops_per_token": run.flops, "precision": run.precision, "compiled": run.compiled,
            "compile_error": run.compile_error, "micro_batch": state.micro_batch,
            "grad_accum_steps": state.grad_accum_steps, "plan_step_s": run.plan_step_s,
            "skipped_steps": state.skipped_steps, "device": device_name(run.acc.device),
            "processes": run.acc.num_processes, "stop_reason": stop_reason,
            "finished": state.max_steps is not None and state.step >= state.max_steps, "hours": state.hours,
            "max_steps": state.max_steps, "planned": auto, "optimizers": run.kinds,
            "newton_schulz": run.newton_schulz,
            "session_hours": (time.time() - session_started) / 3600, "session_steps": state.step - first_step}


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
