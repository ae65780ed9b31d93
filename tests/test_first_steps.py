"""The first minutes of a session: a compile that fails, a micro-batch that does not fit, a plan made after both.

Each condition is real: a C++ compiler that fails (CC/CXX=/bin/false, as on an image without a working
toolchain), an allocation limit (RLIMIT_AS) in a child process, torch.compile with a working compiler.
"""
import os
import subprocess

import pytest
from test_real_path import ENV, pretrain_params, stage_cmd

import pocketgpt_utils as pg
from pocketgpt.device import CPU_COMPILE_MIN_HOURS

BROKEN_COMPILER = {"CC": "/bin/false", "CXX": "/bin/false"}  # inductor finds no working C++ compiler


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
