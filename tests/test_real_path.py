"""The path Kaggle users take: budget-limited sessions in a row, two processes, a crash anywhere.

Nothing here fakes the condition it guards: budgets stop on the real clock, two processes are two
torchrun processes on gloo, and a crash is a kill -9 of the stage's process group.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.batches import DialogBatches, TokenWindows
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.common import HERE
from pocketgpt.sft import prepare_sft_data
from pocketgpt.train import read_log

BUDGET_H = 6 / 3600  # a 6-second session


def stage_cmd(stage: str, nproc: int, params: dict) -> list[str]:
    """What a user types: `python pocketgpt_utils.py stage ...`, under torchrun for several processes."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    args = [a for k, v in params.items() for a in ("-p", k, str(v))]
    return [*launcher, str(HERE / "pocketgpt_utils.py"), "stage", stage, "--profile", "demo", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def run_stage(stage: str, nproc: int, params: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_cmd(stage, nproc, params), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def pretrain_params(tokenizer_stage, run_dir, **kw) -> dict:
    params = {k: TINY[k] for k in ["n_layer", "n_head", "n_embd", "n_positions", "batch_size", "warmup_steps"]}
    params.update(tokenizer_dir=tokenizer_stage, run_dir=run_dir, precision="fp32", log_interval=20,
                  eval_interval=200, eval_windows=16, checkpoint_minutes=60, max_steps=100_000)
    params.update(kw)
    return params


def windows_consumed(ckpt: dict, n_windows: int) -> int:
    return ckpt["data"]["epoch"] * n_windows + ckpt["data"]["index"]


def test_three_budget_limited_sessions_in_a_row_each_make_progress(tokenizer_stage, tmp_path):
    """Kaggle's 12-hour sessions, shrunk to 6 seconds: each session stops itself on the clock and the
    next one, given the same budget, carries on as far again (the budget is per session)."""
    params = pretrain_params(tokenizer_stage, tmp_path, max_hours=BUDGET_H, resume_from="auto")
    params = {k: v for k, v in params.items() if k not in ("tokenizer_dir", "run_dir")}
    cfg = lambda: pg.make_config(pg.PretrainConfig, "demo", tokenizer_dir=str(tokenizer_stage),  # noqa: E731
                                 run_dir=str(tmp_path), **params)
    steps, walls = [0], []
    for session in range(3):
        started = time.time()
        out = pg.run_pretrain_stage(cfg())
        walls.append(time.time() - started)
        m = pg.read_json(out / "metrics.json")
        assert m["stop_reason"] == "time_budget" and not m["finished"], m
        steps.append(m["steps"])
    made = np.diff(steps)
    # each session trains for most of its budget at the speed it measured itself (a busy machine is slower,
    # and then every session is): the start-up and the end's reserve take the rest
    rows = read_log(tmp_path / "pretrain" / "log.csv")
    tokens_per_step = TINY["batch_size"] * TINY["n_positions"]
    for session, (first, last) in enumerate(zip(steps, steps[1:])):
        rates = [r["tokens_per_s"] for r in rows if first < r["step"] <= last and r["tokens_per_s"]]
        steps_per_s = np.median(rates) / tokens_per_step
        assert made[session] >= 0.3 * steps_per_s * BUDGET_H * 3600, (session, made.tolist(), steps_per_s)
    assert all(w < BUDGET_H * 3600 + 3 for w in walls), f"session wall times {walls} for a 6 s budget"
    m = pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert m["hours"] == pytest.approx(sum(walls) / 3600, rel=0.25)  # the total is kept, for the report
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # each session's rows once


def test_two_processes_stop_on_the_clock_and_resume_on_two_and_then_on_one(tokenizer_stage, tmp_path):
    """T4 x2 stood in for by 2 CPU processes on gloo: a budget stop, a resume on 2 processes, then a
    resume on 1 (a checkpoint from 2 GPUs continued on 1 GPU or a CPU)."""
    params = pretrain_params(tokenizer_stage, tmp_path, max_hours=BUDGET_H, resume_from="auto")
    n_windows = TokenWindows(tokenizer_stage / "train.bin", TINY["n_positions"], 1, 0, TINY["vocab_size"]).n
    steps = [0]
    for session, nproc in enumerate([2, 2, 1]):
        proc = run_stage("pretrain", nproc, params)
        m = pg.read_json(tmp_path / "pretrain" / "metrics.json")
        steps.append(m["steps"])
        assert steps[-1] - steps[-2] > 5, f"session {session + 1} on {nproc} process(es) made {np.diff(steps)} steps"
        assert m["processes"] == nproc and m["stop_reason"] == "time_budget", m
        ckpt = load_checkpoint(tmp_path / "pretrain")
        # the data position is exact whatever the process count: every window trained once, in order
        assert windows_consumed(ckpt, n_windows) * TINY["n_positions"] == ckpt["state"]["tokens"] + ckpt["state"]["window"]["tokens"]
        assert len(ckpt["rng"]) == nproc  # each process's random stream is kept
    assert ("the checkpoint was written by 2 process(es) and this run has 1: the data position carries over; the "
            "first 1 process(es) keep their random streams (dropout), the other 1 are not used") in proc.stdout
    rows = read_log(tmp_path / "pretrain" / "log.csv")  # one header, each step once: only rank 0 writes
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    assert (tmp_path / "pretrain" / "log.csv").read_text().count("step,tokens") == 1
    pg.plot_losses({"pretrain": tmp_path / "pretrain" / "log.csv"}, show=False)


def wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the stage ended before the kill: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.05)


def kill_after_a_checkpoint(params: dict, partial, rng: random.Random, after_mtime: float = 0.0,
                            within: float = 2.5) -> dict:
    """Start the stage, wait for a checkpoint newer than `after_mtime` in `partial`, then kill -9 it at a
    random moment up to `within` seconds later; returns what the crash left: the checkpoint's step and how old it
    was at the kill."""
    proc = start_stage("pretrain", params)
    ckpt = partial / "ckpt.pt"
    wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime > after_mtime, 120, proc)
    time.sleep(rng.uniform(0.2, within))
    age = time.time() - ckpt.stat().st_mtime
    out = kill_group(proc)
    return {"age": age, "step": torch.load(ckpt, weights_only=False)["state"]["step"], "mtime": ckpt.stat().st_mtime,
            "output": out}


def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(tokenizer_stage, tmp_path):
    """A session dies (kill -9) twice, once right after resuming from the .partial it left; each rerun
    with resume_from='auto' continues from the newest checkpoint, losing at most one checkpoint
    interval, and the run ends where an uninterrupted one ends."""
    interval_min = 0.02  # a checkpoint every 1.2 s
    common = dict(max_steps=1500, log_interval=100, eval_interval=500, checkpoint_minutes=interval_min)
    ref = pretrain_params(tokenizer_stage, tmp_path / "ref", **common)
    run_stage("pretrain", 1, ref)
    reference = pg.read_json(tmp_path / "ref" / "pretrain" / "metrics.json")

    rng = random.Random()
    run = tmp_path / "run"
    partial = run / "pretrain.partial"
    # session 1 ends on its budget: a finished folder with a checkpoint
    run_stage("pretrain", 1, pretrain_params(tokenizer_stage, run, max_hours=3 / 3600, **common))
    first = pg.read_json(run / "pretrain" / "metrics.json")
    assert first["stop_reason"] == "time_budget" and 0 < first["steps"] < 1500
    params = pretrain_params(tokenizer_stage, run, resume_from="auto", **common)
    # session 2 resumes from it and is killed; session 3 must prefer that newer .partial to the finished folder
    crash = kill_after_a_checkpoint(params, partial, rng)
    assert crash["step"] > first["steps"]
    assert crash["age"] < interval_min * 60 + 1.5, crash  # checkpoints keep their own cadence
    # session 3 resumes from the .partial and is killed again once it has written a checkpoint of its own
    crash2 = kill_after_a_checkpoint(params, partial, rng, after_mtime=crash["mtime"])
    assert f"resuming {partial} at step {crash['step']} " in crash2["output"]
    assert crash2["step"] > crash["step"]  # the checkpoint it resumed from was replaced by a newer one, never lost
    # session 4 finishes
    proc = run_stage("pretrain", 1, params)
    assert f"resuming {partial} at step {crash2['step']} " in proc.stdout
    final = pg.read_json(run / "pretrain" / "metrics.json")
    assert final["finished"] and final["steps"] == 1500
    assert final["final_val_loss"] == pytest.approx(reference["final_val_loss"], abs=2e-3)
    a = {r["step"]: r for r in read_log(tmp_path / "ref" / "pretrain" / "log.csv")}
    b = {r["step"]: r for r in read_log(run / "pretrain" / "log.csv")}
    assert set(a) <= set(b)  # the interrupted run logged every row the uninterrupted one did, and the same losses
    assert all(b[s]["train_loss"] == pytest.approx(a[s]["train_loss"], abs=2e-3) for s in a if a[s]["train_loss"])
    assert not partial.exists()


def test_sft_on_two_processes_trains_every_epoch_on_full_global_batches(tokenizer_stage, tmp_path, demo_data):
    """03 under torchrun with 2 processes for 2 epochs sees every training row twice."""
    pre = tmp_path / "pretrain_run"
    run_stage("pretrain", 1, pretrain_params(tokenizer_stage, pre, max_steps=20))
    params = dict(pretrain_dir=pre / "pretrain", run_dir=tmp_path, dialogs_path=demo_data / "dialogs.csv",
                  precision="fp32", batch_size=8, epochs=2, log_interval=5, eval_interval=1000)
    run_stage("sft", 2, params)
    out = tmp_path / "sft"
    m, report = pg.read_json(out / "metrics.json"), pg.read_json(out / "data_report.json")
    # the same rows, encoded as the stage encodes them
    tok = pg.load_tokenizer(pre / "pretrain" / "model")
    cfg = pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), dialogs_path=str(demo_data / "dialogs.csv"))
    rows = prepare_sft_data(cfg, tok, TINY["n_positions"])["rows"]["train"]
    assert m["tokens"] == 2 * sum(len(ids) - 1 for ids, _ in rows)  # every row twice, real tokens counted
    assert m["steps"] == 2 * -(-len(rows) // (2 * 8)) == 2 * report["steps_per_epoch"]
    assert m["processes"] == 2 and report["processes"] == 2
    batches = DialogBatches(rows, 8, cfg.seed, world=2)
    assert report["real_token_fraction"] == pytest.approx(batches.real_token_fraction())
    assert len(pg.read_json(out / "heldout.json")) == report["eval_rows"]  # written whole, once
    assert [r["step"] for r in read_log(out / "log.csv")] == sorted({r["step"] for r in read_log(out / "log.csv")})


# --- every stage, every fault: kill -9 of the process group, a finished run resumed, a budget in a phase ---------

def start_stage(stage: str, params: dict, nproc: int = 1) -> subprocess.Popen:
    """The stage in a process group of its own, as a terminal or a notebook's launcher starts it."""
    return subprocess.Popen(stage_cmd(stage, nproc, params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> str:
    """kill -9 of the whole process group (what a dying session does to it); returns what it printed."""
    assert proc.poll() is None, f"the stage ended before the kill: make it longer\n{proc.communicate()[0][-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def last_elapsed(log) -> float:
    """Seconds the training loop of a finished run took, from its log."""
    return read_log(log)[-1]["elapsed_s"]


@pytest.fixture(scope="module")
def pretrained(tokenizer_stage, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    run_stage("pretrain", 1, pretrain_params(tokenizer_stage, run, max_steps=30))
    return run / "pretrain"


def sft_params(pretrained, run, demo_data, **kw) -> dict:
    """03 with its preference phase, long enough (about 10 s of training) to be killed in either phase."""
    return {**dict(pretrain_dir=pretrained, run_dir=run, dialogs_path=demo_data / "dialogs.csv", precision="fp32",
                   batch_size=8, epochs=8, log_interval=20, eval_interval=1000, checkpoint_minutes=0.01,
                   preference="self", preference_rows=96, preference_epochs=24, preference_learning_rate=1e-3,
                   dropout=0.1), **kw}


def test_sft_killed_in_each_phase_resumes_auto_and_ends_as_an_uninterrupted_run(pretrained, demo_data, tmp_path):
    """03 with preference on dies twice (kill -9 of its process group): once in the SFT phase, once in the
    preference phase, each at a random moment after a checkpoint. Each rerun with resume_from='auto'
    continues from the .partial; the last one finishes with the uninterrupted run's numbers."""
    run_stage("sft", 1, sft_params(pretrained, tmp_path / "ref", demo_data))
    ref_dir = tmp_path / "ref" / "sft"
    reference = pg.read_json(ref_dir / "metrics.json")
    sft_s, dpo_s = last_elapsed(ref_dir / "log.csv"), last_elapsed(ref_dir / "preference" / "log.csv")
    rng, run = random.Random(), tmp_path / "run"
    partial, params = run / "sft.partial", sft_params(pretrained, run, demo_data, resume_from="auto")

    proc = start_stage("sft", params)  # 1: killed in the SFT phase
    wait_for(lambda: (partial / "ckpt.pt").exists(), 120, proc)
    time.sleep(rng.uniform(0.0, 0.4 * sft_s))
    kill_group(proc)
    assert not (partial / "sft_phase.json").exists() and not (run / "sft").exists()

    proc = start_stage("sft", params)  # 2: resumes the SFT phase, killed in the preference phase
    wait_for(lambda: (partial / "preference" / "ckpt.pt").exists(), 120, proc)
    time.sleep(rng.uniform(0.0, 0.4 * dpo_s))
    out = kill_group(proc)
    assert f"resuming {partial} at step " in out and not (run / "sft").exists()

    proc = run_stage("sft", 1, params)  # 3: resumes the preference phase and finishes
    assert f"resuming {partial} in its preference phase" in proc.stdout
    final = pg.read_json(run / "sft" / "metrics.json")
    assert final["finished"] and final["exported_model"] == "SFT + DPO" and final["preference"]["finished"]
    assert final["final_val_loss"] == pytest.approx(reference["final_val_loss"], abs=2e-3)
    assert final["preference"]["final_val_loss"] == pytest.approx(reference["preference"]["final_val_loss"], abs=2e-3)
    assert not partial.exists() and pg.read_json(run / "sft" / "manifest.json")["inputs"]["resumed_from"]
    pg.load_model(run / "sft" / "model")


def test_the_tokenizer_killed_at_a_random_moment_is_rebuilt_whole_by_a_rerun(demo_data, tmp_path):
    """01 has no checkpoint to resume: a rerun after a kill -9 starts over and writes what an uninterrupted
    run writes, byte for byte, and no .partial is left."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((demo_data / "corpus.txt").read_text() * 12)  # 3 MB: a few seconds of work
    params = dict(corpus_path=corpus, vocab_size=2048, val_fraction=0.05)
    run_stage("tokenizer", 1, {**params, "run_dir": tmp_path / "ref"})
    ref = pg.read_json(tmp_path / "ref" / "tokenizer" / "metrics.json")
    took = ref["train_seconds"] + ref["encode_seconds"]  # the stage's work, after its start-up
    run = tmp_path / "run"
    proc = start_stage("tokenizer", {**params, "run_dir": run})
    wait_for(lambda: (run / "tokenizer.partial").exists(), 60, proc)
    time.sleep(random.uniform(0.0, 0.8 * took))
    kill_group(proc)
    assert not (run / "tokenizer" / "manifest.json").exists()
    run_stage("tokenizer", 1, {**params, "run_dir": run})
    for name in ["tokenizer.json", "vocab.json", "merges.txt", "train.bin", "val.bin", "doc_stats.npz"]:
        assert (run / "tokenizer" / name).read_bytes() == (tmp_path / "ref" / "tokenizer" / name).read_bytes(), name
    timing = {"encode_seconds", "encode_mb_per_s"}
    assert ({k: v for k, v in pg.read_json(run / "tokenizer" / "meta.json").items() if k not in timing}
            == {k: v for k, v in pg.read_json(tmp_path / "ref" / "tokenizer" / "meta.json").items() if k not in timing})
    assert not (run / "tokenizer.partial").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_finished_pretraining_resumed_again_gives_the_same_complete_folder(tokenizer_stage, tmp_path, nproc):
    """A finished run attached again (Kaggle) or resumed into a new folder: nothing left to train, and the
    folder it writes is whole, with the finished run's numbers."""
    params = pretrain_params(tokenizer_stage, tmp_path, max_steps=20, eval_interval=10)
    run_stage("pretrain", nproc, params)
    done, done_log = pg.read_json(tmp_path / "pretrain" / "metrics.json"), read_log(tmp_path / "pretrain" / "log.csv")
    for again in [{"resume_from": "auto"}, {"resume_from": tmp_path / "pretrain", "out_dir": tmp_path / "again"}]:
        run_stage("pretrain", nproc, {**params, **again})
        out = Path(again.get("out_dir", tmp_path / "pretrain"))
        m = pg.read_json(out / "metrics.json")
        for k in ["steps", "tokens", "final_val_loss", "final_train_loss", "finished", "stop_reason"]:
            assert m[k] == done[k], k
        assert read_log(out / "log.csv") == done_log and [r["step"] for r in done_log] == [10, 20]
        assert (out / "loss.png").is_file() and (out / "model" / "config.json").is_file()
        assert not partial_of(out).exists()


def partial_of(out):
    return out.with_name(out.name + ".partial")


def test_a_finished_sft_with_its_preference_phase_resumed_again_keeps_its_numbers(pretrained, demo_data, tmp_path):
    params = sft_params(pretrained, tmp_path, demo_data, epochs=1, preference_epochs=1)
    run_stage("sft", 1, params)
    done = pg.read_json(tmp_path / "sft" / "metrics.json")
    run_stage("sft", 1, {**params, "resume_from": tmp_path / "sft", "out_dir": tmp_path / "again"})
    m = pg.read_json(tmp_path / "again" / "metrics.json")
    assert m["final_val_loss"] == done["final_val_loss"] is not None
    assert m["preference"]["final_val_loss"] == done["preference"]["final_val_loss"] is not None
    assert m["finished"] and m["exported_model"] == "SFT + DPO"
    assert read_log(tmp_path / "again" / "log.csv") == read_log(tmp_path / "sft" / "log.csv")
    assert not (tmp_path / "again.partial").exists()


@pytest.mark.parametrize("phase", ["sft", "preference"])
def test_a_budget_that_binds_in_either_phase_leaves_a_model_04_uses_and_a_rerun_finishes(
        tokenizer_stage, pretrained, demo_data, tmp_path, phase):
    """03 with preference on, its budget (real clock) running out in the SFT phase or in the preference
    phase: the folder holds model/ (the SFT model, said so), 04 exports it, and a rerun with
    resume_from='auto' continues where it stopped and ends with the tuned model."""
    long = dict(epochs=200) if phase == "sft" else dict(epochs=1, preference_epochs=400)
    base = dict(pretrain_dir=str(pretrained), dialogs_path=str(demo_data / "dialogs.csv"), precision="fp32",
                batch_size=8, log_interval=20, eval_interval=1000, checkpoint_minutes=60, preference="self",
                preference_rows=96, preference_learning_rate=1e-3)
    cfg = lambda **kw: pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), **{**base, **kw})  # noqa: E731
    out = pg.run_sft_stage(cfg(max_hours=8 / 3600, **long))
    m = pg.read_json(out / "metrics.json")
    assert not m["finished"] and m["exported_model"] == "SFT", m
    stopped = m["preference"] if phase == "preference" else m
    assert stopped["stop_reason"] == "time_budget" and 0 < stopped["steps"] < stopped["max_steps"]
    assert ("preference" in m) == (phase == "preference")  # the preference phase ran only after a whole SFT phase
    sft_model = pg.load_model(out / "model")  # the SFT model: 03's own next cell and 04 read it
    export = pg.run_export_stage(pg.make_config(pg.ExportConfig, "demo", run_dir=str(tmp_path), gguf_types=[],
                                                tokenizer_dir=str(tokenizer_stage), pretrain_dir=str(pretrained)))
    report = pg.read_json(export / "metrics.json")
    assert report["exported_model"] == "SFT" and set(report["quality"]) == {"pretrained", "SFT"}
    where = "" if phase == "sft" else " in the preference phase"
    said = f"stopped by its time budget at step {stopped['steps']:,} of {stopped['max_steps']:,}{where}"
    assert pg.stage_status(out).startswith(said) and "run 03_sft again with resume_from='auto'" in pg.stage_status(out)
    assert ("03_sft", pg.stage_status(out)) in pg.report_rows(report)  # the report card says so, with the way on
    assert torch.equal(pg.load_model(export / "pocketGPT").transformer.wte.weight, sft_model.transformer.wte.weight)
    # the next session, with a plan that ends soon after the stop: the rest of the interrupted phase (and, after
    # the SFT phase, the whole preference phase)
    if phase == "sft":
        rest = dict(epochs=200, max_steps=stopped["steps"] + 20, preference_epochs=1)
    else:
        per_epoch = -(-stopped["train_pairs"] // 8)
        rest = dict(epochs=1, preference_epochs=(stopped["steps"] + 24) / per_epoch)
    again = pg.run_sft_stage(cfg(resume_from="auto", max_hours=1, **rest))
    m2 = pg.read_json(again / "metrics.json")
    assert m2["finished"] and m2["exported_model"] == "SFT + DPO", m2
    rows = read_log(again / ("preference/log.csv" if phase == "preference" else "log.csv"))
    assert rows[0]["step"] < stopped["steps"] < rows[-1]["step"]  # the earlier rows kept, the run continued


def test_a_session_that_slows_down_after_planning_still_ends_decayed(tokenizer_stage, tmp_path):
    """T4s drop their clocks under load; here the run stalls and the machine gets busy (CPU hogs) right after the
    plan is made, with no log row for the loop to notice it at. The run shortens its plan as it goes and still ends on its
    own last, decayed step inside the budget, not cut off on the budget in the middle of its plateau."""
    budget_s = 24
    params = pretrain_params(tokenizer_stage, tmp_path, max_steps="auto", max_hours=budget_s / 3600,
                             log_interval=100_000, eval_interval=100_000, warmup_steps=10, max_epochs=1000)
    proc = start_stage("pretrain", params)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("plan (max_steps='auto')"):
            break
    # the slowdown: a 4 s stall (the process stopped, as a VM or a throttled GPU stalls), then CPU hogs; the stall
    # makes it certain even where the machine was already busy when the plan was made
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(4)
    os.killpg(proc.pid, signal.SIGCONT)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * os.cpu_count())]
    try:
        out = "".join(lines) + proc.communicate(timeout=300)[0]
    finally:
        for hog in hogs:
            hog.kill()
    assert proc.returncode == 0, out[-3000:]
    m, rows = pg.read_json(tmp_path / "pretrain" / "metrics.json"), read_log(tmp_path / "pretrain" / "log.csv")
    first_plan = int(re.search(r"plan \(max_steps='auto'\): ([\d,]+) steps", out)[1].replace(",", ""))
    assert m["max_steps"] < first_plan, out[-3000:]  # the plan shrank as the steps slowed
    assert m["stop_reason"] == "max_steps" and m["finished"] and m["steps"] == m["max_steps"], m
    assert rows[-1]["step"] == m["steps"] and rows[-1]["lr"] == pytest.approx(pg.PROFILES["demo"]["pretrain"]["min_lr"])
    assert m["session_hours"] * 3600 < budget_s


def test_the_export_killed_at_a_random_moment_is_redone_whole_by_a_rerun(tokenizer_stage, pretrained, demo_data,
                                                                         tmp_path):
    """04 has no checkpoint: killed (kill -9 of its process group) anywhere in its minute of work, a rerun
    measures and writes what an uninterrupted export does, and no .partial is left."""
    run_stage("sft", 1, dict(pretrain_dir=pretrained, run_dir=tmp_path, dialogs_path=demo_data / "dialogs.csv",
                             precision="fp32", batch_size=8, max_steps=20))
    params = lambda out: dict(tokenizer_dir=tokenizer_stage, pretrain_dir=pretrained, sft_dir=tmp_path / "sft",  # noqa: E731
                              run_dir=tmp_path, out_dir=out, gguf_types=["f16"])
    started = time.time()
    run_stage("export", 1, params(tmp_path / "ref"))
    took = time.time() - started
    proc = start_stage("export", params(tmp_path / "export"))
    wait_for(lambda: (tmp_path / "export.partial").exists(), 120, proc)  # its work has begun
    time.sleep(random.uniform(0.0, 0.5 * took))
    kill_group(proc)
    assert not (tmp_path / "export" / "manifest.json").exists()
    run_stage("export", 1, params(tmp_path / "export"))
    ref, again = (pg.read_json(tmp_path / d / "metrics.json") for d in ("ref", "export"))
    for k in ["pretrain_val_loss", "sft_val_loss", "pretrain_response_loss", "sft_response_loss", "quality", "status"]:
        assert again[k] == ref[k], k
    assert (tmp_path / "export" / "pocketGPT.zip").read_bytes()[:4] == b"PK\x03\x04"
    assert not (tmp_path / "export.partial").exists()
