"""A disk that fills up: a real, small filesystem (a tmpfs the test mounts; CI runs as root), never a fake.

Each write that finds the disk full ends the stage in one message: the disk is full, which folder, what is
free and about what was needed, what is intact, and what to do. Nothing half-written stays under a final
name, and once space is freed a rerun carries on.
"""
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest
from conftest import TINY
from test_real_path import ENV, pretrain_params, stage_cmd

import pocketgpt_utils as pg
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.files import DiskFullError, size_of, write_file, write_folder


@contextmanager
def small_disk(path, size: str):
    """A tmpfs of `size` mounted at `path` for the test; skipped where this process may not mount one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def leave_free(disk, n_bytes: int):
    """Fill the disk but for n_bytes (a file of zeros: tmpfs counts what is written)."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - n_bytes
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, size))
    return filler


def leftovers(root):
    """Temporary files of the one write door: none may survive a failed write."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_says_what_to_do(tokenizer_stage, tmp_path):
    """02 on a small disk, as a user meets it: a session ends on its budget (a checkpoint written), the next
    one resumes and its first checkpoint does not fit. One message, no traceback; the last checkpoint
    still loads; once space is freed, resume_from='auto' continues and finishes."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        params = pretrain_params(tokenizer_stage, disk, max_hours=3 / 3600, resume_from="auto", checkpoint_minutes=0)
        first = subprocess.run(stage_cmd("pretrain", 1, params), capture_output=True, text=True, env=ENV, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        ckpt = disk / "pretrain" / "ckpt.pt"
        step = load_checkpoint(disk / "pretrain")["state"]["step"]
        filler = leave_free(disk, ckpt.stat().st_size // 2)  # room for the log, not for a checkpoint
        full = subprocess.run(stage_cmd("pretrain", 1, params), capture_output=True, text=True, env=ENV, timeout=300)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        message = full.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: The disk is full: writing ckpt.pt into {disk / 'pretrain.partial'} needs "
                                  f"about "), message
        assert "is free there" in message and "/kaggle/working holds 20 GB" in message
        assert f"The last checkpoint, {ckpt} (written at " in message and "is intact" in message
        assert message.endswith("then run this stage again with resume_from='auto': it continues from that checkpoint.")
        assert load_checkpoint(disk / "pretrain")["state"]["step"] == step  # intact
        assert not (disk / "pretrain.partial" / "ckpt.pt").exists() and not leftovers(disk)
        filler.unlink()
        again = subprocess.run(stage_cmd("pretrain", 1, {**params, "max_steps": step + 30}), capture_output=True,
                               text=True, env=ENV, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming {disk / 'pretrain'} at step {step} " in again.stdout
        m = pg.read_json(disk / "pretrain" / "metrics.json")
        assert m["finished"] and m["steps"] == step + 30 and not (disk / "pretrain.partial").exists()


def test_a_full_disk_while_the_tokenizer_writes_train_bin_is_named(demo_data, tmp_path):
    with small_disk(tmp_path / "disk", "600k") as disk:
        cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(disk), corpus_path=str(demo_data / "corpus.txt"),
                             vocab_size=TINY["vocab_size"], val_fraction=0.05)
        leave_free(disk, 120_000)  # the tokenizer files fit, the ids of a 250 kB corpus do not
        with pytest.raises(DiskFullError, match=r"The disk is full: writing train.bin into .*tokenizer.partial needs "
                                                   r"about 1\d\d.\d kB and .* is free there\. Nothing finished was touched"):
            pg.build_tokenizer_stage(cfg)
        assert not (disk / "tokenizer").exists() and not leftovers(disk)


@pytest.fixture(scope="module")
def finished_run(tokenizer_stage, demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("fullrun")
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    pg.run_pretrain_stage(pg.make_config(pg.PretrainConfig, "demo", run_dir=str(run), precision="fp32",
                                         tokenizer_dir=str(tokenizer_stage), eval_windows=16, **params))
    pg.run_sft_stage(pg.make_config(pg.SFTConfig, "demo", run_dir=str(run), precision="fp32", batch_size=16,
                                    dialogs_path=str(demo_data / "dialogs.csv"), max_steps=10))
    return run


def export_cfg(tokenizer_stage, run, out_dir):
    return pg.make_config(pg.ExportConfig, "demo", run_dir=str(run), tokenizer_dir=str(tokenizer_stage),
                          out_dir=str(out_dir), gguf_types=["f16"])


def test_a_full_disk_during_the_export_names_each_write_and_a_rerun_finishes(tokenizer_stage, finished_run, tmp_path):
    """04 on a disk with room for what comes before one of its writes and half of that write: the model
    folder, the GGUF file, the zip. Each ends in the message naming that file; export/ is never created
    half-written; with the space back, the same command finishes."""
    with small_disk(tmp_path / "disk", "24m") as disk:
        out = pg.run_export_stage(export_cfg(tokenizer_stage, finished_run, disk / "export"))  # sizes, and the rerun
        sizes = {"pocketGPT": size_of(out / "pocketGPT") - size_of(out / "pocketGPT" / "pytorch_model.bin")
                 - size_of(out / "pocketGPT" / "README.md") - size_of(out / "pocketGPT" / "special_tokens_map.json"),
                 "pocketGPT-f16.gguf": size_of(out / "pocketGPT-f16.gguf"), "pocketGPT.zip": size_of(out / "pocketGPT.zip")}
        before = {"pocketGPT": 0, "pocketGPT-f16.gguf": size_of(out / "pocketGPT"),
                  "pocketGPT.zip": size_of(out / "pocketGPT") + sizes["pocketGPT-f16.gguf"]}
        done = pg.read_json(out / "metrics.json")
        shutil.rmtree(out)
        for name, size in sizes.items():
            shutil.rmtree(disk / "export.partial", ignore_errors=True)  # what the stage clears first: not free before
            filler = leave_free(disk, before[name] + size // 2)
            with pytest.raises(DiskFullError) as e:
                pg.run_export_stage(export_cfg(tokenizer_stage, finished_run, disk / "export"))
            assert str(e.value).startswith(f"The disk is full: writing {name} into {disk / 'export.partial'} needs about ")
            assert f"Nothing finished was touched ({disk / 'export'} is as it was)" in str(e.value)
            assert not (disk / "export").exists() and not leftovers(disk), name
            filler.unlink()
        out = pg.run_export_stage(export_cfg(tokenizer_stage, finished_run, disk / "export"))
        again = pg.read_json(out / "metrics.json")
        assert again["sft_response_loss"] == done["sft_response_loss"] and again["quality"] == done["quality"]
        assert not (disk / "export.partial").exists()


def test_the_one_write_door_on_a_full_disk_leaves_the_old_file(tmp_path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        write_file(disk / "log.csv", "step,loss\n1,2.0\n")
        leave_free(disk, 8192)
        with pytest.raises(DiskFullError, match=r"writing log.csv into .* needs about 100.0 kB and"):
            write_file(disk / "log.csv", "x" * 100_000)
        with pytest.raises(DiskFullError, match=r"writing model into .* needs about"):
            write_folder(disk / "model", lambda tmp: (tmp / "weights").write_bytes(b"w" * 100_000))
        assert (disk / "log.csv").read_text() == "step,loss\n1,2.0\n" and not (disk / "model").exists()
        assert not leftovers(disk)
