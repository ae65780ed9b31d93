"""What the loop measures, in two small objects: this session's clock (Budget: the deadline from max_hours, what
the end keeps back, how many steps fit) and the open log window (LogWindow: the sums behind the next log row).

Imports: nothing of the package (torch alone).
"""
from __future__ import annotations

import math
import time

import torch

PLAN_PROBE_STEPS = (5, 20)  # max_steps="auto" times this session's steps 6..20, then plans


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
