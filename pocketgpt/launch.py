"""Running a stage on every GPU from a notebook: fresh processes, never a fork of the kernel.

A fork inherits whatever the kernel, the image or any import did to CUDA, NCCL and threads before our first
cell, and on Kaggle that is reported to fail even for a function that does nothing ("Cannot re-initialize
CUDA in forked subprocess": accelerate #3524, #3833, #3925). So launch() runs torchrun as a child of the
kernel, on the stage command line the README documents (`python -m pocketgpt_utils stage NAME`), with the
configuration handed over whole in a JSON file, and makes it feel like a cell: rank 0's lines stream in as
they come, a worker's failure ends the cell with that worker's own message, an interrupt stops every worker,
and a start that fails before the first step continues the session on one GPU.
Imports: common, files (torch when it counts GPUs).
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import LAUNCH_EVENTS, PocketGPTError, child_env, read_json
from .files import write_json


def processes_for(cfg) -> tuple[int, str]:
    """How many processes a stage trains with, and why: `processes` if set, else every GPU here (one on a CPU)."""
    import torch

    gpus = torch.cuda.device_count()  # counts the GPUs without starting CUDA in this process
    if cfg.processes is not None:
        return int(cfg.processes), f"processes={cfg.processes}" + ("" if gpus else " (on the CPU, over gloo)")
    if gpus > 1:
        return gpus, f"processes=None and {gpus} GPUs are here"
    return 1, "processes=None and " + ("one GPU is here" if gpus else "no GPU is here")


def launch(fn, cfg):
    """Run a stage (run_pretrain_stage or run_sft_stage) on `processes_for(cfg)` processes: in this process
    for one (or when a launcher already started this one), else as torchrun's workers (launch_workers)."""
    n, why = processes_for(cfg)
    if n <= 1 or "WORLD_SIZE" in os.environ:
        print(f"training in this process: {why}", flush=True)
        return fn(cfg)
    print(f"training on {n} processes: {why}", flush=True)
    try:
        return launch_workers(cfg, n)
    except WorkersDidNotStart as e:
        print(f"{e}\nThis session continues on one process.", flush=True)
        return fn(dataclasses.replace(cfg, processes=1))


class WorkersDidNotStart(PocketGPTError):
    """The processes failed before their first step together (process group, NCCL): one process can still train."""


def launch_workers(cfg, n: int) -> Path:
    """torchrun with n workers, each running `python -m pocketgpt_utils stage NAME --config FILE`; their files
    (the config, torchrun's log, each worker's stderr, the events rank 0 reports: started.json, done.json) go to
    `<out_dir>.launch/`."""
    folder = Path(cfg.out_dir).with_name(Path(cfg.out_dir).name + ".launch")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    write_json(config, {"stage": cfg.stage, "config": dataclasses.asdict(cfg)})
    logs = folder / f"logs-{time.strftime('%Y%m%d-%H%M%S')}"
    events = Path(tempfile.mkdtemp(prefix="events-", dir=folder))  # this launch's own: nothing left from another
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "--log-dir", str(logs), "--redirects", "2",  # each worker's stderr to its own file: its error is its own
           "-m", "pocketgpt_utils", "stage", cfg.stage, "--config", str(config)]
    with open(folder / "torchrun.log", "w") as torchrun_log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=torchrun_log, text=True, start_new_session=True,
                                env={**child_env(), LAUNCH_EVENTS: str(events), "PYTHONUNBUFFERED": "1",
                                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                       str(max(1, (os.cpu_count() or n) // n)))})
        try:
            for line in proc.stdout:  # rank 0's lines, as they come (the others print nothing)
                print(line, end="", flush=True)
            returncode = proc.wait()
        except BaseException:  # the stop button (KeyboardInterrupt), or anything else: no worker outlives the cell
            stop(proc)
            raise
    if returncode == 0 and (events / "done.json").exists():
        return Path(read_json(events / "done.json")["out"])
    rank, what = worker_failure((folder / "torchrun.log").read_text(errors="replace"), logs)
    if not (events / "started.json").exists() and not what.startswith("error: "):
        raise WorkersDidNotStart(
            f"Starting {n} processes failed before their first step together: process {rank} {what}. That is the "
            f"process group starting up (NCCL on GPUs, gloo on a CPU), not your data or parameters. If it is NCCL, "
            f"try NCCL_P2P_DISABLE=1 (or NCCL_IB_DISABLE=1) in the environment, and NCCL_DEBUG=INFO to see why; "
            f"torchrun's own words are in {folder / 'torchrun.log'}.")
    raise PocketGPTError(f"{cfg.stage} on {n} processes: process {rank} " + (
        what.removeprefix("error: ") if what.startswith("error: ") else what))


def worker_failure(torchrun_log: str, logs: Path) -> tuple[str, str]:
    """Which worker failed first (torchrun's "Root Cause") and what it said: its own one-line error, the last
    frames of its traceback, or the signal that killed it."""
    cause = torchrun_log[torchrun_log.rfind("Root Cause"):]
    rank = (re.search(r"rank\s*:\s*(\d+)", cause) or re.search(r"local_rank: (\d+)", torchrun_log) or [None, "?"])[1]
    code = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    stderr = next(iter(sorted(logs.glob(f"**/attempt_*/{rank}/stderr.log"))), None)
    text = stderr.read_text(errors="replace") if stderr else ""
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    if errors:
        return rank, errors[-1]
    if code and int(code[1]) < 0:
        name = signal.Signals(-int(code[1])).name
        return rank, f"was killed by {name} (signal {-int(code[1])}): out of memory, or stopped from outside"
    if "Traceback (most recent call last)" in text:
        frames = text[text.rfind("Traceback (most recent call last)"):].strip().splitlines()
        return rank, "crashed:\n" + "\n".join(frames[-8:])
    return rank, f"exited with code {code[1] if code else '?'}: see {logs}"


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop torchrun and every worker: SIGTERM to its process group (torchrun passes it on), then SIGKILL to
    whatever of them is still there after `grace` seconds, so no process keeps the GPU's memory."""
    family = descendants(proc.pid) | {proc.pid}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in family):
        time.sleep(0.1)
    for pid in family:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
