"""Two processes from a notebook without forking: pg.launch runs torchrun as the kernel's child (gloo on this CPU,
NCCL on Kaggle's T4 x2) and makes it feel like a cell: lines stream, a worker's error is the cell's, an
interrupt or a dead worker stops them all."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import nbformat
import pytest

import pocketgpt_utils as pg
from conftest import TINY
from pocketgpt.common import HERE
from pocketgpt.launch import alive, descendants
from pocketgpt.train import read_log


def pretrain_cfg(tokenizer_stage, run_dir, **kw):
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(tokenizer_dir=str(tokenizer_stage), precision="fp32", eval_windows=16, processes=2)
    return pg.make_config(pg.PretrainConfig, "demo", run_dir=str(run_dir), **{**params, **kw})


def workers(pid: int) -> list[int]:
    """The stage's worker processes below `pid` (torchrun's children running the stage)."""
    found = []
    for child in descendants(pid):
        try:
            cmd = open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"pocketgpt_utils" in cmd and b"torch.distributed.run" not in cmd:
            found.append(child)
    return found


def test_a_notebook_runs_02_and_03_on_two_processes(tokenizer_stage, demo_data, tmp_path):
    """papermill runs 02 and 03 from a notebook kernel with processes=2: both processes train (a global batch
    of both), the log has each step once, rank 0's lines are in the saved notebook, and nothing forks."""
    run = tmp_path / "run"
    shutil.copytree(tokenizer_stage, run / "tokenizer")
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(max_steps=20, epochs=1, processes=2, precision="fp32")
    pg.run_pipeline("demo", run, dialogs=demo_data / "dialogs.csv", params=params, stages=["pretrain", "sft"],
                    log_output=False)
    m = pg.read_json(run / "pretrain" / "metrics.json")
    assert m["processes"] == 2 and m["tokens"] == 20 * 2 * TINY["batch_size"] * TINY["n_positions"]
    sft = pg.read_json(run / "sft" / "metrics.json")
    assert sft["processes"] == 2 and sft["finished"]
    for stage, name in [("pretrain", "02_pretrain"), ("sft", "03_sft")]:
        steps = [r["step"] for r in read_log(run / stage / "log.csv")]
        assert steps == sorted(set(steps))  # one writer
        nb = nbformat.read(str(run / "notebooks" / f"{name}.ipynb"), as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "training on 2 processes: processes=2" in text and f"{stage}: 2 processes train together" in text
        assert re.search(r"^step \d+/\d+ loss ", text, re.M) and "fork" not in text.lower()  # rank 0's log lines


def test_a_worker_that_raises_ends_the_launch_with_its_own_message(tokenizer_stage, demo_data, tmp_path):
    pre = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "pre", max_steps=5, processes=None))
    bad = tmp_path / "d.csv"
    bad.write_text("question,context\nq,c\nq2,c2\n")
    cfg = pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), pretrain_dir=str(pre), dialogs_path=str(bad),
                         processes=2, precision="fp32")
    with pytest.raises(pg.PocketGPTError) as e:
        pg.launch(pg.run_sft_stage, cfg)
    message = str(e.value)
    assert message.startswith("sft on 2 processes: process ") and "no prompt/response columns found among" in message
    assert "Traceback" not in message and "ChildFailedError" not in message and "\n" not in message


def test_a_worker_killed_with_sigkill_ends_the_launch_with_its_rank_and_signal(tokenizer_stage, tmp_path):
    cfg = pretrain_cfg(tokenizer_stage, tmp_path, max_steps=100_000, log_interval=5, max_hours=1)
    outcome = {}

    def run():
        try:
            pg.launch(pg.run_pretrain_stage, cfg)
        except pg.PocketGPTError as e:
            outcome["error"], outcome["at"] = str(e), time.time()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while not (tmp_path / "pretrain.partial" / "log.csv").exists():  # past the first steps: training on both
        assert time.time() < deadline and thread.is_alive(), outcome
        time.sleep(0.2)
    victim = max(workers(os.getpid()))  # the second worker started
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive() and outcome["at"] - killed < 30, outcome
    assert "was killed by SIGKILL (signal 9)" in outcome["error"] and outcome["error"].startswith("pretrain on 2 processes: process ")
    assert not workers(os.getpid())  # the survivor is gone too


INTERRUPTED = r'''
import json, signal, sys
import torch
# a notebook kernel always turns the stop button (SIGINT) into KeyboardInterrupt, as ipykernel does; a process
# started in a shell's background (CI's, nohup ... &) would otherwise inherit SIGINT ignored and never hear it
signal.signal(signal.SIGINT, signal.default_int_handler)
import pocketgpt_utils as pg
torch.ones(64, 64) @ torch.ones(64, 64)  # torch work in the kernel before the launch: threads started
cfg = pg.make_config(pg.PretrainConfig, "demo", **json.loads(sys.argv[1]))
from pocketgpt.model import build_model
build_model(512, cfg)  # a model built, as 02's describe cell does
pg.launch(pg.run_pretrain_stage, cfg)
'''


def test_an_interrupted_launch_leaves_no_process_alive(tokenizer_stage, tmp_path):
    """The stop button (SIGINT: KeyboardInterrupt in the kernel) during the launch: every worker is gone
    within seconds, checked by pid."""
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(tokenizer_dir=str(tokenizer_stage), run_dir=str(tmp_path), precision="fp32", processes=2,
                  max_steps=100_000, log_interval=50, max_hours=1)
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED, json.dumps(params)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1"})
    output = []  # read as a notebook reads its kernel: all along
    reader = threading.Thread(target=lambda: output.extend(kernel.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not (tmp_path / "pretrain.partial" / "log.csv").exists():
        assert time.time() < deadline and kernel.poll() is None, "".join(output)
        time.sleep(0.2)
    children = descendants(kernel.pid)
    assert len(workers(kernel.pid)) == 2
    interrupted = time.time()
    kernel.send_signal(signal.SIGINT)
    try:
        kernel.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kernel.kill()
        reader.join(10)
        raise AssertionError(f"the kernel lived on 120 s after the interrupt; it said:\n{''.join(output)[-3000:]}")
    reader.join(10)
    assert "KeyboardInterrupt" in "".join(output)
    left = [pid for pid in children if alive(pid)]
    assert not left and time.time() - interrupted < 30, (left, time.time() - interrupted)


def test_processes_that_cannot_start_together_leave_the_session_on_one(tokenizer_stage, tmp_path, monkeypatch, capsys):
    """The process group fails to start (here gloo told to use a network interface that does not exist; on
    Kaggle, NCCL): one paragraph says what failed and what to try, and the session trains on one process
    instead of being lost."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")  # the workers inherit it; this process has no group
    out = pg.launch(pg.run_pretrain_stage, pretrain_cfg(tokenizer_stage, tmp_path, max_steps=6))
    said = capsys.readouterr().out
    assert "Starting 2 processes failed before their first step together: process " in said
    assert "NCCL_P2P_DISABLE=1" in said and "This session continues on one process." in said
    m = pg.read_json(out / "metrics.json")
    assert m["finished"] and m["processes"] == 1


def test_the_launcher_hears_its_workers_in_files_not_in_the_words_they_print(tokenizer_stage, tmp_path, monkeypatch,
                                                                              capsys):
    """Whether the processes had started together is told by a file rank 0 writes, not read off its output: a run
    whose folder's name holds the words of that message ("processes train together", printed in the resume
    line before the process group starts) still counts as a start-up failure when the group cannot start, so
    the session goes on on one process; and the stage's "done: " line is the launcher's to say."""
    first = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "first", max_steps=4, processes=None))
    earlier = tmp_path / "2 processes train together" / "pretrain"
    shutil.copytree(first, earlier)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")
    out = pg.launch(pg.run_pretrain_stage, pretrain_cfg(tokenizer_stage, tmp_path / "second", max_steps=6,
                                                        resume_from=str(earlier)))
    said = capsys.readouterr().out
    assert f"resuming {earlier}" in said and "This session continues on one process." in said
    m = pg.read_json(out / "metrics.json")
    assert m["finished"] and m["processes"] == 1 and m["steps"] == 6


def test_02s_text_says_how_pg_launch_starts_its_processes():
    """pg.launch starts torchrun as the kernel's child (fresh processes); notebook_launcher (a fork) is gone."""
    text = "".join(c.source for c in nbformat.read(str(HERE / "notebooks" / "02_pretrain.ipynb"), as_version=4).cells
                   if c.cell_type == "markdown")
    assert "notebook_launcher" not in text and "torchrun" in text and "never a fork" in text
