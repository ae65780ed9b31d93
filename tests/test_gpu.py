"""The GPU paths on a real GPU; every test here is skipped where CUDA is absent.

02 and 03 through the same train() the notebooks use, in fp16 + GradScaler (forced, as a T4 runs) and
in bf16, eager and compiled; a stop on the real clock and a resume; a GPU-trained model exported and
run by the seed's code on the CPU; pg.launch with the GPUs present; a batch too large for the GPU.
Under 5 minutes on one GPU. tests/gpu_check.sh runs this file with the benchmarks; with
POCKETGPT_GPU_FIGURES=PATH the figures measured here (03's compiled graphs) are written there as JSON.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from test_export import SEED_CODE
from test_pretrain import pretrain_cfg
from test_sft import sft_cfg

import pocketgpt_utils as pg
from pocketgpt.batches import TokenWindows
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.common import HERE
from pocketgpt.device import peak_for_name
from pocketgpt.train import read_log

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

NATIVE_BF16 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
FIGURES = {}  # what gpu_check.sh collects


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield FIGURES
    if os.environ.get("POCKETGPT_GPU_FIGURES"):
        Path(os.environ["POCKETGPT_GPU_FIGURES"]).write_text(json.dumps(FIGURES, indent=1))


def val_losses(stage_dir) -> list[float]:
    return [r["val_loss"] for r in read_log(stage_dir / "log.csv") if r["val_loss"] is not None]


def compiled_graphs() -> int:
    """Graphs torch.compile has built since the last torch._dynamo.reset(): the first, then one per recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset_compiler() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # the recompile limit counts per function: 02's graphs must not count against 03's
    counters.clear()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_02_and_03_train_on_the_gpu(tokenizer_stage, demo_data, tmp_path, precision, compiled):
    """fp16 is forced even where bf16 is native: it is what a T4 runs, GradScaler and all."""
    if precision == "bf16" and not NATIVE_BF16:
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16 (compute capability < 8.0)")
    kw = dict(precision=precision, compile=compiled)
    reset_compiler()
    pre = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=40, **kw))
    m = pg.read_json(pre / "metrics.json")
    assert (m["precision"], m["compiled"], m["finished"]) == (precision, compiled, True)
    assert torch.cuda.get_device_name(0) in m["device"]
    assert (m["mfu"] is None) == (peak_for_name(torch.cuda.get_device_name(0), precision) is None)
    vals = val_losses(pre)
    assert vals[-1] < vals[0] - 0.2, vals
    ckpt = load_checkpoint(pre)
    if precision == "fp16":  # the scaler is checkpointed; it halves once per skipped step (grows after 2000)
        assert m["skipped_steps"] < 10 and 2.0 ** 16 / ckpt["scaler"]["scale"] == 2 ** m["skipped_steps"]
    else:
        assert ckpt["scaler"] is None and m["skipped_steps"] == 0
    assert ckpt["rng"][0]["cuda"] is not None
    assert pg.load_model(pre / "model").dtype == torch.float32

    reset_compiler()
    sft = pg.run_sft_stage(sft_cfg(pre, tmp_path / "s", demo_data / "dialogs.csv", max_steps=30, eval_interval=10,
                                   learning_rate=1e-3, **kw))
    m = pg.read_json(sft / "metrics.json")
    assert (m["precision"], m["compiled"], m["finished"]) == (precision, compiled, True)
    vals = val_losses(sft)
    assert vals[-1] < vals[0], vals
    if compiled:  # rows of every length: compiled for dynamic shapes, a train graph and an eval graph
        graphs = compiled_graphs()
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        FIGURES.setdefault("sft_compiled_graphs", {})[precision] = graphs
        FIGURES.setdefault("sft_recompiles", {})[precision] = graphs - 1
        FIGURES["recompile_limit"] = limit
        assert graphs <= 4 < limit, f"03 compiled {graphs} graphs (limit {limit})"  # 4: + a batch of 1 row each


def test_a_stop_on_the_clock_resumes_on_the_gpu(tokenizer_stage, tmp_path, capsys):
    """Kaggle's 12-hour session, shrunk to 8 s, in fp16: stop on the real clock, resume where it stopped
    (GradScaler, the CUDA random stream and the data position carried over), stop on the clock again."""
    kw = dict(precision="fp16", compile=False, max_steps=100_000, max_hours=8 / 3600, resume_from="auto",
              log_interval=20, eval_interval=200, eval_windows=16, dropout=0.1)
    n_windows = TokenWindows(tokenizer_stage / "train.bin", TINY["n_positions"], 1, 0, TINY["vocab_size"]).n
    steps = [0]
    for session in range(2):
        out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, **kw))
        m = pg.read_json(out / "metrics.json")
        assert m["stop_reason"] == "time_budget" and not m["finished"], m
        assert m["session_hours"] * 3600 < 8 + 3, m["session_hours"]
        steps.append(m["steps"])
        assert steps[-1] - steps[-2] > 20, f"session {session + 1} made {steps[-1] - steps[-2]} steps"
        ckpt = load_checkpoint(out)
        consumed = ckpt["data"]["epoch"] * n_windows + ckpt["data"]["index"]
        assert consumed * TINY["n_positions"] == ckpt["state"]["tokens"] + ckpt["state"]["window"]["tokens"]  # every window once
        assert ckpt["scaler"] is not None and ckpt["rng"][0]["cuda"] is not None
    assert "differ in CPU/GPU" not in capsys.readouterr().out  # the GPU random stream was restored
    rows = read_log(tmp_path / "pretrain" / "log.csv")
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})


def test_a_resumed_gpu_run_matches_the_uninterrupted_one(tokenizer_stage, tmp_path):
    """Dropout draws from the CUDA random stream: a resume must restore it (as on the CPU, to kernel noise)."""
    precision = "bf16" if NATIVE_BF16 else "fp16"
    kw = dict(max_steps=16, log_interval=2, eval_interval=4, dropout=0.1, precision=precision, compile=False)
    full = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "a", **kw))
    part = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", **kw), stop_at_step=7)
    resumed = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", resume_from=str(part), **kw))
    a = {r["step"]: r["train_loss"] for r in read_log(full / "log.csv") if r["train_loss"] is not None}
    b = {r["step"]: r["train_loss"] for r in read_log(resumed / "log.csv")
         if r["train_loss"] is not None and r["step"] != 7}
    assert sorted(b) == sorted(a)
    for step, loss in b.items():
        assert loss == pytest.approx(a[step], abs=2e-3), step


def test_a_gpu_trained_model_exports_and_the_seeds_code_runs_it_on_the_cpu(tokenizer_stage, demo_data, tmp_path):
    kw = dict(precision="auto", compile=False)  # compiling is tested above
    pre = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=40, **kw))
    sft = pg.run_sft_stage(sft_cfg(pre, tmp_path, demo_data / "dialogs.csv", max_steps=20, **kw))
    assert "fp32" not in {pg.read_json(d / "metrics.json")["precision"] for d in (pre, sft)}  # mixed precision
    pg.run_export_stage(pg.make_config(pg.ExportConfig, "demo", run_dir=str(tmp_path), pretrain_dir=str(pre),
                                       tokenizer_dir=str(tokenizer_stage), sft_dir=str(sft), gguf_types=[]))
    folder = tmp_path / "export" / "pocketGPT"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # the user's machine: no GPU
    out = subprocess.run([sys.executable, "-c", SEED_CODE, str(folder)], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    assert eval(out[-2]).startswith("Instruction: What does torch.nn.LayerNorm do?\nResponse:")
    assert out[-1] == f"{TINY['vocab_size']} {TINY['vocab_size']} torch.float32"
    model = pg.load_model(folder)  # the same weights give the same logits on the CPU and on the GPU
    ids = torch.randint(4, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3), (cpu - gpu).abs().max()


LAUNCH_CELLS = r'''
import json, sys
import ipykernel  # noqa: F401  (a notebook's kernel)
import torch
import pocketgpt_utils as pg
cfg = pg.make_config(pg.PretrainConfig, "demo", **json.loads(sys.argv[1]))
pg.describe_pretrain(cfg)  # the cell before the launch, as in 02
torch.zeros(1).cuda()  # what the image, an import or an earlier cell may do: the fork of notebook_launcher failed here
assert torch.cuda.is_initialized()
pg.launch(pg.run_pretrain_stage, cfg)
'''


def test_launch_from_a_kernel_that_has_initialised_cuda_trains_on_every_gpu(tokenizer_stage, tmp_path):
    """02's cells in a fresh process with a notebook's kernel loaded and CUDA already initialised (Kaggle's
    "Cannot re-initialize CUDA in forked subprocess"): pg.launch starts fresh processes, one per GPU."""
    pytest.importorskip("ipykernel")
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(tokenizer_dir=str(tokenizer_stage), run_dir=str(tmp_path), max_steps=20, eval_windows=16,
                  compile=False)  # compiling is tested above; here the launch
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-c", LAUNCH_CELLS, json.dumps(params)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert m["finished"] and m["processes"] == torch.cuda.device_count()
    assert torch.cuda.get_device_name(0) in m["device"] and "fork" not in proc.stdout + proc.stderr


def test_a_batch_too_large_for_the_gpu_is_fitted_before_the_first_step(tokenizer_stage, tmp_path, capsys):
    """A real out-of-memory: the GPU is capped at 2 GiB for this process and the batch needs far more. The stage
    halves the micro-batch (doubling the accumulation) until it fits, says so in one line, and trains."""
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2 ** 30 / torch.cuda.get_device_properties(0).total_memory))
    try:
        out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, batch_size=32768, grad_accum_steps=1,
                                                 max_steps=2, eval_windows=16, precision="auto", compile=False))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    m = pg.read_json(out / "metrics.json")
    assert m["finished"] and m["micro_batch"] < 32768 and m["micro_batch"] * m["grad_accum_steps"] == 32768
    assert f"training with micro-batch {m['micro_batch']} and grad_accum_steps {m['grad_accum_steps']}" in \
        capsys.readouterr().out
