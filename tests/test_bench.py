"""The benchmark: one JSON line of the training step's speed, and on a GPU its peak memory against a T4's."""
import json

import torch

import pocketgpt_utils as pg
from pocketgpt.bench import t4_memory


def test_bench_prints_one_json_line_of_speed_memory_and_the_reference(capsys):
    argv = ["bench", "--profile", "demo", "--reference", "--steps", "2", "--warmup", "1",
            "-p", "precision", "fp32", "-p", "compile", "False", "-p", "n_layer", "2"]
    assert pg.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens_per_s"] > 0 and out["reference"]["tokens_per_s"] > 0 and out["ratio"] > 0
    assert out["batch"] == [16, 128] and out["precision"] == "fp32" and out["compiled"] is False
    if torch.cuda.is_available():
        assert out["peak_memory_gib"] > 0 and out["fits_t4"] is True  # the demo model is tiny
    else:
        assert (out["peak_memory_gib"], out["fits_t4"], out["t4_memory"]) == (None, None, "not measured: no GPU here")


def test_the_t4_verdict_weighs_what_the_allocator_reserved_against_what_a_t4_leaves(monkeypatch):
    cfg = pg.make_config(pg.PretrainConfig, "t4", run_dir="/tmp/unused")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 8.0 * 2 ** 30)
    for reserved, fits in [(9.5, True), (14.5, False)]:
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device, r=reserved: r * 2 ** 30)
        m = t4_memory(torch.device("cuda"), cfg)
        assert (m["fits_t4"], m["peak_memory_gib"], m["peak_reserved_gib"]) == (fits, 8.0, reserved)
        assert m["t4_memory"].startswith(f"batch_size=32 x 384 tokens: {reserved:.1f} GiB reserved")
        assert m["t4_memory"].endswith("fits") if fits else "lower batch_size (now 32)" in m["t4_memory"]
