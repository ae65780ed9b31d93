"""Shared fixtures: a tiny slice of the demo data and a tokenizer stage built from it, once per session."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"       # nothing may come from a hub
os.environ.setdefault("TQDM_DISABLE", "1")
# one torch thread in this process and every one it starts: on a busy machine (CI shares its 2 cores) two
# OpenMP threads wait on each other for whole time slices, and a 10 ms step was measured taking 2 s
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

import pocketgpt_utils as pg  # noqa: E402

# A model small enough that every stage runs in seconds on 2 CPU cores.
TINY = dict(vocab_size=512, n_layer=2, n_head=2, n_embd=32, n_positions=64, batch_size=8,
            max_steps=30, warmup_steps=5, log_interval=5, eval_interval=10)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    pg.make_demo_data(out, max_bytes=250_000, max_dialogs=800)
    return out


@pytest.fixture(scope="session")
def tokenizer_stage(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(run), corpus_path=str(demo_data / "corpus.txt"),
                         vocab_size=TINY["vocab_size"], val_fraction=0.05)
    return pg.build_tokenizer_stage(cfg)
