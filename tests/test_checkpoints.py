"""Checkpoints load as data: someone else's file never runs here, whichever way a resume finds it; a file that
is not a pocketGPT checkpoint is refused in one message; a checkpoint of the code before that still resumes."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt import checkpoint
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.common import HERE, now_iso
from pocketgpt.model import build_model
from pocketgpt.stages import resolve_resume
from pocketgpt.train import read_log

FIXTURES = HERE / "tests" / "fixtures"
OLD = FIXTURES / "pretrain_7b6d54f"  # a stopped run of the code before checkpoints held plain types (README there)


class Payload:
    """What a crafted pickle asks for: os.system, which would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(folder, marker) -> None:
    """A ckpt.pt with every key a pocketGPT checkpoint has, whose unpickling would run a command."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optimizer": [], "data": {}, "rng": [], "config": Payload(marker)}, folder / "ckpt.pt")


def stage_manifest(folder, stage: str) -> None:
    """What a finished stage's folder holds beside its files (a stranger can write one as easily)."""
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "finished_at": now_iso()}))


def pretrain_cfg(tokenizer_dir, run_dir, **kw):
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(tokenizer_dir=None if tokenizer_dir is None else str(tokenizer_dir), precision="fp32",
                  max_hours=1, checkpoint_minutes=60, **kw)
    return pg.make_config(pg.PretrainConfig, "demo", **({"run_dir": str(run_dir)} if run_dir else {}), **params)


def assert_refused(message: str, path) -> None:
    assert "\n" not in message and f"{path} was not loaded (nothing in it was run)" in message, message
    assert "asks for posix.system" in message and "point resume_from at" in message, message


def test_a_crafted_ckpt_given_as_resume_from_runs_nothing_and_the_stage_stops_in_one_line(tokenizer_stage, tmp_path):
    """The command line a user types, with a stranger's folder as resume_from."""
    marker, folder = tmp_path / "PWNED", tmp_path / "theirs" / "pretrain"
    crafted_checkpoint(folder, marker)
    cmd = [sys.executable, str(HERE / "pocketgpt_utils.py"), "stage", "pretrain", "--profile", "demo",
           "-p", "tokenizer_dir", str(tokenizer_stage), "-p", "run_dir", str(tmp_path / "run"),
           "-p", "resume_from", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert not marker.exists()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert_refused(lines[0], folder / "ckpt.pt")


def test_a_crafted_ckpt_that_resume_auto_finds_runs_nothing(tokenizer_stage, tmp_path):
    marker, partial = tmp_path / "PWNED", tmp_path / "pretrain.partial"
    crafted_checkpoint(partial, marker)
    with pytest.raises(pg.PocketGPTError) as e:
        pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, resume_from="auto"))
    assert not marker.exists()
    assert_refused(str(e.value), partial / "ckpt.pt")


def test_a_crafted_ckpt_in_an_attached_kaggle_input_runs_nothing(tokenizer_stage, tmp_path, monkeypatch):
    """On Kaggle, resume_from=None searches the attached inputs for a finished pretrain folder: a stranger's
    dataset with a manifest and a crafted ckpt.pt is found, and refused."""
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("POCKETGPT_KAGGLE_ROOT", str(tmp_path))
    (tmp_path / "working").mkdir()
    shutil.copytree(tokenizer_stage, tmp_path / "input" / "notebooks" / "me" / "pocketgpt-01-tokenizer" / "tokenizer")
    theirs, marker = tmp_path / "input" / "datasets" / "stranger" / "pretrained-pocketgpt" / "pretrain", tmp_path / "PWNED"
    crafted_checkpoint(theirs, marker)
    stage_manifest(theirs, "pretrain")
    with pytest.raises(pg.PocketGPTError) as e:
        pg.run_pretrain_stage(pretrain_cfg(None, None))
    assert not marker.exists()
    assert_refused(str(e.value), theirs / "ckpt.pt")


def real_checkpoint(tmp_path):
    """A small genuine checkpoint, its model and its path."""
    model = build_model(TINY["vocab_size"], pretrain_cfg(None, tmp_path))
    path = tmp_path / "real" / "ckpt.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": [], "data": {"epoch": 0, "index": 0}, "rng": [],
                "config": {}}, path)
    return model, path


@pytest.mark.parametrize("kind", ["bare pickle", "bare pickle 4", "state_dict", "other dict", "list", "truncated",
                                  "empty"])
def test_a_file_that_is_not_a_pocketgpt_checkpoint_is_refused_in_one_message(tmp_path, kind):
    model, real = real_checkpoint(tmp_path)
    folder, marker = tmp_path / "x", tmp_path / "PWNED"
    folder.mkdir()
    path = folder / "ckpt.pt"
    if kind.startswith("bare pickle"):  # not torch.save's zip: a pickle as pickle.dump writes one
        path.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=4 if kind.endswith("4") else 2))
    elif kind == "state_dict":  # another tool's file: the weights alone
        torch.save(model.state_dict(), path)
    elif kind == "other dict":
        torch.save({"epoch": 3, "weights": torch.zeros(2)}, path)
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "truncated":  # a copy cut short
        path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    why = {"bare pickle": "it asks for posix.system when read, and a checkpoint holds only data",
           "bare pickle 4": "it is not a PyTorch file that holds only data (torch: ", "state_dict": f"a dict of {len(model.state_dict())} entries",
           "other dict": "a dict of 2 entries (epoch, weights), not a pocketGPT checkpoint (no model, optimizer",
           "list": "holds a list, not a pocketGPT checkpoint", "truncated": "may be truncated",
           "empty": "may be truncated"}[kind]
    with pytest.raises(pg.PocketGPTError) as e:
        load_checkpoint(folder)
    message = str(e.value)
    assert "\n" not in message and f"{path} was not loaded (nothing in it was run): " in message, message
    assert why in message and "point resume_from at" in message, message
    assert not marker.exists()
    assert load_checkpoint(real.parent)["data"] == {"epoch": 0, "index": 0}  # the genuine one loads


def test_auto_and_the_kaggle_search_take_a_ckpt_only_from_a_folder_whose_manifest_names_the_stage(tmp_path,
                                                                                                  monkeypatch):
    out = tmp_path / "working" / "pretrain"
    out.mkdir(parents=True)
    (out / "ckpt.pt").write_bytes(b"anything")
    assert resolve_resume("auto", "pretrain", out) is None  # no manifest: not ours
    stage_manifest(out, "sft")
    assert resolve_resume("auto", "pretrain", out) is None  # another stage's folder
    stage_manifest(out, "pretrain")
    assert resolve_resume("auto", "pretrain", out) == out
    partial = tmp_path / "working" / "pretrain.partial"  # what stage_output left: a run stopped before its end
    partial.mkdir()
    (partial / "ckpt.pt").write_bytes(b"newer")
    os.utime(out / "ckpt.pt", (1, 1))
    assert resolve_resume("auto", "pretrain", out) == partial
    shutil.rmtree(partial)
    (out / "manifest.json").unlink()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("POCKETGPT_KAGGLE_ROOT", str(tmp_path))
    inputs = tmp_path / "input" / "datasets" / "someone" / "ckpts"
    for name in ["pretrain", "pretrain.partial"]:  # a ckpt.pt without a manifest, or in a .partial, attached
        (inputs / name).mkdir(parents=True)
        (inputs / name / "ckpt.pt").write_bytes(b"x")
    assert resolve_resume(None, "pretrain", out) is None
    stage_manifest(inputs / "pretrain", "pretrain")
    assert resolve_resume(None, "pretrain", out) == inputs / "pretrain"


def test_a_checkpoint_written_before_this_change_resumes_exactly(tmp_path):
    """The fixture is a run of 7b6d54f stopped at step 7 of 16 (its numpy random state is an array, which
    the safe loader is allowed to build and nothing else of numpy): resumed now, the run logs what an
    uninterrupted run logs. A checkpoint written now loads with weights_only=True and no allowance at all.
    fp32 AdamW, so the fixture's first steps and this machine's agree whatever the CPU (no bf16 Newton-Schulz)."""
    kw = dict(max_steps=16, log_interval=2, eval_interval=4, dropout=0.1, n_layer=1, n_head=2, n_embd=16,
              n_positions=32, batch_size=4, eval_windows=16, warmup_steps=3, optimizer="adamw", schedule="cosine")
    tok = tmp_path / "tokenizer"
    shutil.copytree(OLD / "tokenizer", tok)
    old = torch.load(OLD / "pretrain" / "ckpt.pt", map_location="cpu", weights_only=False)  # our fixture: trusted
    assert isinstance(old["rng"][0]["numpy"][1], np.ndarray) and old["state"]["step"] == 7
    checkpoint.set_numpy_state(load_checkpoint(OLD / "pretrain")["rng"][0]["numpy"])  # the safe loader's copy of that stream
    assert np.array_equal(np.random.get_state()[1], old["rng"][0]["numpy"][1])
    saved = checkpoint.rng_state(torch.device("cpu"))["numpy"]  # and the plain form of today's checkpoints goes round
    draws = np.random.random(3)
    checkpoint.set_numpy_state(saved)
    assert np.array_equal(np.random.random(3), draws)
    full = pg.run_pretrain_stage(pretrain_cfg(tok, tmp_path / "a", **kw))
    resumed = pg.run_pretrain_stage(pretrain_cfg(tok, tmp_path / "b", resume_from=str(OLD / "pretrain"), **kw))
    a = {r["step"]: r for r in read_log(full / "log.csv")}
    b = {r["step"]: r for r in read_log(resumed / "log.csv") if r["train_loss"] is not None and r["step"] != 7}
    assert sorted(b) == sorted(k for k in a if a[k]["train_loss"] is not None)
    for step, row in b.items():
        assert row["train_loss"] == pytest.approx(a[step]["train_loss"], abs=2e-4), step
    assert pg.read_json(resumed / "metrics.json")["final_val_loss"] == pytest.approx(
        pg.read_json(full / "metrics.json")["final_val_loss"], abs=2e-4)
    new = torch.load(resumed / "ckpt.pt", map_location="cpu", weights_only=True)  # plain types: nothing allowed
    assert isinstance(new["rng"][0]["numpy"]["state"]["key"], list)


def test_model_weights_come_from_safetensors_and_a_pickled_bin_is_never_read(tmp_path):
    """03 (02's model), 04 and chat load model folders through load_model: the weights come from
    model.safetensors; a pytorch_model.bin (a pickle) beside it is not read, and a folder with only one is
    refused in one message."""
    model = build_model(TINY["vocab_size"], pretrain_cfg(None, tmp_path))
    marker = tmp_path / "PWNED"
    both, bin_only = tmp_path / "both", tmp_path / "bin_only"
    model.save_pretrained(both)
    bin_only.mkdir()
    shutil.copy(both / "config.json", bin_only / "config.json")
    for folder in (both, bin_only):
        torch.save({"transformer.wte.weight": Payload(marker)}, folder / "pytorch_model.bin")
    loaded = pg.load_model(both)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight) and not marker.exists()
    with pytest.raises(pg.PocketGPTError, match=f"^{bin_only} holds no model.safetensors, so it was not loaded: "
                                                f"pocketGPT reads a model's weights from safetensors only"):
        pg.load_model(bin_only)
    assert not marker.exists()
