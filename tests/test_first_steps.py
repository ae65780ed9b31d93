"""The first minutes of a session: a compile that fails, a micro-batch that does not fit, a plan made after both.

Each condition is real: a C++ compiler that fails (CC/CXX=/bin/false, as on an image without a working
toolchain), an allocation limit (RLIMIT_AS) in a child process, torch.compile with a working compiler.
"""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_real_path import ENV, pretrain_params, stage_cmd

import pocketgpt_utils as pg
from pocketgpt.batches import DialogBatches, PairBatches
from pocketgpt.budget import PLAN_PROBE_STEPS
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.common import HERE
from pocketgpt.device import CPU_COMPILE_MIN_HOURS
from pocketgpt.train import read_log

BROKEN_COMPILER = {"CC": "/bin/false", "CXX": "/bin/false"}  # inductor finds no working C++ compiler
# glibc as a fixed allocator: one arena (a thread's own 64 MB arena would move the address space about), and
# every large block mapped and unmapped (no dynamic threshold that keeps freed activations in the heap)
ALLOCATOR = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def run(stage: str, nproc: int, params: dict, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(stage_cmd(stage, nproc, params), capture_output=True, text=True, env={**ENV, **env},
                          timeout=timeout)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_compile_that_fails_falls_back_to_eager_with_one_line(tokenizer_stage, tmp_path, nproc):
    """compile="auto" (a session long enough that auto compiles on a CPU) with no working C++ compiler: the
    stage trains eager, says why in one line, and records it; on 2 processes both fall back, neither hangs."""
    params = pretrain_params(tokenizer_stage, tmp_path, compile="auto", max_hours=CPU_COMPILE_MIN_HOURS, max_steps=6,
                             log_interval=3, eval_interval=6)
    proc = run("pretrain", nproc, params, BROKEN_COMPILER)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert m["compiled"] is False and "InvalidCxxCompiler" in m["compile_error"] and m["steps"] == 6
    assert m["processes"] == nproc
    said = [line for line in proc.stdout.splitlines() if "torch.compile failed" in line]
    assert len(said) == 1 and "training eager" in said[0], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_compile_true_that_fails_stops_with_one_paragraph(tokenizer_stage, tmp_path):
    params = pretrain_params(tokenizer_stage, tmp_path, compile=True, max_steps=6)
    proc = run("pretrain", 1, params, BROKEN_COMPILER)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "torch.compile failed" in proc.stderr and "InvalidCxxCompiler" in proc.stderr
    assert "compile=False" in proc.stderr
    assert not (tmp_path / "pretrain").exists()  # nothing that looks finished


# -----------------------------------------------------------------------------
# A micro-batch that does not fit: a real allocation failure under RLIMIT_AS

def limited_pretrain(params: dict, limit: int | None, stop_at_step: int | None = None) -> None:
    """In a child process: the pretrain stage under an address-space limit (bytes; None: none), then the
    process's peak virtual memory as the last line (VmPeak: what RLIMIT_AS limits)."""
    import json
    import resource

    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cfg = pg.make_config(pg.PretrainConfig, "demo", **params)
    pg.run_pretrain_stage(cfg, stop_at_step=stop_at_step)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print(json.dumps({"vm_peak": int(status["VmPeak"].split()[0]) * 1024}))


def run_limited(params: dict, limit: int | None = None, stop_at_step: int | None = None) -> tuple[str, int]:
    """limited_pretrain in a fresh Python; returns its output and its peak virtual memory."""
    import json
    import sys

    params = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    code = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent), str(HERE)]!r}; "
            f"from test_first_steps import limited_pretrain; "
            f"limited_pretrain({params!r}, {limit!r}, {stop_at_step!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**ENV, **ALLOCATOR})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])["vm_peak"]


def test_a_batch_that_does_not_fit_is_halved_and_trains_as_the_equivalent_run_and_resumes(tokenizer_stage, tmp_path):
    """An address-space limit that the profile's micro-batch (512 rows) cannot fit but a quarter of it can: the
    stage halves the micro-batch (doubling the accumulation) until it fits, says so, and trains as a run started
    at 128 rows x 4 accumulation steps; a resumed session starts at the fitted micro-batch."""
    base = pretrain_params(tokenizer_stage, tmp_path, n_embd=64, max_steps=6, log_interval=1, eval_interval=3,
                           warmup_steps=2)
    ref_out, quarter_peak = run_limited({**base, "run_dir": str(tmp_path / "ref"), "batch_size": 128,
                                         "grad_accum_steps": 4})
    _, half_peak = run_limited({**base, "run_dir": str(tmp_path / "half"), "batch_size": 256, "grad_accum_steps": 2,
                                "max_steps": 1})
    assert half_peak - quarter_peak > 64 * 2 ** 20  # activations, not the process's noise, set the limit
    limit = (quarter_peak + half_peak) // 2
    big = {**base, "run_dir": str(tmp_path / "big"), "batch_size": 512, "grad_accum_steps": 1}
    out, _ = run_limited(big, limit, stop_at_step=3)
    fitted = [line for line in out.splitlines() if "does not fit" in line]
    assert len(fitted) == 1 and "micro-batch 128 and grad_accum_steps 4" in fitted[0], out
    ckpt = load_checkpoint(tmp_path / "big" / "pretrain")
    assert ckpt["state"]["micro_batch"] == 128 and ckpt["state"]["grad_accum_steps"] == 4
    first = read_log(tmp_path / "big" / "pretrain" / "log.csv")
    again, _ = run_limited({**big, "resume_from": "auto"}, limit)
    assert "does not fit" not in again, again  # the resumed session started at the fitted micro-batch
    m = pg.read_json(tmp_path / "big" / "pretrain" / "metrics.json")
    assert m["finished"] and m["micro_batch"] == 128 and m["grad_accum_steps"] == 4
    ref = {r["step"]: r for r in read_log(tmp_path / "ref" / "pretrain" / "log.csv")}
    rows = [r for r in first + read_log(tmp_path / "big" / "pretrain" / "log.csv") if r["train_loss"] is not None]
    assert {r["step"] for r in rows} == {r["step"] for r in ref.values() if r["train_loss"] is not None}
    for r in rows:
        assert r["train_loss"] == pytest.approx(ref[r["step"]]["train_loss"], abs=1e-3), r["step"]
        if r["val_loss"] is not None:
            assert r["val_loss"] == pytest.approx(ref[r["step"]]["val_loss"], abs=1e-3), r["step"]


def test_03s_largest_batch_is_the_one_tried_first_and_the_seeded_order_goes_on(tok_rows):
    """03's batches are as long as their longest row: the one that fills the most positions is tried before the
    first step (fit_first_step), and taking it does not move the data position."""
    data = DialogBatches(tok_rows, batch_size=8, seed=3)
    x, _ = data.largest_batch()
    sizes = [data.collate(b)[0].numel() for b in data.batches()]
    assert x.numel() == max(sizes) and sizes.index(max(sizes)) > 0  # not simply the first batch of the epoch
    fresh = DialogBatches(tok_rows, batch_size=8, seed=3)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(data.next_batch(), fresh.next_batch()))
    pairs = [(list(range(2 + i % 7)), list(range(2 + i % 7))) for i in range(40)]
    pairs = PairBatches([(p, p) for p in pairs], batch_size=4, seed=0)
    x, y = pairs.collate(pairs.batches()[0])
    for (px, _), half in zip(pairs.split((x, y), 2), [0, 2]):  # a micro-batch keeps each pair's two rows
        assert torch.equal(px, torch.cat([x[half:half + 2], x[4 + half:4 + half + 2]]))


@pytest.fixture
def tok_rows():
    rng = np.random.default_rng(0)
    return [(list(range(n)), list(range(n))) for n in rng.integers(3, 60, size=400)]


# -----------------------------------------------------------------------------
# The plan of max_steps="auto" is made after compiling and fitting

def test_the_plan_times_steps_after_compiling_and_matches_the_steady_step_time(tokenizer_stage, tmp_path):
    """compile=True with a working compiler on this CPU, and an evaluation among the steps the plan times (its
    first run would compile the eval graph): the plan's step time is within 30% of the step time the log shows
    after it."""
    params = pretrain_params(tokenizer_stage, tmp_path, n_layer=1, compile=True, max_steps="auto", max_epochs=1000,
                             max_hours=150 / 3600, log_interval=10, eval_interval=10, warmup_steps=5)
    proc = run("pretrain", 1, params, {})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert m["compiled"] and m["planned"] and m["plan_step_s"]
    tokens_per_step = params["batch_size"] * params["n_positions"]
    steady = [tokens_per_step / r["tokens_per_s"] for r in read_log(tmp_path / "pretrain" / "log.csv")
              if r["step"] > PLAN_PROBE_STEPS[1] and r["tokens_per_s"]]
    assert len(steady) >= 2, proc.stdout
    assert m["plan_step_s"] == pytest.approx(float(np.median(steady)), rel=0.3), (m["plan_step_s"], steady)


def test_an_out_of_memory_after_the_first_steps_is_said_for_this_device_and_the_micro_batch_in_use():
    """Later than the trial, a CPU allocation failure is an out-of-memory too (the trial's own test), and the
    message names the device's memory and halves the micro-batch actually in use, not the configured batch."""
    import torch

    from pocketgpt.checkpoint import RunState
    from pocketgpt.step import is_out_of_memory, out_of_memory

    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    state = RunState(step=41, micro_batch=8, grad_accum_steps=2)
    cpu = str(out_of_memory("pretrain", state, torch.device("cpu")))
    assert cpu.startswith("pretrain: out of memory at step 42 with a micro-batch of 8") and "GPU" not in cpu
    assert "batch_size=4 with grad_accum_steps=4" in cpu
    assert "out of GPU memory" in str(out_of_memory("sft", state, torch.device("cuda")))
