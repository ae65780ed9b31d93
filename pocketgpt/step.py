"""One step: an optimizer step, an evaluation, and the first step of a session fitted to this device.

train_step and evaluate are what every stage's loop (train.py) and the benchmark run. The first minutes of a
session adapt to the machine: a compile that fails falls back to eager (CompiledOrEager), a micro-batch that
does not fit is halved (fit_first_step), and an out-of-memory later on says what to lower. `agree` makes every
process take each such decision together.
Imports: common, device, model, checkpoint.
"""
from __future__ import annotations

import dataclasses
import gc
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from .checkpoint import RunState
from .common import PAD_ID, PocketGPTError
from .device import autocast
from .model import LMLoss


@dataclasses.dataclass
class StepParts:
    """What an optimizer step runs on: the process group, the (DDP-wrapped) loss module, the optimizers, fp16's
    GradScaler, the precision and the gradient clip. train()'s Run holds one; the benchmark makes its own."""
    acc: Accelerator
    loss_fn: nn.Module
    optimizers: list
    scaler: torch.amp.GradScaler
    precision: str
    grad_clip: float


def train_step(parts: StepParts, batches, weights=None):
    """One optimizer step over the micro-batches; gradients sync across GPUs only on the last one.

    `weights`: each micro-batch's share of the step (equal shares unless given: a data batch split into
    smaller micro-batches gives each its share of that batch).

    fp16 needs the GradScaler: the loss is scaled up so small gradients survive in fp16, the
    gradients are unscaled before clipping, and a step with inf/nan gradients is skipped.
    Returns the mean loss and the loss's other statistics (tensors, so nothing waits for the GPU),
    the gradient norm and the number of real (not padding) input tokens this process trained on.
    """
    acc, loss_fn, optimizers, scaler = parts.acc, parts.loss_fn, parts.optimizers, parts.scaler
    total, stats, real = 0.0, 0.0, 0
    weights = weights or [1 / len(batches)] * len(batches)
    for i, ((x, y), w) in enumerate(zip(batches, weights)):
        sync = i == len(batches) - 1
        with nullcontext() if sync else acc.no_sync(loss_fn):
            with autocast(acc.device, parts.precision):
                out = loss_fn(x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True))
            loss, step_stats = out if isinstance(out, tuple) else (out, torch.zeros(0, device=acc.device))
            scaler.scale(loss * w).backward()
        total, stats = total + loss.detach() * w, stats + step_stats.float() * w
        real += int((x != PAD_ID).sum())  # x is still on the CPU: no GPU sync
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), parts.grad_clip)
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


# -----------------------------------------------------------------------------
# Every process decides together; what does not fit

def agree(acc, *flags: bool) -> list[bool]:
    """Each flag, true on every process if it is true on any: each process reads its own clock,
    but all must stop (or checkpoint) at the same step, or the next collective call would wait
    forever. One small all-reduce for all the flags."""
    if acc.num_processes == 1:
        return list(flags)
    votes = acc.reduce(torch.tensor([float(f) for f in flags], device=acc.device), "sum")
    return [bool(v > 0) for v in votes.tolist()]


def out_of_memory(stage: str, state: RunState, device) -> PocketGPTError:
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
