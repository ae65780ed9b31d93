"""
pocketGPT: everything the four notebooks call, in pipeline order.

    environment and paths -> demo data -> tokenizer -> model -> training -> SFT
    -> evaluation -> export -> plotting -> command line

Run the whole suite headless (papermill runs notebooks/01..04, each stage's folder feeds the next):
    python pocketgpt_utils.py pipeline --profile demo
Make the demo corpus and dialogs:
    python pocketgpt_utils.py demo-data --out DIR
Time a training step on this device:
    python pocketgpt_utils.py bench --profile t4 --reference
"""
from __future__ import annotations

import argparse
import ast
import bisect
import copy
import csv
import dataclasses
import difflib
import errno
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

# before the libraries import tqdm.auto: without ipywidgets it warns, and text bars are what we want
warnings.filterwarnings("ignore", message="IProgress not found")
import torch  # noqa: E402
import torch.nn.functional as F
from accelerate import Accelerator, notebook_launcher
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, TextStreamer

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|bos|>", "<|eos|>"]  # ids 0..3, in this order
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
STAGES = {"tokenizer": "01_tokenizer", "pretrain": "02_pretrain", "sft": "03_sft", "export": "04_eval_export"}


class PocketGPTError(Exception):
    """An error the user can fix: the message names the file or parameter and what to do."""


# -----------------------------------------------------------------------------
# Environment and paths

def on_kaggle() -> bool:
    """Kaggle sets KAGGLE_KERNEL_RUN_TYPE in every kernel (interactive or batch)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def kaggle_root() -> Path:
    """The /kaggle root; POCKETGPT_KAGGLE_ROOT lets tests simulate Kaggle's layout in a temp dir."""
    return Path(os.environ.get("POCKETGPT_KAGGLE_ROOT", "/kaggle"))


def default_run_dir(profile: str) -> Path:
    """Where a run's stage folders live: /kaggle/working on Kaggle, runs/<profile> here."""
    return kaggle_root() / "working" if on_kaggle() else HERE / "runs" / profile


def library_versions() -> dict:
    """Versions of what made an artifact, recorded in every manifest."""
    out = {"python": platform.python_version()}
    for name in ["torch", "transformers", "tokenizers", "accelerate", "numpy", "gguf"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(path) -> str:
    """sha256 of a file, of a stage folder's manifest (which lists and dates its files), or of a
    save_to_disk folder's state.json files (which hold the fingerprints `datasets` gives its data)."""
    path = Path(path)
    parts = [path]
    if path.is_dir():
        parts = sorted(path.rglob("state.json")) if data_format(path) == "saved" else [path / "manifest.json"]
    h = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_main_process() -> bool:
    """Rank 0, or the only process: torchrun, `accelerate launch` and notebook_launcher set RANK."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes train together (WORLD_SIZE, set by the launchers; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_mismatch() -> str | None:
    """What to say when the launcher that started this process (its parent) was asked for another number of
    processes than started: `accelerate launch --num_processes 2` without --multi_gpu starts one process, in
    silence, where there is no GPU. None when they agree, or no launcher says how many it was asked for."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value.isdigit() and int(value) != world_size():
                return (f"the launcher was asked for {value} processes ({name} {value}) and started {world_size()}. "
                        f"Without a GPU, `accelerate launch` starts several only with --multi_gpu (accelerate launch "
                        f"--multi_gpu --num_processes {value} ...); torchrun --nproc_per_node {value} ... works too.")
    return None


def watched() -> bool:
    """Whether someone watches the output as it is made: a terminal or an interactive notebook.

    Not in a headless run, whose output is read afterwards: `pipeline` sets POCKETGPT_PROGRESS=lines
    for its notebooks, Kaggle's "Save & Run All" is a batch run, and papermill or nbconvert started
    by hand is the kernel's parent. There every update of a bar would stay in the saved notebook as a
    line of its own (1,734 of them in 02 once). POCKETGPT_PROGRESS=live or =lines overrides.
    """
    mode = os.environ.get("POCKETGPT_PROGRESS", "")
    if mode in ("live", "lines"):
        return mode == "live"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return False
    if "ipykernel" in sys.modules:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return True
        return not re.search(rb"papermill|nbconvert|nbclient|jupyter-execute", parent)
    return sys.stderr.isatty()


class LineBar(tqdm):
    """tqdm for a headless run: one plain line on stdout at each quarter of the way (with the time
    left), or every 10 minutes when the total is unknown, and one at the end."""

    def __init__(self, *args, **kwargs):
        self._next_fraction, self._printed = 0.25, (time.time(), None)
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("bar_format", "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} "
                                        "[{elapsed} elapsed, {remaining} left, {rate_fmt}]")
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        fraction = self.n / self.total if self.total else None
        at_end = fraction is not None and fraction >= 1
        due = (fraction >= self._next_fraction if fraction is not None
               else time.time() - self._printed[0] > 600 or pos == 0)
        if (due or at_end) and self._printed[1] != self.n and self.n > 0:
            while fraction is not None and self._next_fraction <= fraction:
                self._next_fraction += 0.25
            n = self.format_sizeof(self.n) if self.unit_scale else f"{self.n:,}"
            line = str(self) if self.total else \
                f"{self.desc}: {n} {self.unit} [{self.format_interval(self.format_dict['elapsed'])}]"
            print(line, file=self.fp, flush=True)
            self._printed = (time.time(), self.n)
        return True

    def clear(self, nolock=False):
        pass

    def close(self):
        if not self.disable:
            self.display(pos=0)
        self.sp = None  # tqdm's own close would end with a blank line
        super().close()


def progress(total=None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """The progress bar of long work: live where someone watches, a few lines where nobody does."""
    if not is_main_process():
        kwargs["disable"] = True
    return (tqdm if watched() else LineBar)(total=total, desc=desc, unit=unit, **kwargs)


@contextmanager
def quiet_library_bars():
    """Silence transformers' own bars ("Loading weights", "Writing model shards": one per model load
    or save, and nothing a reader can use) inside a stage; the user's setting comes back after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


class DiskFullError(PocketGPTError):
    """A write that found the disk full; the message says where, what is free and about what was needed."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the error's chain: torch.save wraps it in a RuntimeError ("unexpected
    pos ...") whose context is the OSError, safetensors says "os error 28" in its own words."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "(os error 28)" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def size_of(path) -> int:
    """Bytes of a file, or of every file under a folder; 0 when it is not there."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def free_bytes(path) -> int:
    """Free bytes on the filesystem that holds `path` (or the nearest folder above it that exists)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000


def disk_full_error(what: str, where, needed: int | None, kept: str = "Nothing half-written is left under its name.",
                    next_step: str = "run again") -> DiskFullError:
    """The one message of a full disk: what was written where, what is free there and about what was
    needed (None: not known), what is intact, and what to do."""
    need = f"needs about {human_bytes(needed)} and " if needed else "failed: "
    e = DiskFullError(f"The disk is full: writing {what} into {where} {need}"
                      f"{human_bytes(free_bytes(where))} is free there. {kept} Free some space (on Kaggle, "
                      f"/kaggle/working holds 20 GB in all: delete outputs you no longer need), then {next_step}.")
    e.what, e.where, e.needed = what, Path(where), needed
    return e


@contextmanager
def space_for(path, tmp=None, needed: int = 0):
    """A write that fills the disk ends in one message (disk_full_error) instead of the writer's own
    (torch: "basic_ios::clear: iostream error"). `tmp`: what had been written when it failed, a lower
    bound of what was needed; `needed`: the caller's estimate."""
    path = Path(path)
    try:
        yield
    except Exception as e:
        # some writers lose the errno ("16384 requested and 1408 written": numpy's tofile in gguf): an I/O error
        # with less than a megabyte left is the disk being full
        if isinstance(e, PocketGPTError) or not (is_disk_full(e) or isinstance(e, (OSError, RuntimeError))
                                                 and free_bytes(path.parent) < 1 << 20):
            raise
        raise disk_full_error(path.name, path.parent, max(needed, size_of(tmp) if tmp else 0, size_of(path))) from None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: about what torch.save writes of it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_file(path, content, needed: int = 0) -> None:
    """The one door through which the stages write a file: rank 0 only, and atomically.

    `content` is text, bytes, or a function that writes the file at the path it is given. It
    goes to a temporary name of this process and is renamed into place, so a crash (or Kaggle's
    12-hour kill) never leaves half a file, and in a multi-GPU run the other processes, which
    hold the same numbers, write nothing (two writers once doubled log.csv's rows). A full disk
    ends in one message saying so (space_for); the file under its name is still the old one.
    """
    if not is_main_process():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with space_for(path, tmp, max(needed, len(content) if isinstance(content, (str, bytes)) else 0)):
            if callable(content):
                content(tmp)
            elif isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    f.write(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(path, fill, needed: int = 0) -> None:
    """write_file for a folder: `fill(tmp)` writes it whole under a temporary name, then it replaces
    the old one. A model folder is either the old one or the new one, never half of each."""
    if not is_main_process():
        return
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{kind}") for kind in ("tmp", "old"))
    try:
        with space_for(path, tmp, needed):
            tmp.mkdir(parents=True)
            fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def torch_file(obj):
    """write_file content that torch.saves `obj` through a file object: then a full disk's OSError stays
    in the error's chain (saved by name, torch says only "basic_ios::clear: iostream error")."""
    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return save


def zip_folder(folder):
    """write_file content: the folder as a zip whose top folder is its own name (as shutil.make_archive
    writes one, but to the name it is given)."""
    folder = Path(folder)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in [folder, *sorted(folder.rglob("*"))]:
                z.write(f, f.relative_to(folder.parent))
    return write


def write_json(path, obj) -> None:
    write_file(path, json.dumps(obj, indent=2, default=str))


def csv_text(header, rows) -> str:
    """A CSV file's text (for write_file)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def find_stage(stage: str, path=None, run_dir=None) -> Path:
    """Find the folder a finished `stage` wrote, by its manifest.json.

    `path` (a notebook parameter) wins: the folder itself, or any folder above it. On Kaggle the
    inputs are searched under /kaggle/input (mount paths have changed before, so none is
    hard-coded); locally the stage's folder in the run folder. The newest finished one wins.
    """
    if path is not None:
        roots, where = [Path(path)], f"{path}"
        if not Path(path).exists():
            raise PocketGPTError(f"{stage}: the path {path} does not exist. Pass the folder the "
                                 f"{STAGES[stage]} notebook wrote (it holds a manifest.json).")
    elif on_kaggle():
        roots, where = [kaggle_root() / "input"], f"{kaggle_root() / 'input'} (attached inputs)"
    else:
        roots, where = [Path(run_dir) / stage], f"{Path(run_dir) / stage}"
    found = []
    for root in roots:
        candidates = [root / "manifest.json"] + sorted(root.glob("**/manifest.json")) if root.is_dir() else []
        for m in candidates:
            try:
                manifest = read_json(m)
            except (OSError, ValueError):
                continue
            if manifest.get("stage") == stage and manifest.get("finished_at"):
                found.append((manifest["finished_at"], m.parent))
    if not found:
        hint = (f"attach the output of the {STAGES[stage]} notebook to this one" if on_kaggle()
                else f"run notebooks/{STAGES[stage]}.ipynb first")
        raise PocketGPTError(f"No finished '{stage}' stage found in {where}: {hint}, "
                             f"or pass its folder (the one holding manifest.json) as a parameter.")
    return max(found)[1]


def attached_input(name: str, param: str, formats=None) -> Path:
    """The one input called `name` attached under /kaggle/input, for a parameter left None. With `formats`,
    `name` is a stem: corpus.txt, corpus.jsonl.gz, corpus.parquet or a save_to_disk folder `corpus` all count.

    Several matches (two datasets each with a corpus.txt, say) are not concatenated in silence:
    the user says which with `param`."""
    root = kaggle_root() / "input"
    pattern = f"{name}*" if formats else name
    found = sorted(Path(f) for f in glob.glob(str(root / "**" / pattern), recursive=True)
                   if (not formats and Path(f).is_file()) or (formats and data_format(f) in formats
                       and Path(f).name.split(".")[0] == name and (Path(f).is_file() or data_format(f) == "saved")))
    label = f"{name}.txt, {name}.jsonl, {name}.parquet, ... or a saved folder {name}" if formats else name
    if not found:
        raise PocketGPTError(f"{param}=None and no {label} is attached under {root}: attach the dataset holding "
                             f"it, or set {param} to your file.")
    if len(found) > 1:
        raise PocketGPTError(f"{param}=None and {len(found)} files named {' / '.join(sorted({f.name for f in found}))} "
                             f"are attached: {files_summary(found)}. "
                             f"Set {param} to the one to use (or to a glob, to use them all).")
    return found[0]


def files_summary(files) -> str:
    """'a.txt (1.2 MB), b.txt (0.3 MB)': what was found and used, printed before the work."""
    files = list(files)
    shown = ", ".join(f"{f} ({data_size(f) / 1e6:.1f} MB)" for f in files[:10])
    return shown + (f" and {len(files) - 10} more" if len(files) > 10 else "")


def check_writable(out_dir: Path, param: str = "out_dir") -> None:
    """Fail before hours of work if the output folder cannot be written."""
    parent = Path(out_dir).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".pocketgpt-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PocketGPTError(f"Cannot write the output folder {out_dir} ({e.strerror}). "
                             f"Set {param} to a writable folder.") from None


@contextmanager
def stage_output(out_dir, stage: str, params: dict, inputs: dict | None = None, resuming: Path | None = None):
    """Write a stage into `<out_dir>.partial`, then rename it into place with its manifest.

    A folder without manifest.json never counts as finished, so a crash (or Kaggle's 12-hour
    kill) can leave a .partial behind, holding the last checkpoint, but never a folder that
    looks done. A run that resumes from that .partial keeps it: its ckpt.pt is replaced only by
    a newer one. A fresh run clears it first. The manifest says what made the folder.
    """
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    if not is_main_process():  # in a multi-GPU run only rank 0 writes files
        yield work
        return
    check_writable(out_dir)
    if (work / "manifest.json").is_file() and not out_dir.exists():  # killed between the renames below: finish them
        os.replace(work, out_dir)
    for stale in out_dir.parent.glob(f"{out_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if work.exists() and (resuming is None or Path(resuming).resolve() != work.resolve()):
        if (work / "ckpt.pt").exists():
            print(f"removing {work}, an unfinished earlier run (resume_from='auto' would have continued it)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = now_iso()
    # the inputs as they are now: a checkpoint resumed from is replaced as the run goes on
    fingerprints = {k: {"path": str(v), "fingerprint": fingerprint(v)} for k, v in (inputs or {}).items()}
    try:
        yield work
        manifest = {
            "stage": stage,
            "notebook": f"notebooks/{STAGES[stage]}.ipynb",
            "params": params,
            "versions": library_versions(),
            "started_at": started,
            "finished_at": now_iso(),
            "inputs": fingerprints,
            "files": sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()),
        }
        write_json(work / "manifest.json", manifest)
    except Exception as e:
        if isinstance(e, DiskFullError) or is_disk_full(e):
            raise stage_disk_full(e, stage, work, resuming) from None
        raise
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(work, out_dir)


def stage_disk_full(e: Exception, stage: str, work: Path, resuming) -> DiskFullError:
    """A full disk inside a stage, said with what survived it: the last checkpoint (written atomically,
    so whole) and how to continue from it, or that nothing finished was touched."""
    if isinstance(e, DiskFullError):
        what, where, needed = e.what, e.where, e.needed
    else:  # a write that did not go through the door
        what, where, needed = "the stage's files", work, None
    folder = newest_checkpoint([f for f in [work, resuming] if f])
    out_dir = work.with_name(work.name.removesuffix(".partial"))
    if stage in ("pretrain", "sft") and folder:
        last = newest_ckpt_file(folder)
        when = datetime.fromtimestamp(last.stat().st_mtime).strftime("%H:%M:%S")
        kept = f"The last checkpoint, {last} (written at {when}), is intact: writes replace a file only once it is whole."
        next_step = "run this stage again with resume_from='auto': it continues from that checkpoint"
    elif stage in ("pretrain", "sft"):
        kept, next_step = "No checkpoint had been written yet.", "run this stage again"
    else:
        kept = f"Nothing finished was touched ({out_dir} is as it was)."
        next_step = "run this stage again"
    return disk_full_error(what, where, needed, kept, next_step)


# -----------------------------------------------------------------------------
# Profiles and stage configurations
# Each stage's dataclass holds its defaults, and they are the seed's real run (the `t4` profile).
# The `demo` profile lists only what it changes. A notebook parameter left None takes the
# profile's value; the notebooks' comments and the README's table are checked against these.

PROFILES = {
    "t4": {},  # the dataclass defaults: the seed's 27M GPT-2, batches that fill a 16 GB T4
    "demo": {  # a tiny model that trains in minutes on a laptop CPU
        "tokenizer": dict(vocab_size=4096),
        "pretrain": dict(n_layer=4, n_head=4, n_embd=128, n_positions=128, batch_size=16, grad_accum_steps=1,
                         learning_rate=2e-3, muon_lr=4e-3, min_lr=2e-4, warmup_steps=30, max_steps="auto", max_hours=0.1,
                         log_interval=50, eval_interval=200, checkpoint_minutes=5, eval_windows=256),
        "sft": dict(epochs=2, batch_size=32, learning_rate=5e-4, max_hours=0.06, log_interval=25,
                    eval_interval=100, checkpoint_minutes=5),
    },
}


def resolve_profile(profile: str | None) -> tuple[str, str]:
    """None means `t4` where there is a GPU and `demo` on a CPU; returns the name and why.

    A user who attaches a corpus and presses Run All on a T4 must get the 27M model, not the
    1.3M-parameter demo (torch.cuda.is_available() does not start CUDA, so notebook_launcher
    can still fork the GPU processes after it)."""
    if profile is not None:
        if profile not in PROFILES:
            raise PocketGPTError(f"profile={profile!r} is unknown: use one of {sorted(PROFILES)}, "
                                 f"or None (t4 on a GPU, demo on a CPU).")
        return profile, "set by the profile parameter"
    if torch.cuda.is_available():
        return "t4", f"profile=None and a GPU is here ({torch.cuda.get_device_name(0)})"
    return "demo", "profile=None and no GPU is here: the tiny demo model (set profile='t4' for the 27M one)"


def make_config(cls, profile: str | None, **given):
    """Build a stage's dataclass: explicit values, else the profile's, else the field default."""
    profile, _ = resolve_profile(profile)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(given) - known
    if unknown:
        raise PocketGPTError(f"Unknown parameter(s) {sorted(unknown)} for {cls.__name__}.")
    values = {**PROFILES[profile].get(cls.stage, {}), **{k: v for k, v in given.items() if v is not None}}
    return cls(**{**values, "profile": profile})


@dataclasses.dataclass
class TokenizerConfig:
    stage: ClassVar[str] = "tokenizer"
    profile: str = "t4"
    run_dir: str | None = None
    seed: int = 1337
    corpus_path: str | None = None        # file, folder or glob; None = the demo corpus in the run folder
    text_column: str | None = None        # JSONL/Parquet/CSV/Arrow: the column of documents; None: detected
    vocab_size: int = 24000
    val_fraction: float = 0.01
    out_dir: str | None = None
    on_invalid_utf8: str = "fail"         # "fail" or "replace" (with U+FFFD)

    def __post_init__(self):
        self.run_dir = str(self.run_dir or default_run_dir(self.profile))
        self.out_dir = str(self.out_dir or Path(self.run_dir) / "tokenizer")
        if not 260 <= int(self.vocab_size) <= 65535:  # 256 bytes + 4 specials; uint16 .bin files
            raise PocketGPTError(f"vocab_size={self.vocab_size}: must be between 260 (256 byte tokens + "
                                 f"{len(SPECIAL_TOKENS)} special tokens) and 65535 (ids are stored as uint16).")
        if not 0 < float(self.val_fraction) < 0.5:
            raise PocketGPTError(f"val_fraction={self.val_fraction}: use a fraction between 0 and 0.5, e.g. 0.01.")
        if self.on_invalid_utf8 not in ("fail", "replace"):
            raise PocketGPTError(f"on_invalid_utf8={self.on_invalid_utf8!r}: use 'fail' or 'replace'.")


# -----------------------------------------------------------------------------
# Demo data: ML prose from the docstrings of the installed ML libraries
# Read from source with `ast` (never imported: importing torch's 2,000 modules is slow and noisy).

# Smallest first: what a small library cannot fill of its share rolls over to the big ones.
DEMO_PACKAGES = ["safetensors", "tokenizers", "accelerate", "datasets", "sklearn", "scipy", "pandas",
                 "numpy", "transformers", "torch"]
QUESTION_TEMPLATES = [
    "What does {name} do?",
    "Explain {qualname}.",
    "What is `{name}` used for?",
    "Describe the {kind} {qualname}.",
    "In {package}, what is {name}?",
    "Summarize the documentation of {qualname}.",
]


def iter_docstrings(packages=DEMO_PACKAGES):
    """Yield (package, qualname, kind, docstring) for every public documented object, in a fixed order."""
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for file in sorted(root.rglob("*.py")):
            rel = file.relative_to(root.parent).with_suffix("")
            if any(part.startswith("_") and part != "__init__" or part in ("tests", "testing") for part in rel.parts):
                continue
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            try:
                tree = ast.parse(file.read_bytes(), filename=str(file))
            except (SyntaxError, ValueError):
                continue
            yield from _walk_docstrings(tree, module, package)


def _walk_docstrings(node, prefix: str, package: str):
    kind = {"Module": "module", "ClassDef": "class"}.get(type(node).__name__, "function")
    doc = ast.get_docstring(node)
    if doc:
        yield package, prefix, kind, doc
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
            yield from _walk_docstrings(child, f"{prefix}.{child.name}", package)


def clean_docstring(doc: str) -> str:
    """One document per docstring: dedented, no blank lines inside (blank lines separate documents)."""
    lines = [line.rstrip() for line in inspect.cleandoc(doc).splitlines()]
    return "\n".join(line for line in lines if line.strip())


def summary_paragraph(doc: str) -> str:
    """The first paragraph of a docstring, on one line: the answer to 'what does X do?'."""
    first = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(first.split())


def make_demo_data(out_dir, max_bytes: int = 6_000_000, max_dialogs: int = 20_000,
                   packages=DEMO_PACKAGES) -> dict:
    """Write corpus.txt (documents separated by blank lines) and dialogs.csv; deterministic."""
    out_dir = Path(out_dir)
    check_writable(out_dir / "corpus.txt", "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    packages = [p for p in packages if importlib.util.find_spec(p) is not None]
    seen, documents, n_bytes, dialogs = set(), [], 0, []
    for i, package in enumerate(packages):  # an equal share each, so no one library dominates
        budget = n_bytes + (max_bytes - n_bytes) // (len(packages) - i)
        dialog_budget = len(dialogs) + (max_dialogs - len(dialogs)) // (len(packages) - i)
        for _, qualname, kind, doc in iter_docstrings([package]):
            text = clean_docstring(doc)
            key = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if len(text) < 80 or key in seen:
                continue
            seen.add(key)
            document = f"{qualname}\n{text}"
            size = len(document.encode()) + 2
            if n_bytes + size > budget:
                if budget - n_bytes < 2000:
                    break
                continue  # one long docstring; smaller ones may still fit
            documents.append(document)
            n_bytes += size
            answer = summary_paragraph(doc)
            if kind != "module" and 40 <= len(answer) <= 600 and len(dialogs) < dialog_budget:
                name = qualname.rsplit(".", 1)[-1]
                for k in sorted({key[0] % len(QUESTION_TEMPLATES), key[1] % len(QUESTION_TEMPLATES)}):
                    q = QUESTION_TEMPLATES[k].format(name=name, qualname=qualname, kind=kind, package=package)
                    dialogs.append((q, answer))
    write_file(out_dir / "corpus.txt", "".join(d + "\n\n" for d in documents))
    write_file(out_dir / "dialogs.csv", csv_text(["instruction", "response"], dialogs[:max_dialogs]))
    return {"corpus": str(out_dir / "corpus.txt"), "documents": len(documents), "bytes": n_bytes,
            "dialogs": str(out_dir / "dialogs.csv"), "dialog_rows": min(len(dialogs), max_dialogs)}


def demo_data(run_dir) -> Path:
    """The run folder's data/ with the demo corpus.txt and dialogs.csv, built on first use."""
    data = Path(run_dir) / "data"
    if not ((data / "corpus.txt").exists() and (data / "dialogs.csv").exists()):
        print(f"building the demo data in {data}")
        make_demo_data(data)
    return data


# -----------------------------------------------------------------------------
# Reading data: a corpus, dialogs or preference pairs, in the formats they come in
# .txt is read line by line (documents between blank lines); JSON Lines, Parquet, CSV, Arrow files and
# save_to_disk folders are streamed through `datasets`; .gz, .bz2 and .zst are read by their extension.

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst")
CORPUS_FORMATS = ("text", "json", "parquet", "csv", "arrow", "saved")
TEXT_COLUMNS = ["text", "content", "document", "body", "raw_content", "article", "passage", "markdown"]


def data_format(path, default: str | None = None) -> str | None:
    """How a path is read: by its extension under any .gz/.bz2/.zst (text, json, parquet, csv, arrow);
    'saved' for a folder written by `datasets`' save_to_disk; else `default`."""
    p = Path(path)
    if p.is_dir():
        return "saved" if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() else default
    suffixes = [s.lower() for s in p.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return FORMATS.get(suffixes[-1] if suffixes else "", default)


def data_size(path) -> int:
    """Bytes on disk: a file's size, or the size of a save_to_disk folder's .arrow files."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*.arrow")) if p.is_dir() else p.stat().st_size


def data_files(path, param: str, formats, hint: str) -> list[Path]:
    """The inputs a path names: a file, a save_to_disk folder, a glob, or a folder: every file (and saved
    folder) under it in one of `formats`, in sorted order. A folder holding two formats (a corpus beside a
    metadata.csv, say) is not read in silence: a glob says which files to read."""
    p = Path(path)
    if p.is_file() or data_format(p) == "saved":
        return [p]
    if p.is_dir():
        found = [f for f in sorted(p.rglob("*")) if not f.name.startswith(".") and data_format(f) in formats
                 and (f.is_file() or data_format(f) == "saved")]
        saved = [f for f in found if f.is_dir()]
        found = [f for f in found if not any(s in f.parents for s in saved)]  # a saved folder is read whole
        kinds = sorted({data_format(f) for f in found})
        if len(kinds) > 1:
            raise PocketGPTError(f"{param}={path}: the folder holds files of {len(kinds)} formats ({', '.join(kinds)}). "
                                 f"Set {param} to a glob of the ones to read, e.g. {p / '**' / '*.jsonl'}.")
        if not found:
            names = sorted(ext for ext, fmt in FORMATS.items() if fmt in formats)
            raise PocketGPTError(f"{param}={path}: the folder holds no {', '.join(names)} files (plain or .gz, .bz2, "
                                 f".zst){' or save_to_disk folders' if 'saved' in formats else ''}. {hint}")
        return found
    found = sorted(Path(f) for f in glob.glob(str(path), recursive=True)
                   if Path(f).is_file() or data_format(f) == "saved")
    if not found:
        raise PocketGPTError(f"{param}={path}: no such file, folder or glob match. {hint}")
    return found


def corpus_files(corpus_path) -> list[Path]:
    """A corpus is a file, a folder or a glob of .txt, .jsonl/.json, .parquet, .csv, .arrow files (any of
    them .gz, .bz2 or .zst) or save_to_disk folders; files in sorted order."""
    if corpus_path is None:
        raise PocketGPTError("corpus_path is not set: pass a corpus file (.txt, .jsonl, .parquet, ...), a folder "
                             "of them or a glob.")
    return data_files(corpus_path, "corpus_path", CORPUS_FORMATS,
                      "Check the path (on Kaggle, attach the dataset holding your corpus).")


def open_data(file, raw=None):
    """A file to read bytes from, decompressed by its extension (.gz, .bz2, .zst); `raw`: the file already
    open (it is returned as it is when the file is not compressed, and left open)."""
    suffix, own = Path(file).suffix.lower(), raw is None
    if suffix == ".gz":
        import gzip
        return gzip.open(file if own else raw, "rb")
    if suffix == ".bz2":
        import bz2
        return bz2.open(file if own else raw, "rb")
    raw = open(file, "rb") if own else raw
    if suffix == ".zst":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=own))
    return raw


def bytes_read() -> int | None:
    """Bytes this process has read so far (Linux's /proc/self/io), for progress in bytes through readers
    that do not say where they are in a file; None where the system does not tell."""
    try:
        with open("/proc/self/io", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"rchar"))
    except (OSError, ValueError, StopIteration):
        return None


class InvalidUTF8:
    """Counts invalid UTF-8 bytes and remembers where the first ones are (file, line, byte offset)."""

    def __init__(self):
        self.count, self.where = 0, []

    def decode(self, raw: bytes, file, line_no: int, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        out, pos = [], 0
        while True:
            try:
                out.append(raw[pos:].decode("utf-8"))
                return "".join(out)
            except UnicodeDecodeError as e:
                out.append(raw[pos:pos + e.start].decode("utf-8") + "\ufffd")
                self.count += e.end - e.start
                if len(self.where) < 5:
                    self.where.append(f"{file}:{line_no} (byte {offset + pos + e.start})")
                pos += e.end


def first_bad_json_line(file) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object, and why (for a file holding one JSON
    array: the line where it breaks); None when every line parses (the trouble is elsewhere)."""
    try:
        with open_data(file) as f:
            for n, line in enumerate(f, 1):
                line = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line  # a UTF-8 byte order mark
                if n == 1 and line.lstrip().startswith(b"["):
                    try:
                        json.loads(line + f.read())
                    except json.JSONDecodeError as e:
                        return e.lineno, e.msg
                    except ValueError as e:
                        return 1, str(e)
                    return None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return n, f"{e.msg} at column {e.colno}"
                except ValueError as e:  # a line that is not UTF-8
                    return n, str(e)
                if not isinstance(record, dict):
                    return n, f"a JSON {type(record).__name__}, not an object"
    except (OSError, EOFError, ValueError):  # a damaged compressed file: said by the caller
        return None
    return None


def table_error(file, fmt: str, e: Exception) -> PocketGPTError:
    """What went wrong reading a table, said so it can be fixed: the line of a JSON Lines file that is not
    JSON, a file that is not UTF-8, else the reader's own words, with the file's name."""
    while e.__cause__ is not None and not isinstance(e, PocketGPTError):  # datasets wraps the reader's error
        e = e.__cause__
    if isinstance(e, PocketGPTError):
        return e
    if Path(file).suffix.lower() in COMPRESSIONS:  # a download that stopped halfway: say so, not "bad JSON"
        try:
            with open_data(file) as f:
                while f.read(1 << 24):
                    pass
        except Exception as damage:
            return PocketGPTError(f"{file} is damaged or cut short: it does not decompress ({type(damage).__name__}: "
                                  f"{damage}). Copy or compress it again.")
    bad = first_bad_json_line(file) if fmt == "json" else None
    if bad:
        return PocketGPTError(f"{file}, line {bad[0]}: not a JSON object ({bad[1]}). A JSON Lines file holds one JSON "
                              f"object a line: fix or remove that line.")
    if isinstance(e, UnicodeDecodeError):
        return PocketGPTError(f"{file} is not UTF-8 (byte {e.start}: {e.reason}). Save it as UTF-8 and try again.")
    name = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "arrow": "Arrow", "saved": "a save_to_disk folder"}[fmt]
    return PocketGPTError(f"{file} cannot be read as {name} ({type(e).__name__}: {e}). Check that it is whole and that its "
                          f"extension says its format (.jsonl, .json, .parquet, .csv, .arrow; .gz, .bz2, .zst compressed).")


@contextmanager
def datasets_errors_ours():
    """`datasets` logs a parse error itself ("Failed to load JSON ... in row 1", a row counted within a
    chunk) before raising it; the error it raises becomes our message, which names the file's line."""
    import logging
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def open_table(file, fmt: str):
    """A table as `datasets` streams (a save_to_disk folder: memory-mapped, a DatasetDict's splits in turn)
    and its column names ([] when it holds no rows). A CSV is read as written, every cell a string:
    "007", "nan" and "" stay what they are."""
    import datasets
    try:
        if fmt == "saved":
            ds = datasets.load_from_disk(str(file))
            parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
            return parts, parts[0].column_names if parts else []
        options = {}
        if fmt == "csv":
            csv_row_lines(file)  # quoting and cell counts checked strictly first: pandas reads a stray quote in silence
            with open_data(file) as f:
                try:
                    header = list(pd.read_csv(f, nrows=0, encoding="utf-8").columns)
                except pd.errors.EmptyDataError:
                    return [], []
            options = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                           keep_default_na=False)
        ds = datasets.load_dataset(fmt, data_files=[str(file)], split="train", streaming=True, **options)
        with datasets_errors_ours():
            return [ds], ds.column_names or list(next(iter(ds), {}))
    except StopIteration:  # datasets found no row to learn the columns from
        return [], []
    except Exception as e:
        raise table_error(file, fmt, e) from None


def iter_table(parts, file, fmt: str, columns, progress=None, batch_rows: int = 1000):
    """Yield (number of the batch's first row, {column: values}) for `columns` of an open table, streamed.
    `progress` advances by the file's bytes on disk: what this process has read of it (bytes_read), or
    for a memory-mapped saved folder the share of its rows."""
    size, done, start = data_size(file), 0, 0
    n_rows = sum(len(p) for p in parts) if fmt == "saved" else None
    before = bytes_read()
    try:
        with datasets_errors_ours():
            for part in parts:
                for batch in part.select_columns(columns).iter(batch_size=batch_rows):
                    yield start, batch
                    start += len(batch[columns[0]])
                    if progress is not None:
                        now = size * start // max(n_rows, 1) if n_rows is not None else (bytes_read() or 0) - (before or 0)
                        step = min(now, size) - done
                        if step > 0:
                            progress.update(step)
                            done += step
    except Exception as e:
        raise table_error(file, fmt, e) from None
    if progress is not None:
        progress.update(size - done)


def csv_row_lines(file) -> tuple[list[int], list[int]]:
    """A strict pass over a CSV file with Python's csv module, which stops where pandas guesses: a quote inside
    a quoted cell that is not doubled ("He said "hi" to me" reads as `He said hi" to me"` there), a quoted cell
    that never closes, a row with more or fewer cells than the header (pandas takes the extra first cell for
    an index). Each is an error naming the line. Returns where rows start, for row_place: the rows (from 0)
    that do not start on the line after the previous row's (the first; after a cell over several lines or a
    blank line), and their lines. Read once per file and process."""
    stat = Path(file).stat()
    return _csv_row_lines(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _csv_row_lines(file: str, size: int, mtime: int) -> tuple[list[int], list[int]]:
    csv.field_size_limit(2 ** 31 - 1)  # a document can be longer than the 128 kB default
    rows, lines, n, previous, end = [], [], 0, None, 0
    with open_data(file) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), strict=True)
        try:
            header = next(reader, [])
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line: pandas skips it, so no row
                    continue
                if len(row) != len(header):
                    raise PocketGPTError(f"{file}, line {start}: {len(row)} cells where the header has {len(header)}. A cell "
                                         f"that holds a comma must be in double quotes; fix the line or remove it.")
                if previous is None or start != previous + 1:
                    rows.append(n)
                    lines.append(start)
                n, previous = n + 1, start
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise PocketGPTError(f"{file}, line {end + 1}: a cell opens a double quote that never closes (the file ends "
                                     f"inside it). Close the quote, or double each quote inside the cell.") from None
            raise PocketGPTError(f"{file}, line {reader.line_num}: a double quote inside a quoted cell is not doubled "
                                 f"({e}). In CSV a quoted cell writes each quote inside it twice: \"He said \"\"hi\"\" to "
                                 f"me\". Fix that line (or save the file again from a spreadsheet program).") from None
    return rows, lines


def row_place(file, fmt: str, i: int) -> str:
    """Where row i (from 0) is, as the user finds it in an editor: a .jsonl or CSV file's line (a CSV's header
    is line 1; a cell over several lines counts them), else the row or record number."""
    if fmt == "json":
        return f"{file}, line {i + 1}" if ".jsonl" in [s.lower() for s in Path(file).suffixes] else f"{file}, record {i + 1}"
    if fmt == "csv":
        rows, lines = csv_row_lines(file)
        k = bisect.bisect_right(rows, i) - 1
        return f"{file}, line {lines[k] + i - rows[k] if k >= 0 else i + 2}"
    return f"{file}, row {i + 1}"


def find_text_column(columns, text_column=None, file="") -> str:
    """The column of documents: `text_column` (in any case), else the first of TEXT_COLUMNS, in any case."""
    lower = {c.lower(): c for c in columns}
    if text_column:
        if text_column in columns or text_column.lower() in lower:
            return text_column if text_column in columns else lower[text_column.lower()]
        raise PocketGPTError(f"{file}: text_column={text_column!r} is not a column; the columns are {list(columns)}. "
                             f"Set text_column to the one holding the documents.")
    found = next((lower[name] for name in TEXT_COLUMNS if name in lower), None)
    if found is None:
        raise PocketGPTError(f"{file}: no text column found among {list(columns)}. Set text_column to the column "
                             f"holding the documents (found by name: {', '.join(TEXT_COLUMNS)}, in any case).")
    return found


def table_documents(file, fmt: str, text_column=None, progress=None, counts: dict | None = None):
    """A table's documents: the text cell of each row, as it is. Rows whose cell is empty are skipped and
    counted in `counts`, with the rows read and the column used."""
    counts = {} if counts is None else counts
    parts, columns = open_table(file, fmt)
    if not columns:  # no rows
        if progress is not None:
            progress.update(data_size(file))
        return
    column = find_text_column(columns, text_column, file)
    counts.setdefault("text_columns", {})[str(file)] = column
    for start, batch in iter_table(parts, file, fmt, [column], progress):
        counts["rows"] = counts.get("rows", 0) + len(batch[column])
        for i, text in enumerate(batch[column], start):
            if text is not None and not isinstance(text, str):
                raise PocketGPTError(f"{row_place(file, fmt, i)}: the {column!r} cell is a {type(text).__name__}, not "
                                     f"text. Set text_column to the column that holds the documents as strings.")
            if not text or not text.strip():
                counts["empty_rows"] = counts.get("empty_rows", 0) + 1
                continue
            yield text


def iter_documents(files, invalid: InvalidUTF8 | None = None, progress=None, text_column=None,
                   counts: dict | None = None):
    """Yield documents from the files, one line (or one batch of rows) in memory at a time.

    A .txt file's documents are the text between blank lines: lines keep their leading spaces; line
    endings become "\\n"; invalid UTF-8 becomes U+FFFD and is counted in `invalid`. Any other file's
    documents are the cells of its text column (table_documents). `progress` (a tqdm bar) is advanced
    by the bytes read from disk.
    """
    invalid = invalid or InvalidUTF8()
    for file in files:
        fmt = data_format(file, "text")
        if fmt != "text":
            yield from table_documents(file, fmt, text_column, progress, counts)
            continue
        lines, offset, counted = [], 0, 0
        with open(file, "rb") as disk, open_data(file, disk) as f:
            for line_no, raw in enumerate(f, 1):
                line = invalid.decode(raw, file, line_no, offset).rstrip("\r\n")
                offset += len(raw)
                if progress is not None and f is disk:
                    progress.update(len(raw))
                elif progress is not None and line_no % 4096 == 0:  # compressed: the bytes on disk read so far
                    progress.update(disk.tell() - counted)
                    counted = disk.tell()
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
            if progress is not None and f is not disk:
                progress.update(data_size(file) - counted)
        if lines:
            yield "\n".join(lines)


def scan_corpus(files, on_invalid_utf8: str = "fail", text_column=None) -> dict:
    """One cheap pass before the work: sizes, document count, invalid UTF-8 (fail or replace); for tables
    the text column of each file and the rows without text."""
    invalid, counts, n_docs, n_text = InvalidUTF8(), {}, 0, 0
    n_bytes = sum(data_size(f) for f in files)
    with progress(total=n_bytes, unit="B", unit_scale=True, desc="scan") as bar:
        for doc in iter_documents(files, invalid, progress=bar, text_column=text_column, counts=counts):
            n_docs += 1
            n_text += len(doc.encode("utf-8", "surrogatepass"))
    if n_docs == 0:
        raise PocketGPTError(f"The corpus {', '.join(map(str, files))} is empty (no text). Point corpus_path at a file "
                             f"with documents separated by blank lines, or with rows of text in a text column.")
    if invalid.count and on_invalid_utf8 == "fail":
        raise PocketGPTError(f"The corpus has {invalid.count} invalid UTF-8 byte(s), first at "
                             f"{'; '.join(invalid.where)}. Fix the file(s), or set "
                             f"on_invalid_utf8='replace' to replace them with U+FFFD.")
    return {"files": [str(f) for f in files], "bytes": n_bytes, "text_bytes": n_text, "documents": n_docs,
            "rows": counts.get("rows", 0), "empty_rows": counts.get("empty_rows", 0),
            "text_columns": counts.get("text_columns", {}),
            "invalid_utf8_bytes": invalid.count, "invalid_utf8_where": invalid.where}


def split_of(document: str, seed: int, val_fraction: float) -> str:
    """'train' or 'val' from a seeded hash of the text: deterministic, disjoint, and streaming.

    Hashing the text (not its position) also puts exact duplicates in the same split, so the
    validation loss never measures memorized training documents.
    """
    h = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode())
    return "val" if int.from_bytes(h.digest(), "little") / 2**64 < val_fraction else "train"


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained with `tokenizers`, wrapped as GPT2TokenizerFast

def train_tokenizer(documents, vocab_size: int, n_documents: int | None = None):
    """Train a byte-level BPE on an iterator of documents (streamed in batches, never all in memory).

    ByteLevel with add_prefix_space=False and a ByteLevel decoder round-trips any text exactly;
    the 256 byte symbols are in the initial alphabet, so no text ever needs <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def batches(size=1000):
        batch = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    tok.train_from_iterator(batches(), trainer=trainer, length=n_documents)
    return tok


def wrap_tokenizer(tok, model_max_length: int = 1024):
    """The transformers face of the tokenizer: GPT2TokenizerFast with the four special tokens set."""
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                             pad_token="<pad>", unk_token="<unk>", add_prefix_space=False,
                             model_max_length=model_max_length)


def save_tokenizer(hf_tok, out_dir) -> None:
    """save_pretrained, plus vocab.json/merges.txt (transformers 5 writes only tokenizer.json)."""
    out_dir = Path(out_dir)
    with space_for(out_dir / "tokenizer.json", needed=2 * len(hf_tok.backend_tokenizer.to_str())):  # and vocab, merges
        hf_tok.save_pretrained(out_dir)
        hf_tok.backend_tokenizer.model.save(str(out_dir))


def encode_text(tok, texts) -> list[list[int]]:
    """Token ids of user text (documents, prompts, answers), special-token strings kept as text.

    ML documentation quotes "<pad>" and "<|eos|>"; read as control tokens they would split a
    document, end an answer early and vanish under skip_special_tokens. Only the code inserts
    <|bos|>, <|eos|> and <pad>, as ids. (The seed's own prompt, `tok.encode("<|bos|>Instruction:
    ...")`, still parses its <|bos|>: the exported tokenizer is unchanged.)"""
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def load_tokenizer(folder):
    """Load a saved tokenizer, with an error that names the folder when it is missing or corrupt."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise PocketGPTError(f"{folder} holds no tokenizer.json: point tokenizer_dir at the folder the "
                             f"01_tokenizer notebook wrote, or run that notebook again.")
    try:
        tok = GPT2TokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # a truncated or hand-edited file fails deep inside the library
        raise PocketGPTError(f"The tokenizer in {folder} cannot be loaded ({type(e).__name__}: {e}). "
                             f"Run the 01_tokenizer notebook again to rebuild it.") from None
    if tok.convert_tokens_to_ids(SPECIAL_TOKENS) != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:
        raise PocketGPTError(f"The tokenizer in {folder} does not have {SPECIAL_TOKENS} at ids 0-3: "
                             f"it was not made by pocketGPT's 01_tokenizer notebook.")
    return tok


def encode_corpus(files, tok, out_dir, seed: int, val_fraction: float, total_bytes: int,
                  batch_docs: int = 2000, text_column: str | None = None) -> dict:
    """Encode every document as <|bos|> ... <|eos|> into uint16 train.bin / val.bin.

    Batches go through the Rust tokenizer's parallel batch encoding (special-token strings in the
    text stay text: see encode_text); the ids are appended to the files as they come, so memory
    stays flat for any corpus size. Per-document lengths are kept
    (doc_stats.npz) for the length plots; val-split byte and word counts give the compression.
    """
    out_dir = Path(out_dir)
    outs = {}  # split -> its open .bin file, appended to as batches are encoded (inside the stage's .partial)
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "words": 0, "chars": 0} for s in ("train", "val")}
    lengths = {"split": [], "bytes": [], "tokens": []}
    started = time.time()

    def flush(batch):
        for doc, enc in zip(batch, encode_text(tok, batch)):
            ids = np.array([BOS_ID, *enc, EOS_ID], dtype=np.uint16)
            s = split_of(doc, seed, val_fraction)
            outs[s].write(ids.tobytes())
            st, nb = stats[s], len(doc.encode("utf-8"))
            st["docs"] += 1; st["tokens"] += len(ids); st["bytes"] += nb
            st["words"] += len(doc.split()); st["chars"] += len(doc)
            lengths["split"].append(s == "val"); lengths["bytes"].append(nb); lengths["tokens"].append(len(ids))

    # ids are 2 bytes and a token is about 4 bytes of text: about half the corpus's size on disk
    with space_for(out_dir / "train.bin", needed=total_bytes // 2), open(out_dir / "train.bin", "wb") as outs["train"], \
            open(out_dir / "val.bin", "wb") as outs["val"], \
            progress(total=total_bytes, unit="B", unit_scale=True, desc="encode") as bar:
        batch = []
        for doc in iter_documents(files, progress=bar, text_column=text_column):
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch); batch = []
        if batch:
            flush(batch)
    seconds = time.time() - started
    if stats["val"]["docs"] == 0 or stats["train"]["docs"] == 0:
        empty = "val" if stats["val"]["docs"] == 0 else "train"
        raise PocketGPTError(f"The {empty} split is empty ({stats['train']['docs'] + stats['val']['docs']} "
                             f"documents, val_fraction={val_fraction}). Use a larger corpus or adjust val_fraction.")
    def save_stats(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **{k: np.array(v) for k, v in lengths.items()})
    write_file(out_dir / "doc_stats.npz", save_stats)
    v = stats["val"]
    return {
        "train_tokens": stats["train"]["tokens"], "val_tokens": v["tokens"],
        "train_documents": stats["train"]["docs"], "val_documents": v["docs"],
        "val_bytes_per_token": v["bytes"] / (v["tokens"] - 2 * v["docs"]),
        "val_chars_per_token": v["chars"] / (v["tokens"] - 2 * v["docs"]),
        "val_tokens_per_word": (v["tokens"] - 2 * v["docs"]) / max(v["words"], 1),
        "val_bytes": v["bytes"],
        "encode_seconds": seconds, "encode_mb_per_s": total_bytes / 1e6 / max(seconds, 1e-9),
    }


@quiet_library_bars()
def build_tokenizer_stage(cfg: TokenizerConfig) -> Path:
    """Stage 1, whole: scan, train the BPE, save it, encode the splits, write meta and manifest."""
    if cfg.corpus_path is None and on_kaggle():  # the attached corpus.txt (.jsonl, .parquet, ...), wherever it is mounted
        cfg.corpus_path = str(attached_input("corpus", "corpus_path", CORPUS_FORMATS))
    elif cfg.corpus_path is None:
        cfg.corpus_path = str(demo_data(cfg.run_dir) / "corpus.txt")
    files = corpus_files(cfg.corpus_path)
    print(f"corpus_path={cfg.corpus_path}: {files_summary(files)}")
    scan = scan_corpus(files, cfg.on_invalid_utf8, cfg.text_column)
    columns = sorted(set(scan["text_columns"].values()))
    print(f"corpus: {len(files)} file(s), {scan['bytes'] / 1e6:.1f} MB, {scan['documents']:,} documents"
          + (f" from the column {', '.join(columns)} of {scan['rows']:,} rows" if columns else "")
          + (f" ({scan['empty_rows']:,} rows without text skipped)" if scan["empty_rows"] else "")
          + (f", {scan['invalid_utf8_bytes']} invalid UTF-8 bytes replaced" if scan["invalid_utf8_bytes"] else ""))
    inputs = {f"corpus:{f.name}" if len(files) > 1 else "corpus": f for f in files}
    with stage_output(cfg.out_dir, "tokenizer", dataclasses.asdict(cfg), inputs) as work:
        started = time.time()
        with progress(total=scan["bytes"], unit="B", unit_scale=True, desc="train BPE") as bar:  # counting pairs
            tok = train_tokenizer(iter_documents(files, progress=bar, text_column=cfg.text_column), cfg.vocab_size,
                                  scan["documents"])
        train_seconds = time.time() - started
        print(f"trained a {tok.get_vocab_size():,}-token BPE in {train_seconds:.1f}s")
        hf_tok = wrap_tokenizer(tok)
        save_tokenizer(hf_tok, work)
        enc = encode_corpus(files, hf_tok, work, cfg.seed, cfg.val_fraction, scan["bytes"], text_column=cfg.text_column)
        meta = {"vocab_size": tok.get_vocab_size(), "dtype": "uint16",
                "special_tokens": dict(zip(SPECIAL_TOKENS, range(4))),
                "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
                "corpus_bytes": scan["bytes"], "text_bytes": scan["text_bytes"], "documents": scan["documents"],
                "text_columns": scan["text_columns"], "empty_rows": scan["empty_rows"],
                "invalid_utf8_bytes": scan["invalid_utf8_bytes"], **enc}
        write_json(work / "meta.json", meta)
        write_json(work / "metrics.json", {"train_seconds": train_seconds, "train_mb_per_s":
                                          scan["bytes"] / 1e6 / train_seconds, **meta})
    return Path(cfg.out_dir)


def compression_table(stage_dir) -> list[dict]:
    """Rows for the notebook's table: how well the tokenizer compresses held-out text."""
    m = read_json(Path(stage_dir) / "meta.json")
    return [
        {"measure": "bytes per token (val)", "value": f"{m['val_bytes_per_token']:.3f}"},
        {"measure": "characters per token (val)", "value": f"{m['val_chars_per_token']:.3f}"},
        {"measure": "tokens per word (val)", "value": f"{m['val_tokens_per_word']:.3f}"},
        {"measure": "train tokens", "value": f"{m['train_tokens']:,}"},
        {"measure": "val tokens", "value": f"{m['val_tokens']:,}"},
        {"measure": "vocab size", "value": f"{m['vocab_size']:,}"},
    ]


def sample_tokenizations(tok, texts) -> list[dict]:
    """How some ML terms split into tokens: a quick look at what the BPE learned."""
    rows = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        rows.append({"text": text, "n_tokens": len(ids), "tokens": " | ".join(repr(tok.decode([i]))[1:-1] for i in ids)})
    return rows


def read_bin(path) -> np.memmap:
    """Memory-map a uint16 token file (train.bin/val.bin) without reading it."""
    return np.memmap(path, dtype=np.uint16, mode="r")


def decode_documents(ids: np.ndarray, tok) -> list[str]:
    """Split a token stream at <|bos|> and decode each document (a check that nothing was lost)."""
    starts = np.flatnonzero(ids == BOS_ID)
    ends = list(starts[1:]) + [len(ids)]
    return [tok.decode(ids[s + 1:e - 1].tolist()) for s, e in zip(starts, ends)]


# -----------------------------------------------------------------------------
# Model: Hugging Face's GPT2LMHeadModel, so every stage saves a standard folder

@dataclasses.dataclass
class TrainConfig:
    """What the training loop reads: 02's and 03's configurations extend it (defaults: 02 on the t4 profile)."""
    stage: ClassVar[str] = ""
    profile: str = "t4"
    run_dir: str | None = None
    seed: int = 1337
    out_dir: str | None = None
    resume_from: str | None = None        # a stage folder (or its .partial) holding ckpt.pt; "auto": this run's newest
    dropout: float = 0.0
    batch_size: int = 32                  # sequences per device per micro-step
    grad_accum_steps: int = 4
    optimizer: str = "muon"               # muon: Muon for the blocks' weight matrices, AdamW for the rest; or adamw
    learning_rate: float = 6e-4           # AdamW's peak (embeddings, biases, norms; every weight with adamw)
    muon_lr: float = 1.2e-3               # Muon's peak, scaled per matrix to AdamW's update size (match_rms_adamw)
    min_lr: float = 6e-5                  # the end of the schedule (Muon's ends at the same fraction of its peak)
    schedule: str = "wsd"                 # wsd: warmup, constant, then a linear decay; cosine: warmup, then cosine
    decay_fraction: float = 0.2           # wsd: the share of max_steps spent decaying
    warmup_steps: int = 500
    max_steps: int | str = "auto"         # auto: as many steps as fit this session's max_hours, decay included
    max_hours: float = 11.25              # this session's budget: stop cleanly (checkpoint, eval, plots) before it
    log_interval: int = 500
    eval_interval: int = 1000
    checkpoint_minutes: float = 30
    precision: str = "auto"               # auto | fp32 | bf16 | fp16
    compile: str | bool = "auto"          # auto = on a GPU
    log_with: str | list | None = None    # accelerate's trackers to send every log row to: tensorboard, wandb, trackio, ...
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        self.run_dir = str(self.run_dir or default_run_dir(self.profile))
        self.out_dir = str(self.out_dir or Path(self.run_dir) / self.stage)
        check_training_params(self)


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    stage: ClassVar[str] = "pretrain"
    tokenizer_dir: str | None = None      # None: found by manifest (run folder, or /kaggle/input)
    n_layer: int = 10
    n_head: int = 6
    n_embd: int = 384
    n_positions: int = 384
    eval_windows: int = 1024              # val windows in the fixed evaluation sample (all of val when it has fewer)

    def __post_init__(self):
        super().__post_init__()
        check_model_shape(self)


def check_model_shape(cfg) -> None:
    for name in ["n_layer", "n_head", "n_embd", "n_positions"]:
        if int(getattr(cfg, name)) < 1:
            raise PocketGPTError(f"{name}={getattr(cfg, name)} must be a positive integer.")
    if cfg.n_embd % cfg.n_head:
        divisors = [h for h in range(1, 17) if cfg.n_embd % h == 0]
        raise PocketGPTError(f"n_head={cfg.n_head} does not divide n_embd={cfg.n_embd}: "
                             f"use one of {divisors} (or change n_embd).")


def check_trackers(log_with) -> None:
    """accelerate drops a tracker whose package is missing with a log line; here it is an error."""
    from accelerate import utils as acc_utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in [log_with] if isinstance(log_with, str) else list(log_with):
        if name not in LOGGER_TYPE_TO_CLASS:
            raise PocketGPTError(f"log_with={log_with!r}: {name!r} is not one of accelerate's trackers "
                                 f"({', '.join(LOGGER_TYPE_TO_CLASS)}).")
        if not getattr(acc_utils, f"is_{name}_available", lambda: True)():
            raise PocketGPTError(f"log_with={log_with!r}: the {name} package is not installed (pip install {name}).")


def check_training_params(cfg) -> None:
    if cfg.log_with:
        check_trackers(cfg.log_with)
    for name in ["batch_size", "grad_accum_steps", "log_interval", "eval_interval"]:
        if int(getattr(cfg, name)) < 1:
            raise PocketGPTError(f"{name}={getattr(cfg, name)} must be a positive integer.")
    if not 0 <= cfg.dropout < 1:
        raise PocketGPTError(f"dropout={cfg.dropout} must be in [0, 1).")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise PocketGPTError(f"precision={cfg.precision!r}: use 'auto', 'fp32', 'bf16' or 'fp16'.")
    if not 0 < cfg.max_hours:
        raise PocketGPTError(f"max_hours={cfg.max_hours} must be positive.")
    if cfg.optimizer not in ("muon", "adamw"):
        raise PocketGPTError(f"optimizer={cfg.optimizer!r}: use 'muon' or 'adamw'.")
    if cfg.schedule not in ("wsd", "cosine"):
        raise PocketGPTError(f"schedule={cfg.schedule!r}: use 'wsd' (warmup, stable, decay) or 'cosine'.")
    if not 0 < cfg.decay_fraction <= 1:
        raise PocketGPTError(f"decay_fraction={cfg.decay_fraction} must be in (0, 1], e.g. 0.2.")
    if cfg.max_steps not in (None, "auto") and not (isinstance(cfg.max_steps, int) and cfg.max_steps > 0):
        raise PocketGPTError(f"max_steps={cfg.max_steps!r}: use a positive number of steps, or 'auto' to fill "
                             f"this session's max_hours.")


def build_model(vocab_size: int, cfg):
    """A GPT-2 with tied embeddings and SDPA attention; the seed fixes the initial weights."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        attn_implementation="sdpa",
        # GPT-2's tanh GELU as one fused kernel; the default "gelu_new" is the same formula in six
        # elementwise ops, which cost ~15% of a CPU training step
        activation_function="gelu_pytorch_tanh")
    config.n_ctx = cfg.n_positions  # llama.cpp's own converter reads n_ctx; costs nothing
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def count_params(model) -> int:
    """Unique parameters (the tied lm_head is the embedding, counted once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention (PaLM appendix B)."""
    c = model.config
    n = count_params(model) - c.n_positions * c.n_embd  # position embeddings do no matmuls
    return 6 * n + 12 * c.n_layer * c.n_embd * c.n_positions


class LMLoss(nn.Module):
    """Next-token cross-entropy on pre-shifted targets, straight from the hidden states.

    The stock `labels=` path shifts and copies the logits and upcasts them to fp32 before the
    loss; here the targets are already shifted (y = x moved by one) and cross_entropy reads
    the logits as they are, which is what makes the HF model as fast as a plain one.
    Targets of -100 (padding, SFT prompts) are ignored. `padded` batches (SFT: rows padded on the
    right with <pad>) pass their mask: the causal mask already keeps every real token from seeing
    the padding after it, so the loss is the same, and transformers has no padding to warn about.
    Pretraining windows hold no padding and pass none (the fast causal-only attention path).
    """

    stat_names = ()  # what else each step reports besides the loss (DPOLoss: reward accuracy and margin)

    def __init__(self, model, padded: bool = False):
        super().__init__()
        self.model, self.padded = model, padded

    @staticmethod
    def units(y) -> int:
        """What the loss is averaged over: target tokens."""
        return int((y != -100).sum())

    def forward(self, x, y, reduction: str = "mean"):
        mask = (x != PAD_ID).long() if self.padded else None
        h = self.model.transformer(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state  # no KV cache
        logits = self.model.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-100,
                               reduction=reduction)


def answer_logprob(model, x, y):
    """Each row's summed log-probability of its target tokens (those not -100: the answer and <|eos|>)."""
    h = model.transformer(input_ids=x, attention_mask=(x != PAD_ID).long(), use_cache=False).last_hidden_state
    logits = model.lm_head(h)
    nll = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-100, reduction="none")
    return -nll.view(y.shape).sum(1)


class DPOLoss(nn.Module):
    """Direct Preference Optimization (Rafailov et al. 2023), the offline form of RLHF.

    The policy learns to prefer the chosen answer to the rejected one, measured against a frozen
    reference (the SFT model) so it cannot drift far from it:
        loss = -log sigmoid(beta * [(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))])
    A batch stacks the chosen rows, then the rejected rows of the same prompts; only answer tokens
    count (targets are -100 on the prompt and the padding), as in SFT. Each step also reports the
    share of pairs the implicit reward ranks right and the mean reward margin. `rpo_alpha` adds that
    much of the chosen answers' per-token NLL (RPO, as TRL's rpo_alpha): DPO alone can lower the
    likelihood of both answers, and answers grow long.
    """
    stat_names = ("reward_accuracy", "reward_margin")

    def __init__(self, model, reference, beta: float, rpo_alpha: float = 0.0):
        super().__init__()
        self.model, self.reference = model, reference.requires_grad_(False).eval()
        self.beta, self.rpo_alpha = beta, rpo_alpha

    @staticmethod
    def units(y) -> int:
        """What the loss is averaged over: pairs."""
        return y.size(0) // 2

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # the reference is a fixed function: never dropout
        return self

    def forward(self, x, y, reduction: str = "mean"):
        policy = answer_logprob(self.model, x, y)
        with torch.no_grad():
            reference = answer_logprob(self.reference, x, y)
        n = x.size(0) // 2
        chosen, rejected = self.beta * (policy[:n] - reference[:n]), self.beta * (policy[n:] - reference[n:])
        losses = -F.logsigmoid(chosen - rejected)
        if self.rpo_alpha:
            losses = losses - self.rpo_alpha * policy[:n] / (y[:n] != -100).sum(1).clamp(min=1)
        stats = torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean()]).detach()
        return (losses.mean() if reduction == "mean" else losses.sum()), stats


class PlainGPT(nn.Module):
    """The reference for `bench --reference`: a GPT-2 of the same shape in plain PyTorch
    (fused QKV nn.Linear, SDPA, F.cross_entropy on pre-shifted targets), as in nanoGPT."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, n_positions):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd), proj=nn.Linear(n_embd, n_embd),
            ln2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, 4 * n_embd), out=nn.Linear(4 * n_embd, n_embd),
        )) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, x, y):
        B, T = x.shape
        h = self.wte(x) + self.wpe(torch.arange(T, device=x.device))
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(h)).split(h.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b.proj(a.transpose(1, 2).reshape(B, T, -1))
            h = h + b.out(F.gelu(b.fc(b.ln2(h)), approximate="tanh"))
        logits = F.linear(self.ln_f(h), self.wte.weight)  # tied embeddings
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


# -----------------------------------------------------------------------------
# Device and precision

# Dense peak TFLOPS per GPU: (16-bit tensor cores, fp32). T4's 65 is fp16 (it has no bf16 units).
PEAK_TFLOPS = {"H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5), "L40S": (362, 91.6), "L4": (121, 30.3),
               "A10": (125, 31.2), "V100": (125, 15.7), "T4": (65, 8.1), "P100": (18.7, 9.3)}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 matmuls in hardware (measured 1.9x fp32 here at 27M)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def choose_precision(requested: str = "auto") -> str:
    """bf16 on compute capability >= 8.0, fp16 (+GradScaler) on a T4/P100/V100, fp32 or bf16 on a CPU.

    torch.cuda.is_bf16_supported() answers True on a T4, where bf16 is emulated and slow, so the
    decision is made on the compute capability itself.
    """
    if torch.cuda.is_available():
        native_bf16 = torch.cuda.get_device_capability()[0] >= 8
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            raise PocketGPTError(f"precision='bf16': {torch.cuda.get_device_name()} has no native bf16 "
                                 f"(compute capability < 8.0). Use precision='fp16' or 'auto'.")
        return requested
    if requested == "fp16":
        raise PocketGPTError("precision='fp16' needs a GPU; on a CPU use 'auto', 'bf16' or 'fp32'.")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return requested


def peak_flops(device, precision: str) -> float | None:
    """The device's dense peak for the precision in use; None on a CPU (no honest MFU there)."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device), precision)


def peak_for_name(name: str, precision: str) -> float | None:
    """Look a GPU's name up by whole words ("NVIDIA L40S" is not an "L4")."""
    words = set(re.findall(r"[A-Za-z0-9]+", name.upper()))
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in words:
            return (single if precision == "fp32" else half) * 1e12
    return None


def device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast(device, precision: str):
    """bf16/fp16 autocast for the forward pass; a no-op context in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def resolve_compile(setting) -> bool:
    if setting == "auto":
        return torch.cuda.is_available()
    if isinstance(setting, str):
        return setting.lower() in ("true", "1", "yes")
    return bool(setting)


# -----------------------------------------------------------------------------
# Data: memory-mapped token windows, visited in a seeded order, resumable

class TokenWindows:
    """Non-overlapping (T+1)-token windows of a .bin file, in a seeded random order, epoch after epoch.

    The position (epoch, index) is all the state there is, so a checkpoint can resume the data
    exactly. With several processes each takes its own slice of every global batch.
    """

    def __init__(self, path, context: int, batch_size: int, seed: int, vocab_size: int, rank: int = 0, world: int = 1):
        self.path, self.T, self.B, self.seed, self.rank, self.world = Path(path), context, batch_size, seed, rank, world
        self.data = read_bin(path)
        self.n = (len(self.data) - 1) // context
        if self.n < 1:
            raise PocketGPTError(f"{path} holds {len(self.data)} tokens, fewer than one context window of "
                                 f"{context + 1}: use a smaller n_positions or a larger corpus/val_fraction.")
        check_token_ids(self.data, vocab_size, path)
        self.epoch, self.index, self._order = 0, 0, None

    def order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        return self._order[1]

    def next_batch(self):
        picked = []
        while len(picked) < self.B * self.world:
            take = min(self.B * self.world - len(picked), self.n - self.index)
            picked.extend(self.order()[self.index:self.index + take])
            self.index += take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return self.windows(picked[self.rank * self.B:(self.rank + 1) * self.B])

    def windows(self, idx):
        """Inputs and targets (the same tokens moved by one) of the windows numbered idx."""
        rows = np.stack([self.data[i * self.T:i * self.T + self.T + 1] for i in idx]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def eval_batches(self, n_windows: int):
        """The fixed evaluation sample (eval_sample) as batches: the same windows in 02 and 04,
        at every evaluation, spread over the whole split rather than its first pages."""
        idx = eval_sample(self.n, n_windows)
        return [self.windows(idx[i:i + self.B]) for i in range(0, len(idx), self.B)]


EVAL_SEED = 0  # one evaluation sample for every run, stage and seed, so their numbers compare


def eval_sample(n: int, k: int) -> np.ndarray:
    """k of n items spread over all of them by a fixed seed, in order; all n when k >= n."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(EVAL_SEED).choice(n, size=k, replace=False))


def check_token_ids(data: np.ndarray, vocab_size: int, path) -> None:
    """A token id outside the vocabulary would index past the embedding: catch it with a name."""
    chunk = 1 << 24
    for start in range(0, len(data), chunk):
        top = int(data[start:start + chunk].max())
        if top >= vocab_size:
            pos = start + int(np.argmax(data[start:start + chunk] >= vocab_size))
            raise PocketGPTError(f"{path} holds token id {data[pos]} at position {pos}, but the vocabulary has "
                                 f"{vocab_size} tokens: the .bin files and the tokenizer do not belong together. "
                                 f"Run 01_tokenizer again.")


# -----------------------------------------------------------------------------
# Training: one loop for pretraining and SFT (accelerate, accumulation, schedule, budget, checkpoints)

def lr_at(step: int, cfg) -> float:
    """AdamW's learning rate for `step` (Muon's is the same fraction of its own peak).

    A linear warmup, then wsd: constant, and a linear decay over the last decay_fraction of max_steps;
    or cosine: a cosine decay. Both reach min_lr on the last step, and both are pure functions of the
    step, so a resumed run continues the same curve. Before max_steps="auto" is planned (the first
    steps) the rate is the warmup's or the peak.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if not isinstance(cfg.max_steps, int):
        return cfg.learning_rate
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = (step + 1 - (cfg.max_steps - decay_steps)) / decay_steps
        return cfg.learning_rate + min(1.0, max(0.0, progress)) * (cfg.min_lr - cfg.learning_rate)
    progress = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz: g's nearest semi-orthogonal matrix, roughly (U S' V^T with S' ~ 1), in bf16.

    The quintic iteration and coefficients of torch.optim.Muon (Keller Jordan's), in public ops."""
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    return x.T if g.size(0) > g.size(1) else x


MUON_SPLIT_QKV = True  # tools/recipe.py turns it off to measure the fused matrix


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz in bf16, RMS matched to AdamW's:
    0.2 * sqrt(max(rows, cols)), decoupled weight decay), plus one thing it cannot do: GPT-2 fuses
    Q, K and V in one matrix (in x 3*in), and Muon here orthogonalizes it as three square blocks.
    Measured on the demo model, three seeds: 0.6-0.8% lower val loss than the fused matrix (README,
    "Training recipe"). Without a fused matrix it equals torch.optim.Muon to the bit (a test holds
    it so), and it needs no torch >= 2.9. Rows or columns, the update is the same up to transpose:
    HF's Conv1D (in x out) layout needs no special case."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 split_qkv: bool = True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      split_qkv=split_qkv))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                long = int(p.size(1) >= p.size(0))
                if group["split_qkv"] and p.size(long) == 3 * p.size(1 - long):  # Q|K|V side by side
                    update = torch.cat([orthogonalize(b) for b in update.chunk(3, dim=long)], dim=long)
                    scale = 0.2 * p.size(1 - long) ** 0.5  # each block is square
                else:
                    update, scale = orthogonalize(update), 0.2 * max(p.shape) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def make_optimizers(model, cfg, device) -> list:
    """The optimizers of one training step, each param group with its `peak_lr` for the schedule.

    optimizer="muon": Muon for every 2-D weight that is not an embedding (the blocks' attention and
    MLP matrices; the tied lm_head is the token embedding), AdamW for the embeddings, biases and
    norms, as modded-nanogpt and nanochat split them. optimizer="adamw": AdamW for all, weight
    decay on matrices only. Fused kernels for AdamW on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = [p for p in params if cfg.optimizer == "muon" and p.dim() == 2 and id(p) not in embeddings]
    rest = [p for p in params if id(p) not in {id(h) for h in hidden}]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, split_qkv=MUON_SPLIT_QKV) if hidden else None
    optimizers = [adamw] + ([muon] if muon else [])
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers, step: int, cfg) -> float:
    """Every group at the schedule's fraction of its own peak; returns AdamW's rate (the one logged)."""
    lr = lr_at(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr / cfg.learning_rate
    return lr


PLAN_PROBE_STEPS = (5, 20)  # max_steps="auto" times this session's steps 6..20, then plans
FP16_MAX_SKIPS_IN_A_ROW = 25  # GradScaler halves its scale at each skip: 25 in a row means the run diverged


def train_step(acc, loss_fn, optimizers, scaler, batches, grad_clip: float, precision: str):
    """One optimizer step over the micro-batches; gradients sync across GPUs only on the last one.

    fp16 needs the GradScaler: the loss is scaled up so small gradients survive in fp16, the
    gradients are unscaled before clipping, and a step with inf/nan gradients is skipped.
    Returns the mean loss and the loss's other statistics (tensors, so nothing waits for the GPU),
    the gradient norm and the number of real (not padding) input tokens this process trained on.
    """
    total, stats, real = 0.0, 0.0, 0
    for i, (x, y) in enumerate(batches):
        sync = i == len(batches) - 1
        with nullcontext() if sync else acc.no_sync(loss_fn):
            with autocast(acc.device, precision):
                out = loss_fn(x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True))
            loss, step_stats = out if isinstance(out, tuple) else (out, torch.zeros(0, device=acc.device))
            scaler.scale(loss / len(batches)).backward()
        total, stats = total + loss.detach(), stats + step_stats.float() / len(batches)
        real += int((x != PAD_ID).sum())  # x is still on the CPU: no GPU sync
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), grad_clip)
    for opt in optimizers:
        scaler.step(opt)  # skipped (all of them) when fp16 gradients overflowed
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / len(batches), stats, grad_norm, real


def evaluate(loss_fn, batches, device, precision: str = "fp32", units=LMLoss.units) -> float:
    """Mean loss over fixed batches, per target token (per pair for DPO: `units`)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            y = y.to(device)
            out = loss_fn(x.to(device), y, reduction="sum")
            total += float(out[0] if isinstance(out, tuple) else out)
            count += units(y)
    loss_fn.train(was_training)
    return total / max(count, 1)


def rng_state(device) -> dict:
    """This process's random streams (dropout, sampling): each process has its own."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(states: list, acc) -> str | None:
    """Give each process the stream it had, where the checkpoint holds one for it.

    Returns a note when it cannot all be restored: a checkpoint of 2 GPUs resumed on 1 GPU or a
    CPU (or the reverse). The data position does not depend on this and carries over exactly."""
    rank, note = acc.process_index, None
    if len(states) != acc.num_processes:
        fate = (f"those of processes beyond {len(states)} start from the seed" if acc.num_processes > len(states)
                else f"the other {len(states) - acc.num_processes} are not used")
        note = (f"the checkpoint was written by {len(states)} process(es) and this run has {acc.num_processes}: "
                f"the data position carries over; the first {min(len(states), acc.num_processes)} process(es) keep "
                f"their random streams (dropout), {fate}")
    if rank < len(states):
        s = states[rank]
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        torch.set_rng_state(s["torch"])
        cuda = s.get("cuda")
        cuda = cuda[0] if isinstance(cuda, list) and cuda else cuda  # checkpoints before per-process states
        if cuda is not None and acc.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, acc.device)
        elif (cuda is None) != (acc.device.type != "cuda"):
            note = note or "the checkpoint and this run differ in CPU/GPU: the GPU random stream starts from the seed"
    return note


def load_checkpoint(folder) -> dict:
    """ckpt.pt from a stage folder (finished, or the .partial a stopped run left)."""
    path = Path(folder) / "ckpt.pt"
    if not path.is_file():
        raise PocketGPTError(f"resume_from={folder}: no ckpt.pt there. Point it at a pretrain/sft folder "
                             f"(or its .partial) written by an earlier run.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states inside
    except Exception as e:
        raise PocketGPTError(f"{path} cannot be read ({type(e).__name__}: {e}); it may be truncated. "
                             f"Resume from an earlier copy or start again.") from None


LOG_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
               "skipped_steps", *DPOLoss.stat_names]


def write_log(path: Path, rows: list[dict]) -> None:
    """log.csv, rewritten whole at each row through the one door (rank 0, atomic): a resumed run
    carries its earlier rows in the checkpoint, so nothing is appended twice."""
    write_file(path, csv_text(LOG_COLUMNS, [["" if r.get(k) is None else r[k] for k in LOG_COLUMNS] for r in rows]))


def agree(acc, *flags: bool) -> list[bool]:
    """Each flag, true on every process if it is true on any: each process reads its own clock,
    but all must stop (or checkpoint) at the same step, or the next collective call would wait
    forever. One small all-reduce for all the flags."""
    if acc.num_processes == 1:
        return list(flags)
    votes = acc.reduce(torch.tensor([float(f) for f in flags], device=acc.device), "sum")
    return [bool(v > 0) for v in votes.tolist()]


def out_of_memory(stage: str, cfg) -> PocketGPTError:
    """What to lower when a batch does not fit the GPU: the same tokens per step in smaller pieces."""
    return PocketGPTError(
        f"{stage}: out of GPU memory with batch_size={cfg.batch_size}. Try batch_size={max(1, cfg.batch_size // 2)} "
        f"with grad_accum_steps={cfg.grad_accum_steps * 2} (the same tokens per step).")


def train(model, train_data, val_batches, cfg, work: Path, resume: dict | None = None,
          deadline: float | None = None, stop_at_step: int | None = None, stage: str = "pretrain",
          loss_module: nn.Module | None = None) -> dict:
    """The loop both stages share. Returns the final numbers; writes log.csv and ckpt.pt into `work`.

    Stops at max_steps, or when this session's budget would run out: `deadline` is a time.time()
    (the stage's start + max_hours), and the loop keeps back the time the final evaluation,
    checkpoint and save need. The budget is this session's alone; the hours of earlier sessions
    are carried for the report only. `stop_at_step` cuts a run short for the resume tests.
    `loss_module` is what trains `model` (LMLoss by default; DPOLoss for preference tuning).
    Logging (log_interval steps), evaluation (eval_interval steps) and checkpoints
    (checkpoint_minutes of wall time) each keep their own cadence.
    """
    precision, compiled = choose_precision(cfg.precision), resolve_compile(cfg.compile)
    # device placement and multi-process DDP (cpu=True lets torchrun run several CPU processes on gloo);
    # precision is ours, explicit below
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.log_with,
                      project_dir=str(work / "trackers") if cfg.log_with else None)
    if cfg.log_with:  # the trackers get the config once and every log row (tensorboard: <stage>/trackers/<stage>)
        acc.init_trackers(stage, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                         for k, v in dataclasses.asdict(cfg).items()})
    set_seed(cfg.seed, device_specific=True)  # a dropout stream per process; rank 0 keeps the seed's
    deadline = deadline or time.time() + cfg.max_hours * 3600
    auto_plan = cfg.max_steps == "auto"  # this session sets max_steps to what fits its budget, decay included
    train_data.rank, train_data.world = acc.process_index, acc.num_processes
    model.to(acc.device)
    optimizers = make_optimizers(model, cfg, acc.device)
    kinds = ["adamw", "muon"][:len(optimizers)]
    scaler = torch.amp.GradScaler(acc.device.type, enabled=precision == "fp16")
    step, tokens, log_rows, hours_before, saved_window = 0, 0, [], 0.0, None
    if resume:
        model.load_state_dict(resume["model"])
        saved = resume["optimizer"] if isinstance(resume["optimizer"], list) else [resume["optimizer"]]
        saved_kinds = resume.get("optimizers", ["adamw"])  # checkpoints from before Muon hold one AdamW
        if saved_kinds != kinds:
            raise PocketGPTError(f"resume_from: that run trained with {' + '.join(saved_kinds)}, "
                                 f"this one would use {' + '.join(kinds)}: set optimizer="
                                 f"{'muon' if 'muon' in saved_kinds else 'adamw'!r} to resume it.")
        for opt, state in zip(optimizers, saved):
            opt.load_state_dict(state)
        if cfg.max_steps == "auto" and isinstance(resume["config"].get("max_steps"), int):
            cfg.max_steps = resume["config"]["max_steps"]  # the plan the run was started with
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        train_data.load_state(resume["data"])
        step, tokens, log_rows = resume["step"], resume.get("tokens", 0), list(resume.get("log", []))
        hours_before = resume.get("hours", resume.get("elapsed_s", 0.0) / 3600)
        saved_window = resume.get("window")
    loss_fn = loss_module = loss_module or LMLoss(model)
    loss_module.to(acc.device)
    if compiled:  # before the DDP wrap, as nanoGPT does; batches of varying shape (SFT, DPO) compile
        # with dynamic shapes at once: a train and an eval graph, not a recompile per new shape (measured on 03)
        loss_fn = torch.compile(loss_fn, dynamic=True if getattr(train_data, "variable_shapes", False) else None)
    loss_fn, *optimizers = acc.prepare(loss_fn, *optimizers)
    if resume:
        rng = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]
        note = restore_rng(rng, acc)
        if note and acc.is_main_process:
            print(f"resume: {note}")
    flops, peak = flops_per_token(model), peak_flops(acc.device, precision)
    peak = peak * acc.num_processes if peak else None
    log_path, ckpt_path = work / "log.csv", work / "ckpt.pt"
    session_started, session_first_step = time.time(), step
    budget_s = max(0.0, deadline - session_started)
    val_tokens = sum(int((y != -100).sum()) for _, y in val_batches)
    timing = {"step": 0.0, "tokens_per_s": math.inf, "eval": None, "ckpt": 0.0, "last_ckpt": time.time()}
    # the log window: loss sum, finite steps, non-finite steps (as tensors: no sync per step), tokens
    window = torch.zeros(3 + len(loss_module.stat_names), dtype=torch.float64, device=acc.device)  # + the loss's stats
    window_tokens, window_steps, window_skipped, window_started = 0, 0, 0, time.time()
    session_tokens = 0  # this process's real tokens this session (for the plan)
    if saved_window and acc.is_main_process:  # a checkpoint taken mid-window: its sums over all processes
        window += torch.tensor(saved_window["sums"], dtype=torch.float64, device=acc.device)
        window_tokens = int(saved_window["tokens"])
    if saved_window:
        window_steps, window_skipped = saved_window.get("steps", 0), saved_window["skipped"]
        window_started = time.time() - saved_window["seconds"]
    skipped_total, skips_in_a_row = resume.get("skipped_steps", 0) if resume else 0, 0
    scale = scaler.get_scale() if scaler.is_enabled() else None
    stop_reason, val_loss, lr = "max_steps", None, lr_at(step, cfg)
    probe = {}  # max_steps="auto": the clock and tokens at the start of the timed steps
    pace = {}  # the clock and step the current step time is measured from (per_step_seconds)

    def planned() -> bool:
        return isinstance(cfg.max_steps, int)

    def per_step_seconds() -> float:
        """What a step costs now, its share of the periodic evaluations included: the slower of the last log
        window and the steps since (a machine that slows down, a T4 dropping its clock, shows there first;
        warm-up and compiling come before the first mark)."""
        recent = (time.time() - pace["t"]) / (step - pace["step"]) if pace and step - pace["step"] >= 5 else 0.0
        eval_s = timing["eval"] if timing["eval"] is not None else val_tokens / (3 * timing["tokens_per_s"])
        return max(timing["step"], recent) + eval_s / cfg.eval_interval

    def steps_that_fit() -> int:
        """The step this session can reach: its budget left, less the end's reserve, over the time per
        step (per_step_seconds). The same on every process."""
        fit = torch.tensor([step + max(1, int(0.97 * (deadline - time.time() - reserve()) / per_step_seconds()))])
        return int(acc.gather(fit.to(acc.device)).min()) if acc.num_processes > 1 else int(fit)

    def plan_line() -> str:
        tokens_per_step = timing["tokens_per_s"] * timing["step"]
        end = datetime.fromtimestamp(time.time() + (cfg.max_steps - step) * timing["step"]).strftime("%H:%M")
        decay = (f"the last {max(1, round(cfg.decay_fraction * cfg.max_steps)):,} decaying" if cfg.schedule == "wsd"
                 else "cosine decay")
        total = tokens_per_step * cfg.max_steps
        total = f"{total / 1e6:,.1f}M" if total >= 1e6 else f"{total:,.0f}"
        return (f"plan (max_steps='auto'): {cfg.max_steps:,} steps, about {total} tokens, {decay}; ends about {end}, "
                f"inside this session's {duration(cfg.max_hours * 3600)}")

    def hours() -> float:
        return hours_before + (time.time() - session_started) / 3600

    def reserve() -> float:
        """Seconds the end of the session needs: a last step, the final evaluation, two checkpoints
        (the last one and the HF folder), plus a margin. Before the first evaluation it is estimated
        from the step time (a forward pass is about a third of a training step)."""
        eval_s = timing["eval"] if timing["eval"] is not None else val_tokens / (3 * timing["tokens_per_s"])
        return 2 * timing["step"] + 1.5 * eval_s + 2 * timing["ckpt"] + min(120.0, max(1.0, 0.02 * budget_s))

    def close_window() -> dict:
        """Sum the window over all processes (the one sync per log row) and start a new one."""
        nonlocal window_tokens, window_steps, window_skipped, window_started, tokens
        sums = window_sums()
        (loss_sum, n_ok, _), stat_sums, n_tokens = sums[:3], sums[3:-1], sums[-1]
        dt = max(time.time() - window_started, 1e-9)
        timing["step"], timing["tokens_per_s"] = dt / max(1, window_steps), max(n_tokens / dt, 1.0)
        tokens += int(n_tokens)
        row = {"step": step, "tokens": tokens, "train_loss": round(loss_sum / n_ok, 4) if n_ok else None,
               "lr": f"{lr:.3e}", "tokens_per_s": round(n_tokens / dt), "skipped_steps": window_skipped,
               "mfu": round(flops * n_tokens / dt / peak, 4) if peak else None, "elapsed_s": round(hours() * 3600, 1),
               **{name: round(v / n_ok, 4) for name, v in zip(loss_module.stat_names, stat_sums) if n_ok}}
        window.zero_()
        window_tokens, window_steps, window_skipped, window_started = 0, 0, 0, time.time()
        pace.update(t=window_started, step=step)
        return row

    def window_sums() -> list[float]:
        sums = acc.reduce(torch.cat([window, torch.tensor([float(window_tokens)], dtype=torch.float64,
                                                           device=acc.device)]), "sum").tolist()
        if sums[2] and precision != "fp16":  # fp16's GradScaler skips such steps; fp32/bf16 cannot recover
            raise PocketGPTError(
                f"{stage}: the training loss is inf or nan by step {step} ({int(sums[2])} such step(s) since the last "
                f"log row). The last good checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Lower learning_rate "
                f"(now {cfg.learning_rate}) or use precision='fp32', and resume_from that folder.")
        return sums

    def save_ckpt() -> None:
        """Every process takes part (the window sums and the random streams are gathered); rank 0 writes."""
        nonlocal window_started
        started = time.time()
        sums = window_sums()
        rngs = gather_object([rng_state(acc.device)]) if acc.num_processes > 1 else [rng_state(acc.device)]
        if acc.is_main_process:
            state = {"model": model.state_dict(), "optimizer": [opt.state_dict() for opt in optimizers],
                     "optimizers": kinds,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                     "data": train_data.state(), "rng": rngs, "config": dataclasses.asdict(cfg),
                     "model_config": model.config.to_dict(), "log": log_rows, "stage": stage, "tokens": tokens,
                     "hours": hours(), "skipped_steps": skipped_total, "val_loss": val_loss,
                     "window": {"sums": sums[:-1], "tokens": sums[-1], "steps": window_steps,
                                "skipped": window_skipped, "seconds": time.time() - window_started}}
            write_file(ckpt_path, torch_file(state), needed=tensor_bytes(state))
        acc.wait_for_everyone()
        timing["ckpt"], timing["last_ckpt"] = time.time() - started, time.time()
        window_started += timing["ckpt"]  # tokens/s and the step time measure training, not writing
        if pace:
            pace["t"] += timing["ckpt"]

    def track(row: dict) -> None:
        """The row's numbers to accelerate's trackers (rank 0 only, as accelerate does)."""
        if cfg.log_with:
            acc.log({k: float(v) for k, v in row.items() if k != "step" and is_number(v)}, step=int(row["step"]))

    def log_line(row: dict) -> None:
        left = max(0.0, deadline - time.time())
        left = min((cfg.max_steps - step) * timing["step"], left) if planned() else left
        if acc.is_main_process:
            tqdm.write(f"step {step}/{cfg.max_steps}"
                       + (f" loss {row['train_loss']:.4f}" if row.get("train_loss") is not None else "")
                       + (f" val {row['val_loss']:.4f}" if row.get("val_loss") is not None else "")
                       + f" lr {lr:.2e} gnorm {row.get('grad_norm') or 0:.2f} {row['tokens_per_s']:,} tok/s"
                       + (f" mfu {row['mfu']:.1%}" if row.get("mfu") else "")
                       + (f" skipped {row['skipped_steps']}" if row.get("skipped_steps") else "")
                       + f" | {duration(left)} left this session")

    # a live bar where someone watches; a headless run has the log lines (with the time left) alone
    bar = tqdm(total=cfg.max_steps if planned() else None, initial=step, desc=stage, unit="step",
               disable=not (acc.is_main_process and watched()))
    try:
        while not planned() or step < cfg.max_steps:
            if stop_at_step is not None and step >= stop_at_step:
                stop_reason = "stopped"
                break
            now = time.time()
            behind = (auto_plan and planned() and step > session_first_step  # the plan no longer fits the budget
                      and (cfg.max_steps - step) * per_step_seconds() > deadline - now - reserve())
            out_of_time, ckpt_due, behind = agree(acc, now + reserve() > deadline and step > session_first_step,
                                                  now - timing["last_ckpt"] > cfg.checkpoint_minutes * 60, behind)
            if behind and not out_of_time:  # slower than planned: end sooner, still on a decayed last step
                cfg.max_steps = max(step + 1, steps_that_fit())
                bar.total = cfg.max_steps
                if acc.is_main_process:
                    tqdm.write(f"re-planned: {plan_line()}")
            if out_of_time:
                stop_reason = "time_budget"
                break
            if ckpt_due:
                save_ckpt()
            lr = set_lr(optimizers, step, cfg)
            batches = [train_data.next_batch() for _ in range(cfg.grad_accum_steps)]
            loss, stats, grad_norm, real = train_step(acc, loss_fn, optimizers, scaler, batches, cfg.grad_clip, precision)
            step += 1
            ok = torch.isfinite(loss)
            window += torch.cat([torch.stack([torch.where(ok, loss, 0.0).double(), ok.double(), (~ok).double()]),
                                 stats.double()])
            window_tokens, window_steps, session_tokens = window_tokens + real, window_steps + 1, session_tokens + real
            if auto_plan and not planned() and step - session_first_step in PLAN_PROBE_STEPS:
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                if step - session_first_step == PLAN_PROBE_STEPS[0]:  # the first steps pay for warm-up and compiling
                    probe.update(t=time.time(), tokens=session_tokens)
                    pace.update(t=probe["t"], step=step)
                else:
                    dt = time.time() - probe["t"]
                    timing["step"] = dt / (PLAN_PROBE_STEPS[1] - PLAN_PROBE_STEPS[0])
                    timing["tokens_per_s"] = max(1.0, (session_tokens - probe["tokens"]) * acc.num_processes / dt)
                    cfg.max_steps = steps_that_fit()
                    bar.total = cfg.max_steps
                    if acc.is_main_process:
                        tqdm.write(plan_line())
            if scale is not None:  # fp16: the scale drops exactly when GradScaler skipped the step
                new_scale = scaler.get_scale()  # one GPU sync per step, in fp16 only
                skipped, scale = new_scale < scale, new_scale
                skips_in_a_row = skips_in_a_row + 1 if skipped else 0
                window_skipped, skipped_total = window_skipped + skipped, skipped_total + skipped
                if skips_in_a_row >= FP16_MAX_SKIPS_IN_A_ROW:
                    raise PocketGPTError(
                        f"{stage}: the fp16 loss or gradients stayed inf/nan for {skips_in_a_row} steps in a row "
                        f"(up to step {step}; GradScaler skipped each). The last good checkpoint "
                        f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Lower learning_rate "
                        f"(now {cfg.learning_rate}) and resume_from that folder.")
            bar.update(1)
            log_now, eval_now = step % cfg.log_interval == 0, step % cfg.eval_interval == 0
            if log_now or eval_now or step == cfg.max_steps:
                row = close_window()
                row["grad_norm"] = round(float(grad_norm), 3)
                if eval_now or step == cfg.max_steps:
                    t_eval = time.time()
                    val_loss = evaluate(loss_fn, val_batches, acc.device, precision, loss_module.units)
                    timing["eval"] = time.time() - t_eval
                    window_started += timing["eval"]  # tokens/s and the step time measure training alone
                    pace["t"] += timing["eval"]
                    row["val_loss"] = round(val_loss, 4)
                log_rows.append(row)
                write_log(log_path, log_rows)
                track(row)
                bar.set_postfix(loss=row["train_loss"], tok_s=f"{row['tokens_per_s']:,}")
                log_line(row)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(stage, cfg) from None
    finally:
        bar.close()
    # final evaluation and checkpoint, whatever stopped the loop
    if not log_rows or log_rows[-1]["step"] != step or log_rows[-1].get("val_loss") is None:
        if log_rows and log_rows[-1]["step"] == step:
            row = log_rows.pop()
        else:  # a stop before max_steps: the train-loss window stays open and goes into the checkpoint,
            # so a resumed run logs the same rows as one that was never interrupted
            row = {"step": step, "tokens": tokens + int(window_sums()[-1]), "lr": f"{lr:.3e}",
                   "elapsed_s": round(hours() * 3600, 1)}
        try:
            val_loss = evaluate(loss_fn, val_batches, acc.device, precision, loss_module.units)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory(stage, cfg) from None
        row["val_loss"] = round(val_loss, 4)
        log_rows.append(row)
        track(row)
    elif val_loss is None:  # a finished run resumed again: nothing left to train, its numbers are the checkpoint's
        val_loss = resume.get("val_loss", log_rows[-1]["val_loss"])
    write_log(log_path, log_rows)  # also where a finished run is resumed into a new folder
    save_ckpt()
    if cfg.log_with:
        acc.end_training()
    tokens += int(window_sums()[-1])  # the tokens of a window left open
    rates = [r["tokens_per_s"] for r in log_rows if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in log_rows if r.get("mfu")]
    return {"steps": step, "tokens": tokens, "final_val_loss": val_loss, "val_tokens_evaluated": val_tokens,
            "final_train_loss": next((r["train_loss"] for r in reversed(log_rows) if r.get("train_loss") is not None), None),
            "tokens_per_s": float(np.median(rates)) if rates else None,
            "mfu": float(np.median(mfus)) if mfus else None, "params": count_params(model),
            "flops_per_token": flops, "precision": precision, "compiled": compiled, "skipped_steps": skipped_total,
            "device": device_name(acc.device), "processes": acc.num_processes, "stop_reason": stop_reason,
            "finished": planned() and step >= cfg.max_steps, "hours": hours(), "max_steps": cfg.max_steps,
            "planned": auto_plan, "optimizers": kinds,
            "session_hours": (time.time() - session_started) / 3600, "session_steps": step - session_first_step,
            "is_main_process": acc.is_main_process, "model": model}


def save_hf_folder(model, tokenizer, out_dir) -> None:
    """A standard save_pretrained folder in fp32 (transformers 5 reloads in the saved dtype)."""
    model = model.float()
    tokenizer.model_max_length = model.config.n_positions
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS_ID, EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.config.use_cache = model.generation_config.use_cache = True  # users generate: keep the KV cache on

    def fill(tmp):
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    write_folder(out_dir, fill, needed=tensor_bytes(model.state_dict()))


# -----------------------------------------------------------------------------
# Stage 2: pretraining

def partial_dir(out_dir) -> Path:
    """Where a stage works until it is done: `<out_dir>.partial`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def newest_checkpoint(folders) -> Path | None:
    """Of these folders with a ckpt.pt, the one whose checkpoint was written last (03's preference
    phase keeps its own in preference/), or None."""
    found = [Path(f) for f in folders if (Path(f) / "ckpt.pt").is_file()]
    return max(found, key=lambda f: newest_ckpt_file(f).stat().st_mtime) if found else None


def newest_ckpt_file(folder) -> Path:
    """The checkpoint a resume starts from: ckpt.pt, or preference/ckpt.pt when that is newer."""
    found = [c for c in [Path(folder) / "ckpt.pt", Path(folder) / "preference" / "ckpt.pt"] if c.is_file()]
    return max(found, key=lambda c: c.stat().st_mtime)


def resolve_resume(resume_from, stage: str, out_dir) -> Path | None:
    """The folder to resume from, or None for a fresh run.

    "auto": the newer checkpoint of this stage's folder and its .partial (a run killed after it
    resumed has a .partial newer than the finished folder it started from). A folder: that one,
    or the .partial beside it when that is newer (after a crash only the .partial exists). None:
    a fresh run here; on Kaggle, the newest of an attached earlier run and this session's own.
    """
    out_dir = Path(out_dir)
    if resume_from == "auto":
        return newest_checkpoint([out_dir, partial_dir(out_dir)])
    if resume_from:
        folder = Path(resume_from)
        found = newest_checkpoint([folder] if folder.name.endswith(".partial") else [folder, partial_dir(folder)])
        if found is None:
            raise PocketGPTError(f"resume_from={resume_from}: no ckpt.pt there (nor in {partial_dir(folder).name}). "
                                 f"Point it at a {stage} folder written by an earlier run, or use 'auto'.")
        return found
    if on_kaggle():
        try:
            attached = [find_stage(stage)]
        except PocketGPTError:
            attached = []
        return newest_checkpoint(attached + [out_dir, partial_dir(out_dir)])
    return None


@quiet_library_bars()
def run_pretrain_stage(cfg: PretrainConfig, stop_at_step: int | None = None) -> Path:
    """Stage 2, whole: data, model, the loop, then checkpoint, HF folder, log, plot, metrics."""
    deadline = time.time() + cfg.max_hours * 3600  # this session's budget counts from the stage's start
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    tokenizer = load_tokenizer(tok_dir)
    meta = read_json(tok_dir / "meta.json")
    resume_dir = resolve_resume(cfg.resume_from, "pretrain", cfg.out_dir)
    resume = load_checkpoint(resume_dir) if resume_dir else None
    if resume:
        old = resume["config"]
        for name in ["n_layer", "n_head", "n_embd", "n_positions"]:
            if old[name] != getattr(cfg, name):
                raise PocketGPTError(f"resume_from={resume_dir}: that run has {name}={old[name]}, these parameters "
                                     f"say {getattr(cfg, name)}. Use the same model shape to resume.")
        if is_main_process():
            print(f"resuming {resume_dir} at step {resume['step']} of {cfg.max_steps} "
                  f"(this session's budget: {duration(cfg.max_hours * 3600)})")
    train_data = TokenWindows(tok_dir / "train.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    val_data = TokenWindows(tok_dir / "val.bin", cfg.n_positions, cfg.batch_size, cfg.seed, meta["vocab_size"])
    model = build_model(meta["vocab_size"], cfg)
    inputs = {"tokenizer": tok_dir, **({"resumed_from": resume_dir / "ckpt.pt"} if resume else {})}
    with stage_output(cfg.out_dir, "pretrain", dataclasses.asdict(cfg), inputs, resume_dir) as work:
        result = train(model, train_data, val_data.eval_batches(cfg.eval_windows), cfg, work, resume, deadline,
                       stop_at_step)
        if not result.pop("is_main_process"):
            return Path(cfg.out_dir)
        model = result.pop("model")
        save_hf_folder(model, tokenizer, work / "model")
        write_json(work / "metrics.json", {**result, "train_tokens_available": meta["train_tokens"],
                                           "epochs": result["tokens"] / max(meta["train_tokens"], 1)})
        plot_losses({"pretrain": work / "log.csv"}, work / "loss.png", show=False)
    return Path(cfg.out_dir)


def describe_pretrain(cfg: PretrainConfig) -> dict:
    """What is about to be trained: size, FLOPs per token, tokens per step, data. Touches no GPU
    (notebook_launcher needs CUDA untouched before it starts the processes)."""
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    meta = read_json(tok_dir / "meta.json")
    model = build_model(meta["vocab_size"], cfg)
    gpus = torch.cuda.device_count()
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.n_positions * max(gpus, 1)
    return {"tokenizer": str(tok_dir), "vocab_size": meta["vocab_size"], "parameters": count_params(model),
            "flops_per_token": flops_per_token(model), "tokens_per_step": tokens_per_step,
            "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
            "epochs_at_max_steps": (round(tokens_per_step * cfg.max_steps / meta["train_tokens"], 2)
                                    if isinstance(cfg.max_steps, int) else "auto: set by this session's budget"),
            "optimizer": cfg.optimizer,
            "schedule": cfg.schedule,
            "gpus": gpus, "cpu_native_bf16": cpu_has_native_bf16()}


def launch(fn, *args):
    """Run a stage on every GPU: notebook_launcher inside a notebook when there are several
    (Kaggle's T4 x2), a plain call otherwise (`accelerate launch` starts the processes itself)."""
    n = torch.cuda.device_count()
    if n > 1 and "WORLD_SIZE" not in os.environ and "ipykernel" in sys.modules:
        notebook_launcher(fn, args, num_processes=n)
        return None
    return fn(*args)


# -----------------------------------------------------------------------------
# Stage 3: supervised finetuning on instruction/response pairs, loss on the response only

CHAT_TEMPLATE = (  # the seed's format: <|bos|>Instruction: {prompt}\nResponse: {answer}<|eos|>, turn after turn;
    # a system text goes before the next instruction, as training reads it (conversation_texts)
    "{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '<|bos|>Instruction: ' + ns.system + m['content'] + '\\n' }}"
    "{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ 'Response: ' + m['content'] + '<|eos|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Response:' }}{% endif %}")
DIALOG_FORMATS = ("csv", "json", "parquet", "arrow", "saved")
CHAT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
COLUMN_PAIRS = [("question", "answer"), ("instruction", "response"), ("prompt", "completion"),
                ("input", "output"), ("prompt", "response"), ("instruction", "output"), ("query", "response"),
                ("question", "response"), ("user", "assistant")]


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    stage: ClassVar[str] = "sft"
    pretrain_dir: str | None = None       # None: found by manifest
    dialogs_path: str | None = None       # CSV, JSONL, Parquet (a file, folder or glob); None: the demo dialogs
    prompt_column: str | None = None      # None: detected (question/answer, instruction/response, ...)
    response_column: str | None = None
    epochs: float = 3
    batch_size: int = 64
    grad_accum_steps: int = 1
    optimizer: str = "adamw"              # finetuning keeps AdamW (not measured against Muon here)
    learning_rate: float = 1e-4
    min_lr: float | None = None           # None: learning_rate / 10
    schedule: str = "cosine"
    warmup_steps: int | None = None       # None: 3% of the steps
    max_steps: int | None = None          # None: epochs x batches per epoch (set once the data is read)
    val_fraction: float = 0.05
    too_long: str = "truncate"            # rows longer than the context: "truncate" the answer or "drop"
    log_interval: int = 100
    eval_interval: int = 1000
    eval_rows: int = 2000                 # held-out rows in the fixed evaluation sample (all when there are fewer)
    weight_decay: float = 0.0
    dropout: float = 0.0                  # applied to the pretrained model's dropout layers during SFT
    preference: str | None = None         # a second phase, DPO: None (off); "self": the SFT model's own answers
                                          # as the rejected ones; or a file of prompt, chosen, rejected
    beta: float = 0.1                     # DPO: how far the tuned model may move from the SFT model (lower: farther)
    rpo_alpha: float = 0.0                # DPO: plus this much of the chosen answers' NLL (RPO)
    preference_learning_rate: float = 5e-5
    preference_epochs: float = 1
    preference_rows: int = 2000           # "self": pairs built from this many training prompts

    def __post_init__(self):
        self.min_lr = self.learning_rate / 10 if self.min_lr is None else self.min_lr
        super().__post_init__()
        if self.too_long not in ("truncate", "drop"):
            raise PocketGPTError(f"too_long={self.too_long!r}: use 'truncate' or 'drop'.")
        if not self.epochs > 0:
            raise PocketGPTError(f"epochs={self.epochs} must be positive.")
        if self.preference not in (None, "self") and not (Path(self.preference).is_file()
                                                          or data_format(self.preference) == "saved"):
            raise PocketGPTError(f"preference={self.preference!r}: use None, 'self' (pairs from the SFT model's own "
                                 f"answers) or the path of a file (CSV, JSONL, Parquet) with prompt, chosen and "
                                 f"rejected columns.")
        if not self.beta > 0:
            raise PocketGPTError(f"beta={self.beta} must be positive, e.g. 0.1.")


def dialog_files(dialogs_path, run_dir) -> list[Path]:
    """The dialog files (CSV, JSONL, Parquet, Arrow, save_to_disk folders): a file, a folder or a glob;
    None = the demo dialogs (on Kaggle: the one attached dialogs.csv, dialogs.jsonl, ...)."""
    if dialogs_path is None:
        dialogs_path = str(attached_input("dialogs", "dialogs_path", DIALOG_FORMATS) if on_kaggle()
                           else demo_data(run_dir) / "dialogs.csv")
    return data_files(dialogs_path, "dialogs_path", DIALOG_FORMATS, "Pass the file of instruction/response pairs "
                      "or chats (CSV, JSONL, Parquet; on Kaggle, attach its dataset).")


def detect_columns(columns, prompt_column=None, response_column=None, file="") -> tuple[str, str]:
    """The prompt and response columns: as given, or the first known pair (any case)."""
    lower = {c.strip().lower(): c for c in columns}
    if prompt_column or response_column:
        for name, param in [(prompt_column, "prompt_column"), (response_column, "response_column")]:
            if name is None or name not in columns:
                raise PocketGPTError(f"{file}: {param}={name!r} is not a column; the columns are {list(columns)}. "
                                     f"Set both prompt_column and response_column.")
        return prompt_column, response_column
    for p, r in COLUMN_PAIRS:
        if p in lower and r in lower:
            return lower[p], lower[r]
    raise PocketGPTError(f"{file}: no prompt/response columns found among {list(columns)}. Name them with "
                         f"prompt_column=... and response_column=... (known pairs: "
                         f"{', '.join('/'.join(pr) for pr in COLUMN_PAIRS[:4])}, ...), or give the file a chat "
                         f"column (messages, conversations) or Alpaca's instruction/input/output.")


def detect_layout(columns, prompt_column=None, response_column=None, file="") -> tuple[str, list[str]]:
    """Which of the four layouts a dialog file is in, and the columns it is read from: chat `messages`
    (role/content), ShareGPT `conversations` (from/value), Alpaca's instruction/input/output, or a
    prompt/response pair of columns ("question/answer": named, or found by detect_columns)."""
    lower = {c.strip().lower(): c for c in columns}
    if not (prompt_column or response_column):
        for layout in ("messages", "conversations"):
            if layout in lower:
                return layout, [lower[layout]]
        if {"instruction", "input", "output"} <= set(lower):
            return "alpaca", [lower[c] for c in ("instruction", "input", "output")]
    return "question/answer", list(detect_columns(columns, prompt_column, response_column, file))


def table_rows(file, holds: str):
    """A dialog or preference file's columns, and its rows as (where, {column: value}), streamed."""
    fmt = data_format(file, "csv")
    parts, columns = open_table(file, fmt)
    if not columns:
        raise PocketGPTError(f"{file} is empty: it needs {'a header row and ' if fmt == 'csv' else ''}{holds}.")

    def rows():
        for start, batch in iter_table(parts, file, fmt, columns):
            for k in range(len(batch[columns[0]])):
                yield row_place(file, fmt, start + k), {c: batch[c][k] for c in columns}
    return columns, rows()


def cell_text(value, where: str, column: str) -> str:
    """A cell as text, stripped: None is empty, a number is written out, a list or a record is an error."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        raise PocketGPTError(f"{where}: the {column!r} cell is a {type(value).__name__}, not text. Check which "
                             f"columns hold the text (prompt_column, response_column), or use a chat layout.")
    return str(value).strip()


def message_parts(m) -> tuple:
    """A chat message's role and text: role/content (chat) or from/value (ShareGPT); (None, None) for
    something that is not a message."""
    if not isinstance(m, dict):
        return None, None
    return m.get("role") or m.get("from"), m["content"] if m.get("content") is not None else m.get("value")


def conversation_texts(messages, where: str, column: str) -> list[str]:
    """A chat cell as its texts, user and assistant in turn: [u1, a1, u2, a2, ...].

    Messages are role/content (chat) or from/value (ShareGPT: human, gpt), as a list or its JSON text.
    A system text goes before the next user text, a blank line between, as CHAT_TEMPLATE renders it.
    Another role, or turns out of order, is an error that names the message."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise PocketGPTError(f"{where}: the {column!r} cell is not a JSON list of messages ({e}).") from None
    if not isinstance(messages, (list, tuple)):
        raise PocketGPTError(f"{where}: the {column!r} cell is a {type(messages).__name__}, not a list of messages "
                             f"(records with role and content, or from and value).")
    texts, system = [], []
    for k, m in enumerate(messages, 1):
        role, content = message_parts(m)
        kind = CHAT_ROLES.get(str(role).strip().lower())
        if kind is None:
            raise PocketGPTError(f"{where}: message {k} of the {column!r} cell has the role {role!r}. pocketGPT learns "
                                 f"from system, user and assistant turns (ShareGPT: system, human, gpt): map or "
                                 f"remove the others.")
        text = cell_text(content, where, column)
        if kind == "system":
            system.append(text)
            continue
        expected = "user" if len(texts) % 2 == 0 else "assistant"
        if kind != expected:
            raise PocketGPTError(f"{where}: message {k} of the {column!r} cell is the {kind}'s where the {expected}'s "
                                 f"turn belongs. Turns must alternate user, assistant, starting with user: merge or "
                                 f"remove it.")
        texts.append("\n\n".join(system + [text]) if kind == "user" else text)
        system = system if kind == "assistant" else []
    return texts


def read_dialogs(files, prompt_column=None, response_column=None) -> tuple[list[tuple], dict]:
    """Read every file into (prompt, response) examples, stripped, without empty ones or exact duplicates.

    A row is one example; a chat row is one per assistant turn, whose prompt is the conversation before
    it: (u1, a1, ..., un), or the instruction alone for the first turn (as every other layout gives).
    Alpaca's instruction and a non-empty input form the prompt, a blank line between. The report counts
    the rows of each layout and what was dropped."""
    pairs, report = [], {"files": [str(f) for f in files], "rows_read": 0, "rows_by_layout": {}, "examples": 0,
                         "dropped_empty": 0, "dropped_duplicates": 0}
    for f in files:
        columns, rows = table_rows(f, "instruction/response rows")
        layout, used = detect_layout(columns, prompt_column, response_column, f)
        report.setdefault("columns", {})[str(f)] = used
        report.setdefault("layouts", {})[str(f)] = layout
        for where, row in rows:
            report["rows_read"] += 1
            report["rows_by_layout"][layout] = report["rows_by_layout"].get(layout, 0) + 1
            if layout in ("messages", "conversations"):
                texts = conversation_texts(row[used[0]], where, used[0])
                if len(texts) < 2:
                    raise PocketGPTError(f"{where}: the {used[0]!r} cell has no assistant turn, so nothing to learn "
                                         f"from. Add the answer or remove the row.")
                examples = [(texts[0] if k == 1 else tuple(texts[:k]), texts[k]) for k in range(1, len(texts), 2)]
            elif layout == "alpaca":
                instruction, extra, output = (cell_text(row[c], where, c) for c in used)
                examples = [(f"{instruction}\n\n{extra}" if instruction and extra else instruction, output)]
            else:
                examples = [tuple(cell_text(row[c], where, c) for c in used)]
            for prompt, response in examples:
                report["examples"] += 1
                last = prompt_turns(prompt)[-1]
                if not last or not response or last.lower() == "nan" or response.lower() == "nan":
                    report["dropped_empty"] += 1
                    continue
                pairs.append((prompt, response))
    unique = list(dict.fromkeys(pairs))
    report["dropped_duplicates"] = len(pairs) - len(unique)
    if not unique:
        raise PocketGPTError(f"{', '.join(map(str, files))}: no usable rows (every row had an empty prompt or response).")
    return unique, report


def prompt_turns(prompt) -> list[str]:
    """A prompt's texts: [instruction], or for a later turn of a chat [u1, a1, ..., un]."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def dialog_key(prompt, response) -> str:
    """The text a dialog is split by (split_of): its turns and its response, a line apart."""
    return "\n".join(prompt_turns(prompt) + [response])


def dialog_ids(tok, pairs) -> list[tuple[list[int], list[int]]]:
    """Ids of the seed's template and the training targets for each (prompt, answer) pair.

    Targets are -100 on the prompt; the answer and its <|eos|> are kept. <|bos|> and <|eos|> go
    in as ids and the text is encoded with special-token strings kept as text (encode_text), so
    an answer that quotes "<|eos|>" does not end there. The prompt ends exactly at "Response:";
    the answer brings its own leading space (a space left at the end of the prompt would merge
    with the answer's first word under byte-level BPE, a split the model never sees when it
    generates). A prompt with turns before it repeats the template for each of them, as
    CHAT_TEMPLATE renders the conversation; only the last answer has targets. Long rows are cut later."""
    turns = [prompt_turns(p) + [r] for p, r in pairs]
    prompts = iter(encode_text(tok, [chat_prompt(u).removeprefix("<|bos|>") for t in turns for u in t[0::2]]))
    answers = iter(encode_text(tok, [f" {a}" for t in turns for a in t[1::2]]))
    rows = []
    for t in turns:
        ids = []
        for _ in range(len(t) // 2):
            p, a = next(prompts), next(answers)
            ids += [BOS_ID, *p, *a, EOS_ID]
        rows.append((ids, [-100] * (len(ids) - len(a) - 1) + [*a, EOS_ID]))
    return rows


def encode_dialog(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    return dialog_ids(tok, [(prompt, response)])[0]


def encode_dialogs(tok, pairs, context: int, too_long: str, chunk: int = 2000,
                   kept_index: list | None = None) -> tuple[list, list, dict]:
    """Encode every pair (in batches: the Rust tokenizer works in parallel). A row longer than
    context+1 tokens first loses whole turns from the left of its conversation, as few as let it
    fit (its prompt then starts at a later turn); a row still too long gets its answer cut (still
    ending in <|eos|>) or is dropped, by `too_long`. Returns the kept pairs (prompts as cut), their
    rows and the counts (and, into `kept_index` when given, the index of each kept pair)."""
    kept, rows, truncated, dropped, history_cut = [], [], 0, 0, 0
    with progress(total=len(pairs), desc="encode dialogs", unit="row", disable=len(pairs) < 5000) as bar:  # seconds
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            for j, ((prompt, response), (ids, labels)) in enumerate(zip(part, dialog_ids(tok, part))):
                if len(ids) > context + 1 and not isinstance(prompt, str):  # each turn starts at its <|bos|>
                    starts = [i for i, t in enumerate(ids) if t == BOS_ID]
                    k = next((k for k, s in enumerate(starts) if len(ids) - s <= context + 1), len(starts) - 1)
                    ids, labels = ids[starts[k]:], labels[starts[k]:]
                    turns = prompt_turns(prompt)[2 * k:]
                    prompt = turns[0] if len(turns) == 1 else tuple(turns)
                    history_cut += 1
                if len(ids) > context + 1:
                    n_prompt = labels.count(-100)
                    if too_long == "drop" or n_prompt + 2 > context + 1:
                        dropped += 1
                        continue
                    ids = ids[:context] + [EOS_ID]
                    labels = labels[:context] + [EOS_ID]
                    truncated += 1
                kept.append((prompt, response))
                rows.append((ids, labels))
                if kept_index is not None:
                    kept_index.append(start + j)
            bar.update(len(part))
    return kept, rows, {"truncated": truncated, "dropped_too_long": dropped, "history_cut": history_cut}


class DialogBatches:
    """Global batches of rows of similar length, so little of a batch is padding; seeded and resumable.

    Each epoch: a seeded shuffle, rows sorted by length inside chunks of 64 batches, the batches
    shuffled again. A global batch holds batch_size rows per process, and process r takes every
    world-th row of it, so all processes get rows of about the same length. The batches depend on
    the process count, which is part of the cache key: epoch 0 once used the batches built for
    one process (half-size batches on two). Inputs are padded with <pad>, targets with -100.
    """

    variable_shapes = True  # a batch is as wide (and the last as long) as it happens to be: train() compiles dynamic

    def __init__(self, rows, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.rows, self.B, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.epoch, self.index, self._batches = 0, 0, None

    def batches(self) -> list:
        if self._batches is None or self._batches[0] != (self.epoch, self.world):
            rng = np.random.default_rng([self.seed, self.epoch])
            order, size = rng.permutation(len(self.rows)), self.B * self.world
            chunks = [sorted(order[i:i + 64 * size], key=self.length) for i in range(0, len(order), 64 * size)]
            batches = []
            for c in chunks:
                for i in range(0, len(c), size):
                    if len(c[i:i + size]) < self.world and batches:  # every process needs a row: merge the tail
                        batches[-1] = batches[-1] + c[i:i + size]
                    else:
                        batches.append(c[i:i + size])
            self._batches = ((self.epoch, self.world), [batches[i] for i in rng.permutation(len(batches))])
        return self._batches[1]

    def __len__(self) -> int:
        return len(self.batches())

    def length(self, i: int) -> int:
        return len(self.rows[i][0])

    def collate(self, idx):
        return pad_rows([self.rows[i] for i in idx])

    def next_batch(self):
        idx = self.batches()[self.index]
        self.index += 1
        if self.index == len(self.batches()):
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(idx[self.rank::self.world])

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "world": self.world}

    def load_state(self, state: dict) -> None:
        """The position; a checkpoint of another process count resumes at the same share of the epoch."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        old_world = int(state.get("world", self.world))
        if old_world != self.world:
            self.index = min(len(self) - 1, self.index * old_world // self.world)

    def real_token_fraction(self) -> float:
        """Share of the input positions in an epoch's per-process batches (what trains) that are real tokens."""
        real = padded = 0
        for b in self.batches():
            for r in range(self.world):
                x, _ = self.collate(b[r::self.world])
                real, padded = real + int((x != PAD_ID).sum()), padded + x.numel()
        return real / padded

    def eval_batches(self, n_rows: int):
        """The fixed evaluation sample (eval_sample) in batches of similar length."""
        idx = sorted(eval_sample(len(self.rows), n_rows).tolist(), key=self.length)
        return [self.collate(idx[i:i + self.B]) for i in range(0, len(idx), self.B)]


def pad_rows(rows):
    """(ids, labels) rows as inputs and targets moved by one: inputs padded with <pad>, targets with -100."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for k, (ids, labels) in enumerate(rows):
        x[k, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[k, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


class PairBatches(DialogBatches):
    """Preference pairs ((chosen ids, labels), (rejected ids, labels)) in DialogBatches' seeded,
    resumable, length-grouped global batches; a batch stacks the chosen rows, then the rejected ones."""

    def length(self, i: int) -> int:
        return max(len(self.rows[i][0][0]), len(self.rows[i][1][0]))

    def collate(self, idx):
        return pad_rows([self.rows[i][0] for i in idx] + [self.rows[i][1] for i in idx])


def prepare_sft_data(cfg: SFTConfig, tok, context: int) -> dict:
    """Read, clean, encode and split the dialogs; every count is kept for the report.

    The evaluation rows are a fixed sample spread over the val split (all of it when small):
    SFT's val loss and 04's response loss are measured on the same rows (heldout.json)."""
    files = dialog_files(cfg.dialogs_path, cfg.run_dir)
    print(f"dialogs_path={cfg.dialogs_path}: {files_summary(files)}")
    pairs, report = read_dialogs(files, cfg.prompt_column, cfg.response_column)
    kept, rows, lengths = encode_dialogs(tok, pairs, context, cfg.too_long)
    report.update(lengths)
    rows_by_split, pairs_by_split = {"train": [], "val": []}, {"train": [], "val": []}
    for pair, row in zip(kept, rows):  # split by a seeded hash of the row, as the corpus is
        s = split_of(dialog_key(*pair), cfg.seed, cfg.val_fraction)
        rows_by_split[s].append(row)
        pairs_by_split[s].append(pair)
    if not rows_by_split["val"] or len(rows_by_split["train"]) < world_size():
        raise PocketGPTError(f"{len(rows)} usable dialog rows cannot be split with val_fraction={cfg.val_fraction} "
                             f"across {world_size()} process(es): provide more rows or change val_fraction.")
    sample = eval_sample(len(rows_by_split["val"]), cfg.eval_rows)
    rows_by_split["eval"] = [rows_by_split["val"][i] for i in sample]
    pairs_by_split["eval"] = [pairs_by_split["val"][i] for i in sample]
    report.update(train_rows=len(rows_by_split["train"]), val_rows=len(rows_by_split["val"]),
                  eval_rows=len(sample), train_tokens=sum(len(r[0]) for r in rows_by_split["train"]),
                  response_tokens=sum(sum(t != -100 for t in r[1]) for r in rows_by_split["train"]))
    return {"rows": rows_by_split, "pairs": pairs_by_split, "report": report}


def set_dropout(model, p: float) -> None:
    """Set every dropout of a loaded model (they are fixed when the model is built) and its config."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = p


# -----------------------------------------------------------------------------
# Stage 3, second phase (optional): preference tuning with DPO

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def preference_answer(value, where: str, column: str) -> tuple[list[str] | None, str]:
    """A chosen or rejected cell: text, or messages ending with the assistant's answer; returns the
    conversation before the answer (None when the cell holds the answer alone) and the answer."""
    if not isinstance(value, (list, tuple)):
        return None, cell_text(value, where, column)
    parts = [message_parts(m) for m in value]
    if all(role is not None and CHAT_ROLES.get(str(role).strip().lower()) == "assistant" for role, _ in parts):
        return None, cell_text(parts[-1][1], where, column)  # the answer alone, as a message
    texts = conversation_texts(value, where, column)
    if len(texts) % 2:
        raise PocketGPTError(f"{where}: the {column!r} conversation does not end with an assistant message (the answer).")
    return texts[:-1], texts[-1]


def read_preference_pairs(path) -> list[dict]:
    """prompt, chosen, rejected rows (columns in any case, any dialog format), each cell non-empty.

    A cell is text or a list of messages: a prompt conversation (its turns go before the answers, as in
    SFT), an answer as an assistant message. Without a prompt column, chosen and rejected are whole
    conversations that differ only in their last (assistant) message."""
    columns, rows = table_rows(path, "prompt, chosen and rejected rows")
    lower = {c.strip().lower(): c for c in columns}
    missing = [c for c in PAIR_COLUMNS if c not in lower and (c != "prompt" or {"chosen", "rejected"} - set(lower))]
    if missing:
        raise PocketGPTError(f"{path}: no {', '.join(missing)} column; the columns are {list(columns)}. A preference "
                             f"file needs prompt, chosen and rejected (the layout of the public preference datasets).")
    pairs = []
    for where, row in rows:
        cells = {c: row[lower[c]] for c in PAIR_COLUMNS if c in lower}
        empty = next((c for c, v in cells.items() if v is None or not (v.strip() if isinstance(v, str) else len(v))), None)
        if empty:
            raise PocketGPTError(f"{where}: the {empty!r} cell is empty. Fill it or remove the row.")
        (before, chosen), (before_rejected, rejected) = (preference_answer(cells[c], where, lower[c])
                                                         for c in ("chosen", "rejected"))
        if "prompt" in cells:
            prompt = (conversation_texts(cells["prompt"], where, lower["prompt"])
                      if isinstance(cells["prompt"], (list, tuple)) else [cell_text(cells["prompt"], where, "prompt")])
        elif before and before == before_rejected:
            prompt = before
        else:
            raise PocketGPTError(f"{where}: there is no prompt column, so chosen and rejected must be conversations "
                                 f"that differ only in their last (assistant) message.")
        if len(prompt) % 2 == 0:
            raise PocketGPTError(f"{where}: the prompt conversation does not end with a user message.")
        empty = next((c for c, text in [("prompt", prompt[-1]), ("chosen", chosen), ("rejected", rejected)] if not text), None)
        if empty:
            raise PocketGPTError(f"{where}: the {empty!r} text is empty. Fill it or remove the row.")
        pairs.append({"prompt": prompt[0] if len(prompt) == 1 else tuple(prompt), "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise PocketGPTError(f"{path} has a header but no preference pairs.")
    return pairs


def self_preference_pairs(model, tok, dialogs, n: int, seed: int) -> tuple[list[dict], int]:
    """Pairs that need no extra data: for a seeded sample of the SFT training prompts, the reference
    answer is chosen and the SFT model's own sampled answer (as the seed samples) is rejected. Pairs
    whose two answers are near-identical (90% of their words in order) teach nothing and are skipped."""
    picked = [dialogs[i] for i in eval_sample(len(dialogs), n)]
    prompt_ids = [chat_prompt_ids(tok, p) for p, _ in picked]
    pairs, skipped = [], 0
    for (prompt, reference), ids, answer in zip(picked, prompt_ids, generate_many(model, prompt_ids, False, seed,
                                                                                  desc="DPO: the SFT model answers")):
        text = tok.decode(answer, skip_special_tokens=True).strip()
        if difflib.SequenceMatcher(None, text.split(), reference.split()).ratio() >= 0.9:
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": reference, "rejected": text, "rejected_ids": answer})
    return pairs, skipped


def encode_preference_pairs(tok, pairs, context: int) -> list:
    """((chosen ids, labels), (rejected ids, labels)) per pair, as SFT encodes rows (long answers cut).
    A sampled rejected answer keeps its own ids: with <|eos|> where the model ended, without where it
    ran out of context. A pair whose instruction alone does not fit the context is None (SFT drops
    such rows too), so the rows stay in step with the pairs."""
    at = []
    for side in ("chosen", "rejected"):
        index = []
        rows = encode_dialogs(tok, [(p["prompt"], p[side]) for p in pairs], context, "truncate", kept_index=index)[1]
        at.append(dict(zip(index, rows)))
    rows = []
    for i, pair in enumerate(pairs):
        c, r = at[0].get(i), at[1].get(i)
        if c is not None and r is not None and "rejected_ids" in pair:
            prompt = chat_prompt_ids(tok, pair["prompt"])
            r = (prompt + pair["rejected_ids"], [-100] * len(prompt) + pair["rejected_ids"])
        rows.append((c, r) if c is not None and r is not None else None)
    return rows


def run_preference_phase(cfg, sft_model, tok, dialogs, work: Path, resume_dir: Path | None, deadline: float,
                         stop_at_step: int | None) -> dict:
    """DPO after SFT, in `work`/preference (pairs.json, log.csv, ckpt.pt), through the same loop.

    The SFT model is the frozen reference; a copy of it is trained (the copy's parameters carry no
    hooks of the SFT phase's DDP wrapper). The pairs are saved, so a resumed phase trains on the same ones."""
    folder = work / "preference"
    if is_main_process():
        folder.mkdir(exist_ok=True)
    saved = resume_dir / "preference" / "pairs.json" if resume_dir else None
    if saved is not None and saved.is_file():
        pairs, skipped = read_json(saved), None
    elif cfg.preference == "self":
        pairs, skipped = self_preference_pairs(sft_model, tok, dialogs, cfg.preference_rows, cfg.seed)
    else:
        pairs, skipped = read_preference_pairs(cfg.preference), 0
    write_json(folder / "pairs.json", pairs)
    rows = encode_preference_pairs(tok, pairs, sft_model.config.n_positions)
    split = [split_of(dialog_key(p["prompt"], p["chosen"]), cfg.seed, cfg.val_fraction) for p in pairs]
    train_rows = [r for r, s in zip(rows, split) if s == "train" and r is not None]
    val_rows = [r for r, s in zip(rows, split) if s == "val" and r is not None]
    if not val_rows:  # too few pairs for the split to hold any out: hold out a few, never measure on training pairs
        k = max(1, min(cfg.batch_size, len(train_rows) // 20))
        train_rows, val_rows = train_rows[:-k], train_rows[-k:]
    if len(train_rows) < world_size():
        raise PocketGPTError(f"preference={cfg.preference!r}: only {sum(r is not None for r in rows)} usable pairs"
                             + (f" ({skipped} were near-identical)" if skipped else "") + ": too few to train on.")
    train_data = PairBatches(train_rows, cfg.batch_size, cfg.seed, world=world_size())
    steps = max(1, round(cfg.preference_epochs * -(-len(train_data) // cfg.grad_accum_steps)))
    if is_main_process():
        print(f"preference phase (DPO, beta {cfg.beta}" + (f", rpo_alpha {cfg.rpo_alpha}" if cfg.rpo_alpha else "")
              + f"): {len(train_rows):,} training and {len(val_rows):,} held-out pairs"
              + (f" ({skipped} near-identical ones skipped)" if skipped else "") + f", {steps} steps", flush=True)
    dcfg = dataclasses.replace(cfg, optimizer="adamw", schedule="cosine", learning_rate=cfg.preference_learning_rate,
                               min_lr=cfg.preference_learning_rate / 10, max_steps=steps, warmup_steps=max(1, steps // 10),
                               weight_decay=0.0)
    policy = copy.deepcopy(sft_model).train()
    resume = load_checkpoint(resume_dir / "preference") if resume_dir and (resume_dir / "preference" / "ckpt.pt").is_file() else None
    result = train(policy, train_data, PairBatches(val_rows, cfg.batch_size, cfg.seed).eval_batches(len(val_rows)), dcfg,
                   folder, resume, deadline, stop_at_step, stage="preference",
                   loss_module=DPOLoss(policy, sft_model, cfg.beta, cfg.rpo_alpha))
    result.update(pairs=len(pairs), train_pairs=len(train_rows), val_pairs=len(val_rows),
                  skipped_near_identical=skipped, beta=cfg.beta, rpo_alpha=cfg.rpo_alpha,
                  learning_rate=cfg.preference_learning_rate,
                  source=cfg.preference)
    return result


@quiet_library_bars()
def run_sft_stage(cfg: SFTConfig, stop_at_step: int | None = None) -> Path:
    """Stage 3, whole: the pretrained model and tokenizer, the dialogs, the shared loop, the folder;
    then, with `preference`, DPO on the SFT model (the SFT model is kept in model_sft/, the tuned
    one is model/). A resume finds which phase it is in by which checkpoint it has. `stop_at_step`
    (tests) stops the last phase that runs."""
    deadline = time.time() + cfg.max_hours * 3600  # this session's budget counts from the stage's start
    pre = find_stage("pretrain", cfg.pretrain_dir, cfg.run_dir)
    tok = load_tokenizer(pre / "model")
    tok.chat_template = CHAT_TEMPLATE
    model = load_model(pre / "model").train()
    set_dropout(model, cfg.dropout)
    data = prepare_sft_data(cfg, tok, model.config.n_positions)
    if cfg.preference not in (None, "self"):  # a bad preference file stops the stage now, not after hours of SFT
        read_preference_pairs(cfg.preference)
    # the global batch (batch_size rows on each process) is fixed before the padding share is measured
    train_data = DialogBatches(data["rows"]["train"], cfg.batch_size, cfg.seed, world=world_size())
    val_data = DialogBatches(data["rows"]["eval"], cfg.batch_size, cfg.seed)
    steps_per_epoch = -(-len(train_data) // cfg.grad_accum_steps)
    cfg.max_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    cfg.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps // 33)
    report = {**data["report"], "real_token_fraction": train_data.real_token_fraction(),
              "processes": world_size(), "steps_per_epoch": steps_per_epoch, "max_steps": cfg.max_steps}
    resume_dir = resolve_resume(cfg.resume_from, "sft", cfg.out_dir)
    in_phase_two = bool(cfg.preference and resume_dir and (resume_dir / "sft_phase.json").is_file())
    resume = load_checkpoint(resume_dir) if resume_dir and not in_phase_two else None
    if resume_dir and is_main_process():
        print(f"resuming {resume_dir} " + ("in its preference phase" if in_phase_two else
              f"at step {resume['step']} of {cfg.max_steps}") + f" (this session's budget: {duration(cfg.max_hours * 3600)})")
    inputs = {"pretrain": pre, **{f"dialogs:{Path(f).name}": Path(f) for f in data["report"]["files"]},
              **({"resumed_from": newest_ckpt_file(resume_dir)} if resume_dir else {}),
              **({"preference": Path(cfg.preference)} if cfg.preference not in (None, "self") else {})}
    with stage_output(cfg.out_dir, "sft", dataclasses.asdict(cfg), inputs, resume_dir) as work:
        write_json(work / "data_report.json", report)
        write_json(work / "heldout.json", [{"prompt": p, "response": r} for p, r in data["pairs"]["eval"]])
        if in_phase_two:  # the SFT phase ended in an earlier session: its model, log and numbers are there
            model, result = load_model(resume_dir / "model_sft"), read_json(resume_dir / "sft_phase.json")
            if is_main_process() and resume_dir.resolve() != work.resolve():
                for name in ["model_sft", "log.csv", "sft_phase.json", "ckpt.pt"]:
                    if (resume_dir / name).is_dir():
                        write_folder(work / name, lambda tmp, src=resume_dir / name: shutil.copytree(src, tmp, dirs_exist_ok=True))
                    else:
                        write_file(work / name, lambda tmp, src=resume_dir / name: shutil.copyfile(src, tmp))
        else:
            result = train(model, train_data, val_data.eval_batches(len(val_data.rows)), cfg, work, resume, deadline,
                           None if cfg.preference else stop_at_step, stage="sft", loss_module=LMLoss(model, padded=True))
            model, _ = result.pop("model"), result.pop("is_main_process")
            if is_main_process():  # model/ is what 04 exports: the SFT model, until a preference phase finishes
                save_hf_folder(model, tok, work / "model")
                if cfg.preference and result["finished"]:  # the preference phase's reference, and 04's "SFT" row
                    save_hf_folder(model, tok, work / "model_sft")
                    write_json(work / "sft_phase.json", result)  # the mark of a finished SFT phase
        logs = {"sft": work / "log.csv"}
        if cfg.preference and result["finished"]:
            result["preference"] = run_preference_phase(cfg, model, tok, data["pairs"]["train"], work,
                                                        resume_dir if in_phase_two else None, deadline, stop_at_step)
            tuned, _ = result["preference"].pop("model"), result["preference"].pop("is_main_process")
            result["finished"] = result["preference"]["finished"]
            if is_main_process():  # a phase stopped by its budget leaves the SFT model as the one to use
                save_hf_folder(tuned if result["finished"] else model, tok, work / "model")
            logs["preference"] = work / "preference" / "log.csv"
        if not is_main_process():
            return Path(cfg.out_dir)
        pre_metrics = read_json(pre / "metrics.json")
        write_json(work / "metrics.json", {**result, **{f"data_{k}": v for k, v in report.items() if k != "columns"},
                                           "pretrain_val_loss": pre_metrics.get("final_val_loss"),
                                           "exported_model": "SFT + DPO" if cfg.preference and result["finished"]
                                           else "SFT"})
        plot_losses(logs, work / "loss.png", show=False)
    return Path(cfg.out_dir)


def data_report_rows(stage_dir) -> list[dict]:
    """What reading and cleaning the dialogs did, as rows for the notebook's table."""
    r = read_json(Path(stage_dir) / "data_report.json")
    layouts = {f"rows_{k}": n for k, n in r.get("rows_by_layout", {}).items()}  # older reports have none
    r = {**r, **layouts}
    names = {"rows_read": "rows read", **{k: f"rows in the {k[5:]} layout" for k in layouts},
             "examples": "examples (one per answer; a chat row gives one per assistant turn)",
             "dropped_empty": "dropped: empty prompt or response",
             "dropped_duplicates": "dropped: exact duplicates", "history_cut": "earlier turns cut to fit the context",
             "truncated": "answer cut to fit the context",
             "dropped_too_long": "dropped: too long", "train_rows": "train rows", "val_rows": "val rows",
             "train_tokens": "train tokens", "response_tokens": "train tokens with loss (response + eos)",
             "real_token_fraction": "real (not padding) tokens per batch", "steps_per_epoch": "steps per epoch"}
    return [{"": label, "value": f"{r[k]:.1%}" if isinstance(r[k], float) else f"{r[k]:,}"}
            for k, label in names.items() if k in r]


def chat_prompt(prompt) -> str:
    """What the seed feeds generate(): the template up to and including "Response:"; a prompt with
    turns before it (u1, a1, ..., un) renders them first, as CHAT_TEMPLATE does."""
    *before, last = prompt_turns(prompt)
    turns = "".join(f"<|bos|>Instruction: {u}\nResponse: {a}<|eos|>" for u, a in zip(before[0::2], before[1::2]))
    return f"{turns}<|bos|>Instruction: {last}\nResponse:"


def chat_prompt_ids(tok, prompt) -> list[int]:
    """The seed's prompt as ids, <|bos|> (and <|eos|> after earlier turns) inserted as ids and the text kept as text."""
    *before, last = prompt_turns(prompt)
    turns = [i for ids, _ in dialog_ids(tok, list(zip(before[0::2], before[1::2]))) for i in ids] if before else []
    return [*turns, BOS_ID, *encode_text(tok, [chat_prompt(last).removeprefix("<|bos|>")])[0]]


def compare_answers(before_dir, after_dir, prompts, max_new_tokens: int = 64) -> list[dict]:
    """Answers to the same instructions from two models (before and after SFT), sampled as the seed does."""
    models = {"before": load_model(before_dir), "after": load_model(after_dir)}
    tok = load_tokenizer(after_dir)
    rows = []
    for p in prompts:
        row = {"instruction": p}
        for name, model in models.items():
            ids = generate(model, tok, chat_prompt_ids(tok, p), max_new_tokens)
            row[name] = tok.decode(ids, skip_special_tokens=True).strip()
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Benchmark: tokens/s of the training step, against a plain PyTorch GPT of the same shape

def step_timer(loss_module, cfg, vocab_size: int, precision: str, compiled: bool):
    """A function that runs one full optimizer step (forward, backward, clip, AdamW/Muon) on random
    tokens and returns its seconds; the first calls pay for warm-up (and compilation)."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    loss_module.to(acc.device).train()
    optimizers = make_optimizers(loss_module, cfg, acc.device)
    scaler = torch.amp.GradScaler(acc.device.type, enabled=precision == "fp16")
    fn = torch.compile(loss_module) if compiled else loss_module
    g = torch.Generator().manual_seed(0)
    batches = [(lambda r: (r[:, :-1].contiguous(), r[:, 1:].contiguous()))(
        torch.randint(0, vocab_size, (cfg.batch_size, cfg.n_positions + 1), generator=g))
        for _ in range(cfg.grad_accum_steps)]
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)

    def one_step() -> float:
        sync()
        started = time.perf_counter()
        train_step(acc, fn, optimizers, scaler, batches, cfg.grad_clip, precision)
        sync()
        return time.perf_counter() - started
    return one_step


T4_USABLE_GIB = 14.0  # a T4's 16 GB shows as 14.7 GiB to CUDA, less the context and kernels (~0.5 GiB)


def t4_memory(device, cfg) -> dict:
    """The peak GPU memory of the training step since the last reset, and whether that micro-batch
    fits a T4: what the allocator reserved (allocated plus its cache) against T4_USABLE_GIB."""
    if device.type != "cuda":
        return {"peak_memory_gib": None, "peak_reserved_gib": None, "fits_t4": None,
                "t4_memory": "not measured: no GPU here"}
    allocated, reserved = (f(device) / 2 ** 30 for f in (torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved))
    fits = reserved <= T4_USABLE_GIB
    return {"peak_memory_gib": round(allocated, 2), "peak_reserved_gib": round(reserved, 2), "fits_t4": fits,
            "t4_memory": f"batch_size={cfg.batch_size} x {cfg.n_positions} tokens: {reserved:.1f} GiB reserved at peak "
                         f"({allocated:.1f} GiB allocated) of the {T4_USABLE_GIB:.0f} GiB a 16 GB T4 leaves: "
                         + ("fits" if fits else f"does not fit: lower batch_size (now {cfg.batch_size}) and raise "
                                                f"grad_accum_steps by the same factor")}


def bench(profile: str = "t4", params: dict | None = None, reference: bool = False, steps: int = 10,
          warmup: int = 3) -> dict:
    """The `bench` command: one JSON-able dict of the training step's speed on this device.

    With `reference`, the two models take turns step by step and each reports its median step, so
    a noisy machine (other processes, turbo clocks) slows both alike instead of skewing the ratio.
    Ours warms up first and alone, so the peak GPU memory it reports (and whether that micro-batch
    fits a T4's 16 GB) is the step's own; the reference joins after it.
    """
    params = dict(params or {})
    vocab_size = int(params.pop("vocab_size", make_config(TokenizerConfig, profile, run_dir="unused").vocab_size))
    cfg = make_config(PretrainConfig, profile, run_dir=str(HERE / "runs" / "bench"), **params)
    precision, compiled = choose_precision(cfg.precision), resolve_compile(cfg.compile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(vocab_size, cfg)
    flops, peak = flops_per_token(model), peak_flops(device, precision)
    timers = {"ours": step_timer(LMLoss(model), cfg, vocab_size, precision, compiled)}
    timers["ours"]()  # the first step compiles and allocates the optimizer's state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, warmup - 1)):  # ours warms up alone: its peak memory is its own, not the reference's too
        timers["ours"]()
    memory = t4_memory(device, cfg)
    if reference:
        torch.manual_seed(cfg.seed)
        plain = PlainGPT(vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions)
        timers["reference"] = step_timer(plain, cfg, vocab_size, precision, compiled)
        for _ in range(warmup):
            timers["reference"]()
    seconds = {k: [] for k in timers}
    for _ in range(steps):
        for name, timer in timers.items():
            seconds[name].append(timer())
    tokens = cfg.batch_size * cfg.grad_accum_steps * cfg.n_positions
    tps = {k: tokens / float(np.median(v)) for k, v in seconds.items()}
    out = {"profile": profile, "params": count_params(model), "tokens_per_s": round(tps["ours"]),
           "mfu": round(flops * tps["ours"] / peak, 4) if peak else None, "device": device_name(device),
           "precision": precision, "compiled": compiled, "batch": [cfg.batch_size, cfg.n_positions],
           "optimizer": cfg.optimizer,
           "grad_accum_steps": cfg.grad_accum_steps, "steps": steps, "torch": torch.__version__, **memory}
    if reference:
        out["reference"] = {"params": sum(p.numel() for p in plain.parameters()), "tokens_per_s": round(tps["reference"]),
                            "mfu": round(flops * tps["reference"] / peak, 4) if peak else None}
        out["ratio"] = round(tps["ours"] / tps["reference"], 3)
    return out


# -----------------------------------------------------------------------------
# Generation and evaluation

SAMPLING = dict(do_sample=True, top_p=0.9, temperature=0.8)  # the seed's sampling


@quiet_library_bars()
def load_model(folder):
    """A saved model folder, with an error that names it when it is not one."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PocketGPTError(f"{folder} holds no config.json: point at a model folder a pocketGPT stage wrote.")
    model = GPT2LMHeadModel.from_pretrained(str(folder))
    return model.eval()


def generate(model, tok, prompt_ids: list[int], max_new_tokens: int = 64, greedy: bool = False,
             seed: int = 1337, streamer=None) -> list[int]:
    """New token ids after the prompt (stopping at <|eos|>), sampled as the seed does or greedy.

    The model has n_positions positions; a prompt that leaves no room for an answer keeps its
    last tokens (room for a quarter of the context, or max_new_tokens if less), with a warning."""
    torch.manual_seed(seed)
    n_positions = model.config.n_positions
    if len(prompt_ids) >= n_positions:
        keep = n_positions - max(1, min(max_new_tokens, n_positions // 4))
        warnings.warn(f"the prompt has {len(prompt_ids)} tokens and the model's context is {n_positions}: "
                      f"only its last {keep} tokens are used", stacklevel=2)
        prompt_ids = prompt_ids[-keep:]
    room = n_positions - len(prompt_ids)
    x = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():  # one unpadded row: the mask is all ones (said, so transformers does not warn)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max(1, min(max_new_tokens, room)),
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID, streamer=streamer,
                             **({"do_sample": False} if greedy else SAMPLING))
    return out[0, len(prompt_ids):].tolist()


def sample_continuations(model_dir, prompts, max_new_tokens: int = 40) -> list[dict]:
    """The pretrained model continuing a few prompts (a document starts with <|bos|>)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    rows = []
    for p in prompts:
        ids = generate(model, tok, [BOS_ID, *encode_text(tok, [p])[0]], max_new_tokens)
        rows.append({"prompt": p, "continuation": tok.decode(ids, skip_special_tokens=True)})
    return rows


def distinct_n(texts, n: int = 2) -> float:
    """Unique n-grams / all n-grams over the answers: low values mean the model repeats itself."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def eval_val_split(model, tokenizer_dir, n_windows: int, batch_size: int = 8) -> dict:
    """Loss, perplexity and bits per byte on the pretraining val split's fixed evaluation sample,
    the same windows 02 evaluates (bits per byte does not depend on the tokenizer, so models with
    different vocabularies compare)."""
    meta = read_json(Path(tokenizer_dir) / "meta.json")
    data = TokenWindows(Path(tokenizer_dir) / "val.bin", model.config.n_positions, batch_size, 0, meta["vocab_size"])
    batches = data.eval_batches(n_windows)
    loss = evaluate(LMLoss(model), batches, model.device)
    bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) / bytes_per_token,
            "tokens_evaluated": sum(y.numel() for _, y in batches), "val_split_tokens": meta["val_tokens"],
            "whole_split": n_windows >= data.n}


def eval_responses(model, tok, pairs, batch_size: int = 16) -> float:
    """Loss on response tokens of held-out dialogs (the SFT objective)."""
    _, rows, _ = encode_dialogs(tok, pairs, model.config.n_positions, "truncate")
    return evaluate(LMLoss(model, padded=True), DialogBatches(rows, batch_size, 0).eval_batches(10**9), model.device)


def answer_table(model, tok, prompts, max_length: int = 384, seed: int = 1337) -> tuple[list[dict], dict]:
    """Sampled (the seed's settings) and greedy answers, whether each ended with <|eos|>, and distinct-2."""
    rows = []
    for p in prompts:
        ids = chat_prompt_ids(tok, p)
        row = {"instruction": p}
        for mode in ["sampled", "greedy"]:
            new = generate(model, tok, ids, max_length - len(ids), greedy=mode == "greedy", seed=seed)
            row[mode] = tok.decode(new, skip_special_tokens=True).strip()
            row[f"{mode}_eos"] = bool(new) and new[-1] == EOS_ID
        rows.append(row)
    summary = {f"{m}_eos_share": sum(r[f"{m}_eos"] for r in rows) / len(rows) for m in ["sampled", "greedy"]}
    summary.update({f"{m}_distinct2": distinct_n([r[m] for r in rows]) for m in ["sampled", "greedy"]})
    return rows, summary


QUALITY_ROWS = 256  # held-out dialogs answered per model (all of them where there are fewer)


def generate_many(model, prompts_ids, greedy: bool, seed: int = 1337, batch_size: int = 32,
                  desc: str | None = None) -> list[list[int]]:
    """New ids for many prompts at once, each cut after its <|eos|>: left-padded batches of prompts of
    similar length (GPT-2 takes its positions from the attention mask in generate()), each answer
    allowed the context that is left. Sampled as the seed samples, or greedy."""
    torch.manual_seed(seed)
    n_positions, device = model.config.n_positions, model.device
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    out = [[] for _ in prompts_ids]
    bar = progress(total=len(order), desc=desc, unit="answer", disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts_ids[i]) for i in idx)
        x = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(idx):
            x[row, width - len(prompts_ids[i]):] = torch.tensor(prompts_ids[i])
            mask[row, width - len(prompts_ids[i]):] = 1
        with torch.no_grad():
            y = model.generate(x.to(device), attention_mask=mask.to(device), max_new_tokens=max(1, n_positions - width),
                               eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                               **({"do_sample": False} if greedy else SAMPLING))
        for row, i in enumerate(idx):
            new = y[row, width:].tolist()
            out[i] = new[:new.index(EOS_ID) + 1] if EOS_ID in new else new
        bar.update(len(idx))
    bar.close()
    return out


def repeated_ngram_share(words: list[str], n: int = 3) -> float:
    """Share of an answer's n-grams that repeat an earlier one: "the layer of the layer of the layer" is high."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def answer_quality(model, tok, pairs, seed: int = 1337) -> tuple[dict, list[dict]]:
    """How a model answers held-out instructions, against the reference answers: for greedy and sampled
    answers, ROUGE-L F1 (rouge-score; None where it is not installed), the share that end with <|eos|>,
    the share of repeated 3-grams inside an answer, distinct-2 across answers, the mean length in words."""
    try:  # on Kaggle it comes as a wheel in the code dataset, and needs nltk and absl from the image
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(["rougeL"])
    except ImportError:
        scorer = None
    prompts = [chat_prompt_ids(tok, p) for p, _ in pairs]
    numbers = {"rows": len(pairs), "reference_words": float(np.mean([len(r.split()) for _, r in pairs]))}
    answers = [{"instruction": p, "reference": r} for p, r in pairs]
    for mode in ["greedy", "sampled"]:
        new = generate_many(model, prompts, greedy=mode == "greedy", seed=seed)
        texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]
        numbers.update({
            f"{mode}_rougeL": float(np.mean([scorer.score(r, t)["rougeL"].fmeasure for (_, r), t in zip(pairs, texts)]))
            if scorer else None,
            f"{mode}_eos_share": float(np.mean([bool(ids) and ids[-1] == EOS_ID for ids in new])),
            f"{mode}_repeated_3gram_share": float(np.mean([repeated_ngram_share(t.split()) for t in texts])),
            f"{mode}_distinct2": distinct_n(texts),
            f"{mode}_words": float(np.mean([len(t.split()) for t in texts])),
        })
        for a, t in zip(answers, texts):
            a[mode] = t
    return numbers, answers


QUALITY_MEASURES = [  # key, label, format
    ("response_loss", "response loss on all held-out rows (lower is better)", "{:.3f}"),
    ("greedy_rougeL", "ROUGE-L F1 against the reference, greedy", "{:.3f}"),
    ("sampled_rougeL", "ROUGE-L F1 against the reference, sampled", "{:.3f}"),
    ("greedy_eos_share", "answers that end with <|eos|>, greedy", "{:.0%}"),
    ("sampled_eos_share", "answers that end with <|eos|>, sampled", "{:.0%}"),
    ("greedy_repeated_3gram_share", "repeated 3-grams inside an answer, greedy", "{:.1%}"),
    ("sampled_repeated_3gram_share", "repeated 3-grams inside an answer, sampled", "{:.1%}"),
    ("greedy_distinct2", "distinct-2 across answers, greedy", "{:.2f}"),
    ("sampled_distinct2", "distinct-2 across answers, sampled", "{:.2f}"),
    ("greedy_words", "words per answer, greedy", "{:.1f}"),
    ("sampled_words", "words per answer, sampled", "{:.1f}"),
]


def quality_table(quality: dict) -> list[dict]:
    """The models side by side, one row per measure (a skipped measure says how to enable it)."""
    rows = []
    for key, label, fmt in QUALITY_MEASURES:
        row = {"measure": label}
        for name, numbers in quality.items():
            value = numbers.get(key)
            row[name] = fmt.format(value) if value is not None else "skipped: pip install rouge-score"
        rows.append(row)
    reference = next(iter(quality.values()))
    rows.append({"measure": "words per reference answer", **{n: f"{reference['reference_words']:.1f}" for n in quality}})
    return rows


def plot_quality(quality: dict, out_png=None, show: bool = True):
    """The answer measures of each model as grouped bars (all on a 0-1 scale)."""
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in QUALITY_MEASURES if k.endswith(("rougeL", "eos_share", "3gram_share", "distinct2"))
            and all(q.get(k) is not None for q in quality.values())]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(quality)
    for i, (name, numbers) in enumerate(quality.items()):
        ax.bar(np.arange(len(keys)) + i * width, [numbers[k] for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.replace("_share", "").replace("_", " ") for k in keys],
                  rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(f"answers to {next(iter(quality.values()))['rows']} held-out instructions")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return finish_figure(fig, out_png, show)


def ask(model, tok, prompt: str, max_length: int = 384, stream: bool = False, greedy: bool = False) -> str:
    """Ask the model one instruction. With stream=True the answer prints as it is generated where
    someone watches, and whole once it is done in a headless run (a saved notebook would otherwise
    keep each token as a line of its own)."""
    ids = chat_prompt_ids(tok, prompt)
    live = stream and watched()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if live else None
    new = generate(model, tok, ids, max_length - len(ids), greedy=greedy, streamer=streamer)
    answer = tok.decode(new, skip_special_tokens=True).strip()
    if stream and not live:
        print(answer, flush=True)
    return answer


def write_export_folder(model, tok, out_dir, card: str) -> None:
    """The seed's folder: everything transformers 5 writes, plus the files it no longer writes
    (pytorch_model.bin, vocab.json, merges.txt, special_tokens_map.json), and a model card."""
    out_dir = Path(out_dir)
    for key, value in SAMPLING.items():  # the seed's sampling as generate()'s default
        setattr(model.generation_config, key, value)
    save_hf_folder(model, tok, out_dir)
    write_file(out_dir / "pytorch_model.bin", torch_file(model.state_dict()), needed=tensor_bytes(model.state_dict()))
    write_json(out_dir / "special_tokens_map.json", {"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                     "unk_token": "<unk>", "pad_token": "<pad>"})
    write_file(out_dir / "README.md", card)


VERIFY_SCRIPT = r'''
import json, sys, numpy as np, torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast, GPT2Tokenizer
path, prompt = sys.argv[1], sys.argv[2]
model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)
slow = GPT2Tokenizer(vocab=f"{path}/vocab.json", merges=f"{path}/merges.txt", bos_token="<|bos|>",
                     eos_token="<|eos|>", unk_token="<unk>", pad_token="<pad>")
inputs = tokenizer.encode(f"<|bos|>Instruction: {prompt}\nResponse:", return_tensors="pt")
torch.manual_seed(0)
# the seed's call; max_length 384 is the seed model's context, a smaller (demo) model gets its own
out = model.generate(inputs, max_length=min(384, model.config.n_positions), do_sample=True, top_p=0.9,
                     temperature=0.8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
text = tokenizer.decode(out[0], skip_special_tokens=True)
with torch.no_grad():
    logits = model(inputs).logits[0].numpy()
probe = "Tokenizers split text: naïve café 🤗 <|eos|>  x\n\ty<pad>"
print(json.dumps({"text": text, "logits": logits.tolist(), "len_tokenizer": len(tokenizer),
                  "vocab_size": model.config.vocab_size, "dtype": str(model.dtype),
                  "slow_ids_equal": slow.encode(probe) == tokenizer.encode(probe) and len(slow) == len(tokenizer),
                  "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}))
'''


def verify_export(folder, model, prompt: str = "What does a tokenizer do?") -> dict:
    """Load the folder in a fresh process with the seed's inference code; compare with the model in memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(folder), prompt], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise PocketGPTError(f"The exported folder {folder} does not load in a fresh process:\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(folder)
    with torch.no_grad():
        ref = model.eval()(torch.tensor([chat_prompt_ids(tok, prompt)])).logits[0].float().numpy()
    checks = {
        "max_abs_logit_diff": float(np.abs(np.array(got["logits"]) - ref).max()),
        "text_starts_with_instruction": got["text"].startswith(f"Instruction: {prompt}\nResponse:"),
        "tokenizer_matches_vocab": got["len_tokenizer"] == got["vocab_size"],
        "slow_tokenizer_matches_fast": got["slow_ids_equal"],
        "special_ids": got["eos"] == EOS_ID and got["pad"] == PAD_ID,
        "dtype": got["dtype"], "sample": got["text"][:300],
    }
    failed = [k for k in ["text_starts_with_instruction", "tokenizer_matches_vocab", "slow_tokenizer_matches_fast",
                          "special_ids"] if not checks[k]]
    if failed or checks["max_abs_logit_diff"] > 1e-4:
        raise PocketGPTError(f"The exported folder {folder} failed checks {failed or ['logits differ']}: {checks}")
    return checks


# -----------------------------------------------------------------------------
# GGUF for llama.cpp, written with the `gguf` package and checked against Hugging Face

GGUF_FTYPES = ("f32", "f16", "q8_0")  # the file types write_gguf can produce

# How closely each file type must follow the Hugging Face model (see verify_gguf).
# rel_tol bounds max|logit diff| as a fraction of the logit range; min_top1 is the share of
# positions whose next token must agree (near-ties excepted); greedy: must the generated text
# be identical. q8_0 rounds every weight to 8 bits: its logits drift by ~1% of their range and
# its greedy text may take another branch at a close call, so it gets a looser bound, 99% top-1
# agreement and no greedy requirement (its greedy figures are still reported).
GGUF_TOLERANCES = {
    "f32":  dict(rel_tol=1e-3, min_top1=1.0, greedy=True),
    "f16":  dict(rel_tol=1e-2, min_top1=1.0, greedy=True),
    "q8_0": dict(rel_tol=5e-2, min_top1=0.99, greedy=False),
}


def gguf_tensors(model):
    """Map a GPT2LMHeadModel's weights to llama.cpp's gpt2 tensor names, as float32 arrays.

    llama.cpp names tensors by role (blk.N.attn_qkv, ...) and stores every matrix as
    [out, in]; HF GPT-2 keeps its attention and MLP matrices in Conv1D layout [in, out], so
    those are transposed. Embeddings are [vocab, n_embd] in both and are not transposed.
    """
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    t = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "output_norm.bias": sd["transformer.ln_f.bias"],
    }
    for i in range(model.config.n_layer):
        h, b = f"transformer.h.{i}.", f"blk.{i}."
        t[b + "attn_norm.weight"] = sd[h + "ln_1.weight"]
        t[b + "attn_norm.bias"] = sd[h + "ln_1.bias"]
        t[b + "attn_qkv.weight"] = sd[h + "attn.c_attn.weight"].T  # Conv1D [in, out] -> [out, in]
        t[b + "attn_qkv.bias"] = sd[h + "attn.c_attn.bias"]
        t[b + "attn_output.weight"] = sd[h + "attn.c_proj.weight"].T
        t[b + "attn_output.bias"] = sd[h + "attn.c_proj.bias"]
        t[b + "ffn_norm.weight"] = sd[h + "ln_2.weight"]
        t[b + "ffn_norm.bias"] = sd[h + "ln_2.bias"]
        t[b + "ffn_up.weight"] = sd[h + "mlp.c_fc.weight"].T
        t[b + "ffn_up.bias"] = sd[h + "mlp.c_fc.bias"]
        t[b + "ffn_down.weight"] = sd[h + "mlp.c_proj.weight"].T
        t[b + "ffn_down.bias"] = sd[h + "mlp.c_proj.bias"]
    if not model.config.tie_word_embeddings:  # tied: no output.weight, llama.cpp reuses token_embd
        t["output.weight"] = sd["lm_head.weight"]
    return {name: np.ascontiguousarray(arr) for name, arr in t.items()}


def gguf_encode_tensor(name, arr, ftype):
    """Return (data, raw_dtype) for one tensor in the requested file type.

    Only 2-D weight matrices are converted: norms and biases are tiny and precision-critical,
    and position_embd stays F32 as in llama.cpp's own converter, so they are always F32.
    """
    import gguf

    if ftype == "f32" or arr.ndim != 2 or name == "position_embd.weight":
        return arr.astype(np.float32), None
    if ftype == "f16":
        return arr.astype(np.float16), None
    if arr.shape[-1] % 32:  # q8_0 packs rows in blocks of 32 values
        raise PocketGPTError(f"q8_0 needs rows divisible by 32; {name} has shape {arr.shape}")
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(arr, qtype), qtype


def gguf_vocab(hf_dir, n_vocab):
    """Tokens, token types and merges for the GGUF tokenizer, read from tokenizer.json.

    Tokens go in as the raw byte-level strings of the vocab ("Ġthe"), which is how llama.cpp's
    gpt2 tokenizer expects them. Special tokens become CONTROL so llama.cpp only matches them
    when asked to parse specials, like HF. If the model's embedding has more rows than the
    tokenizer has tokens, the list is padded with unused tokens so the two sizes agree.
    """
    import gguf
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    id_to_token = {i: s for s, i in tj["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in tj["added_tokens"]:
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if len(id_to_token) > n_vocab or max(id_to_token) >= n_vocab:
        raise PocketGPTError(f"{hf_dir}: tokenizer has {len(id_to_token)} tokens, model vocab_size is {n_vocab}")
    tokens, token_types = [], []
    for i in range(n_vocab):
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, gguf.TokenType.UNUSED))
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older versions as "a b" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, token_types, merges


def write_gguf(hf_dir, out_path, ftype="f16"):
    """Write the HF model folder hf_dir as a llama.cpp GGUF file (arch "gpt2") and return its path.

    The file is written through write_file (a temporary name, renamed once whole), so an interrupted
    export never leaves a file that looks finished, and a full disk says so.
    """
    import gguf

    if ftype not in GGUF_FTYPES:
        raise PocketGPTError(f"ftype must be one of {GGUF_FTYPES}, got {ftype!r}")
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    cfg = model.config
    # llama.cpp's gpt2 graph is the plain GPT-2 block; refuse configs it would silently run wrong
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise PocketGPTError(f"llama.cpp gpt2 uses tanh-GELU; config has {cfg.activation_function!r}")
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
        raise PocketGPTError("llama.cpp gpt2 supports only the standard 1/sqrt(head_dim) attention scaling")

    def write(tmp):  # through the one door: a temporary name, renamed once whole
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        try:
            # hyperparameters llama.cpp reads for arch gpt2
            w.add_name(os.path.basename(os.path.normpath(hf_dir)))
            w.add_context_length(cfg.n_positions)
            w.add_embedding_length(cfg.n_embd)
            w.add_block_count(cfg.n_layer)
            w.add_head_count(cfg.n_head)
            w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)  # HF: n_inner=None means 4*n_embd
            w.add_layer_norm_eps(cfg.layer_norm_epsilon)
            w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)

            # tokenizer: byte-level BPE with the GPT-2 pre-tokenizer regex, exactly as HF runs it
            tokens, token_types, merges = gguf_vocab(hf_dir, cfg.vocab_size)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("gpt-2")  # without it llama.cpp splits words differently from HF
            w.add_token_list(tokens)
            w.add_token_types(token_types)
            w.add_token_merges(merges)
            w.add_bos_token_id(tokenizer.bos_token_id)
            w.add_eos_token_id(tokenizer.eos_token_id)
            w.add_unk_token_id(tokenizer.unk_token_id)
            w.add_pad_token_id(tokenizer.pad_token_id)
            # HF's GPT2Tokenizer adds no bos (our prompts carry <|bos|> in the text); llama.cpp must agree
            w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
            w.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
            # llama.cpp's chat (llama-cli -cnv, llama-server, create_chat_completion) renders this template
            # and stops at <|eos|>; without it they format prompts with some default template
            w.add_chat_template(CHAT_TEMPLATE)
            w.add_eot_token_id(tokenizer.eos_token_id)

            for name, arr in tensors.items():
                data, raw_dtype = gguf_encode_tensor(name, arr, ftype)
                w.add_tensor(name, data, raw_dtype=raw_dtype)

            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    tensors = gguf_tensors(model)
    bytes_per_value = {"f32": 4, "f16": 2, "q8_0": 34 / 32}[ftype]  # q8_0: 32 int8 and one fp16 scale per block
    write_file(out_path, write, needed=int(bytes_per_value * sum(a.size for a in tensors.values())))
    return Path(out_path)


def gguf_ftype(gguf_path):
    """The file type write_gguf used ("f32", "f16", "q8_0"), read back from the file."""
    import gguf
    ftype = int(gguf.GGUFReader(gguf_path).fields["general.file_type"].contents())
    return {0: "f32", 1: "f16", 7: "q8_0"}[ftype]


# llama.cpp rounds the context up to a multiple of 256 and then warns that it exceeds the model's
# (n_ctx_seq (256) > n_ctx_train (128)); pocketGPT never feeds it more than n_positions tokens.
LLAMA_HARMLESS = ("possible training context overflow",)


@contextmanager
def native_stderr_filtered(harmless=LLAMA_HARMLESS):
    """llama.cpp logs through llama-cpp-python's callback (to sys.stderr) and, for some messages,
    writes to file descriptor 2 itself: capture both around a call and pass on every line but the
    ones known to be harmless."""
    import contextlib
    import tempfile
    sys.stderr.flush()
    saved, python_side = os.dup(2), io.StringIO()
    with tempfile.TemporaryFile() as native_side:
        os.dup2(native_side.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            native_side.seek(0)
            lines = (native_side.read().decode("utf-8", "replace") + python_side.getvalue()).splitlines()
            kept = [line for line in lines if line.strip() and not any(h in line for h in harmless)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def load_llama(gguf_path, n_ctx, n_threads=None, logits_all=True):
    """Open a GGUF with llama-cpp-python (by default keeping the logits of every position, to compare)."""
    from llama_cpp import Llama
    with native_stderr_filtered():
        return Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=n_threads or torch.get_num_threads(), seed=0)


def llama_logits(llm, ids):
    """Next-token logits at every position of ids, from llama.cpp, as a [len(ids), vocab] array."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n_generate, eos_id=None):
    """Greedy continuation of ids by llama.cpp's own sampler (temp=0), stopping at eos like HF."""
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if tok == eos_id or len(out) == n_generate:
            break
    return out


def hf_greedy(model, ids, n_generate, eos_id, pad_id):
    """Greedy continuation of ids by HF generate, the reference for llama_greedy."""
    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=n_generate, eos_token_id=eos_id, pad_token_id=pad_id)
    return y[0, len(ids):].tolist()


def hf_logits(model, ids):
    """Next-token logits at every position of ids from the HF model, as a [len(ids), vocab] array."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def is_near_tie(ref_row, a, b, tol):
    """True if HF scores tokens a and b within tol: rounding of that size may pick either one."""
    return abs(float(ref_row[a]) - float(ref_row[b])) <= tol


CHECK_CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                      {"role": "user", "content": "What does a tokenizer do?"},
                      {"role": "assistant", "content": "It splits text into tokens."},
                      {"role": "user", "content": "What is dropout?"}]


@functools.lru_cache(maxsize=4)
def llama_chat_formatter(template: str):
    """llama-cpp-python's renderer for a GGUF's chat template, as its Llama builds it (compiled once)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")


def llama_chat_ids(llm, messages) -> list[int] | None:
    """The ids llama.cpp's chat feeds the model for a conversation: the GGUF's own template rendered
    (up to the answer's "Response:"), special tokens parsed; None when the GGUF carries no template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    text = llama_chat_formatter(template)(messages=messages).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def gguf_chat_check(llm, hf_dir, model, tokenizer, n_generate: int) -> dict:
    """llama.cpp's own chat path on the GGUF, against the HF folder: the template llama-cpp-python
    picks from the file's metadata renders a conversation (system text, two user turns) to the ids
    `apply_chat_template` gives, and `create_chat_completion` (greedy) answers as HF's greedy
    generation does and stops at <|eos|>."""
    hf_tok = load_tokenizer(hf_dir)
    want = list(hf_tok.apply_chat_template(CHECK_CONVERSATION, add_generation_prompt=True, tokenize=True,
                                           return_dict=False, tokenizer_kwargs={"verbose": False}))  # may pass the context
    template = llm.metadata.get("tokenizer.chat_template")
    out = {"template_used": llm.chat_format == "chat_template.default" and template == CHAT_TEMPLATE,
           "prompt_ids_equal": llama_chat_ids(llm, CHECK_CONVERSATION) == want, "answer_equal": None}
    n = min(n_generate, model.config.n_positions - len(want) - 1)
    if n > 0:  # room for an answer in the context
        ref = hf_greedy(model, want, n, tokenizer.eos_token_id, tokenizer.pad_token_id)
        reply = llm.create_chat_completion(messages=CHECK_CONVERSATION, temperature=0.0, top_k=1,
                                           max_tokens=n, seed=0)["choices"][0]
        out.update(answer_equal=reply["message"]["content"].strip() == tokenizer.decode(ref, skip_special_tokens=True).strip(),
                   finish_reason=reply["finish_reason"], hf_ended_with_eos=ref[-1:] == [tokenizer.eos_token_id])
    return out


def verify_gguf(gguf_path, hf_dir, prompts, tokenization_texts, n_generate=64):
    """Check that a GGUF behaves like the HF model it came from; return the figures or raise.

    Three checks, all against the HF folder as the reference:
      - logits: next-token logits at every position of each prompt. max|diff| must stay under
        GGUF_TOLERANCES[ftype] (a fraction of the logit range) and the top-1 token must agree
        wherever HF's choice is not a near-tie (f32/f16: everywhere, q8_0: on 99%);
      - greedy generation: n_generate tokens after each prompt must be identical (f32/f16),
        unless the first difference is a near-tie;
      - tokenization: llama.cpp's tokenizer must give HF's ids on every text, special tokens
        included (a missing pre-tokenizer type or a wrong token list shows up here first).
    A near-tie is two tokens whose HF logits differ by less than 2*max|diff|: the measured
    rounding error can swap them, so a swap there says nothing about the export being wrong.
    Raises PocketGPTError naming the file and every check that failed, with the figures.
    """
    ftype = gguf_ftype(gguf_path)
    tol = GGUF_TOLERANCES[ftype]
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    n_ctx = model.config.n_positions
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    llm = load_llama(gguf_path, n_ctx=n_ctx)
    try:
        # logits at every position of every prompt (the same ids go to both engines)
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        if max(len(ids) for ids in prompt_ids) + n_generate > n_ctx:
            raise PocketGPTError(f"a prompt + {n_generate} generated tokens exceeds n_positions={n_ctx}")
        refs = [hf_logits(model, ids) for ids in prompt_ids]
        gots = [llama_logits(llm, ids) for ids in prompt_ids]
        ref, got = np.concatenate(refs), np.concatenate(gots)
        max_diff = float(np.abs(ref - got).max())
        logit_range = float(ref.max() - ref.min())
        tie_tol = 2 * max_diff
        ref_top, got_top = ref.argmax(-1), got.argmax(-1)
        differ = np.nonzero(ref_top != got_top)[0]
        real_differ = [i for i in differ if not is_near_tie(ref[i], ref_top[i], got_top[i], tie_tol)]

        # greedy generation: identical, or the first difference is a near-tie
        greedy_identical, greedy_ok, greedy_same, greedy_total = True, True, 0, 0
        for ids in prompt_ids:
            ref_gen = hf_greedy(model, ids, n_generate, eos, pad)
            got_gen = llama_greedy(llm, ids, n_generate, eos)  # both end at eos or n_generate
            k = next((i for i, (a, b) in enumerate(zip(ref_gen, got_gen)) if a != b), None)
            greedy_total += len(ref_gen)
            greedy_same += len(ref_gen) if k is None else k
            if k is not None:
                greedy_identical = False
                context = hf_logits(model, ids + ref_gen[:k])[-1]  # HF's view where they split
                greedy_ok &= is_near_tie(context, ref_gen[k], got_gen[k], tie_tol)

        # tokenization: what a llama.cpp user gets from the raw text, bos handling included
        mismatches = [t for t in tokenization_texts
                      if tokenizer.encode(t, verbose=False) != llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)]
        chat = gguf_chat_check(llm, hf_dir, model, tokenizer, n_generate)
    finally:
        llm.close()

    figures = dict(
        ftype=ftype, max_abs_diff=max_diff, logit_range=logit_range, rel_diff=max_diff / logit_range,
        positions=len(ref), top1_agreement=1 - len(differ) / len(ref),
        top1_differ_beyond_ties=len(real_differ), greedy_identical=greedy_identical,
        greedy_same_tokens=greedy_same, greedy_tokens=greedy_total,
        tokenization_texts=len(tokenization_texts), tokenization_mismatches=len(mismatches),
        chat_template=chat["template_used"], chat_prompt_ids_equal=chat["prompt_ids_equal"],
        chat_answer_equal=chat["answer_equal"],
    )
    failures = []
    if figures["rel_diff"] > tol["rel_tol"]:
        failures.append(f"logits differ: max|diff| {max_diff:.4g} is {figures['rel_diff']:.3%} "
                        f"of the logit range {logit_range:.4g} (allowed {tol['rel_tol']:.3%})")
    if 1 - len(real_differ) / len(ref) < tol["min_top1"]:
        failures.append(f"top-1 token differs at {len(real_differ)} of {len(ref)} positions "
                        f"beyond near-ties (allowed {1 - tol['min_top1']:.0%})")
    if tol["greedy"] and not greedy_ok:
        failures.append(f"greedy generation of {n_generate} tokens differs from HF")
    if mismatches:
        failures.append(f"tokenization differs from HF on {len(mismatches)} of "
                        f"{len(tokenization_texts)} texts, e.g. {mismatches[:3]!r}")
    if not (chat["template_used"] and chat["prompt_ids_equal"]):
        failures.append(f"llama.cpp's chat does not render pocketGPT's prompt: {chat}")
    if tol["greedy"] and greedy_identical and chat["answer_equal"] is False:
        failures.append(f"create_chat_completion's greedy answer differs from HF's: {chat}")
    if failures:
        raise PocketGPTError(f"{gguf_path} does not match {hf_dir}:\n  " + "\n  ".join(failures)
                         + f"\nfigures: {figures}")
    return figures


def generation_speed(gguf_path, hf_dir, prompt, n_generate=128):
    """Greedy generation speed in tokens/s: HF generate on PyTorch vs llama.cpp on the GGUF.

    Both produce exactly n_generate new tokens (eos ignored) from the same prompt with the
    same number of CPU threads; the time includes reading the prompt, as a user would wait it.
    """
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    ids = tokenizer.encode(prompt)
    n_generate = min(n_generate, model.config.n_positions - len(ids))
    x = torch.tensor([ids])

    def hf_run(n):
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)

    hf_run(4)  # warm-up: the first call pays one-off setup costs
    t0 = time.perf_counter()
    hf_run(n_generate)
    hf_s = time.perf_counter() - t0

    llm = load_llama(gguf_path, n_ctx=model.config.n_positions)
    try:
        llama_greedy(llm, ids, 4)  # warm-up
        t0 = time.perf_counter()
        llama_greedy(llm, ids, n_generate)
        llama_s = time.perf_counter() - t0
    finally:
        llm.close()
    return dict(n_generate=n_generate, threads=torch.get_num_threads(),
                hf_tokens_per_s=n_generate / hf_s, llama_cpp_tokens_per_s=n_generate / llama_s)


TOKENIZER_PROBES = [  # strings that stress a tokenizer: unicode, emoji, odd whitespace, code, specials
    "héllo wörld", "naïve café", "日本語のテキスト", "Привет мир", "مرحبا", "🙂🚀👍🏽", "👨‍👩‍👧", "a  b   c",
    "\n\n\n", "\t\tindented", "  leading", "trailing   ", "def f(x):\n    return x**2  # square",
    "it's we'll they've I'M", "3.14159 1e-5 0x1F 1,000,000", "<|bos|>", "<|eos|>", "<pad>", "<unk>",
    "<|bos|>Instruction: hi\nResponse:", "\u00a0nbsp\u2009thin", "e\u0301 combining", "\r\nwindows",
    "ÀÉÎÕÜ ß ﬁ", "$$\\alpha$$", "https://example.com/a?b=c", "'s's 's", "ALLCAPS and MiXeD"]


def fuzz_strings(docs, n: int = 200, seed: int = 0) -> list[str]:
    """The probes, then random mixes of probes and snippets of real documents: the places where a
    tokenizer port differs (pre-tokenizer regex, whitespace runs, specials glued to text)."""
    rng = random.Random(seed)
    texts = list(TOKENIZER_PROBES)
    while len(texts) < n:
        parts = [rng.choice(TOKENIZER_PROBES) for _ in range(rng.randint(1, 4))]
        if docs:
            doc = rng.choice(docs)
            start = rng.randrange(max(1, len(doc) - 80))
            parts.insert(rng.randrange(len(parts) + 1), doc[start:start + rng.randint(5, 80)])
        texts.append(rng.choice(["", " ", "  ", "\n"]).join(parts))
    return texts


LLAMA_SKIPPED = ("not run against Hugging Face: llama-cpp-python is not installed "
                 "(pip install llama-cpp-python; it compiles llama.cpp, a few minutes)")


def llama_smoke_test(gguf_path) -> None:
    """Open a GGUF with llama.cpp and run it on a few tokens, as verify_gguf and chat do; llama_cpp_problem
    runs it in a child process, which may die of it."""
    llm = load_llama(gguf_path, n_ctx=16, n_threads=1, logits_all=False)
    try:
        llm.eval([BOS_ID, 4, 5, 6])
    finally:
        llm.close()


def llama_cpp_problem(gguf_path) -> str | None:
    """None when llama.cpp runs this GGUF here; else why it cannot, for the report card and the tests.

    llama.cpp built for another CPU (a native build on a machine that advertises AVX-512 or AMX it cannot
    run) dies of SIGILL, which would take the notebook kernel, the pipeline or pytest with it: the first
    use is tried in a child process, which sees the modules this process sees."""
    if importlib.util.find_spec("llama_cpp") is None:
        return LLAMA_SKIPPED
    stat = Path(gguf_path).stat()
    return _llama_cpp_problem(str(gguf_path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _llama_cpp_problem(gguf_path: str, size: int, mtime: int) -> str | None:
    paths = [p for p in [os.environ.get("PYTHONPATH"), str(HERE), *sys.path] if p]
    proc = subprocess.run([sys.executable, "-c", "import sys, pocketgpt_utils as pg; pg.llama_smoke_test(sys.argv[1])",
                           gguf_path], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return (f"not run: llama.cpp crashed on this CPU ({name}) running {Path(gguf_path).name}: its build uses "
                f"instructions this CPU does not execute. Build it for any CPU: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" "
                f"pip install --force-reinstall --no-cache-dir llama-cpp-python")
    error = (proc.stderr.strip().splitlines() or ["no message"])[-1]
    return f"not run: llama.cpp failed on {Path(gguf_path).name} ({error})"


def export_gguf_files(folder, out_dir, types, prompts, texts) -> list[dict]:
    """pocketGPT-{type}.gguf beside the folder; each verified against HF and timed when
    llama-cpp-python is importable (it compiles llama.cpp on install: CI has it, Kaggle need not)."""
    if not types:
        return []
    if importlib.util.find_spec("gguf") is None:
        skipped = "not written: the `gguf` package is not installed (pip install gguf; on Kaggle attach its wheel)"
        print(f"GGUF {skipped}.")
        return [{"type": ftype, "file": None, "skipped": skipped} for ftype in types]
    folder, out_dir = Path(folder), Path(out_dir)
    n_ctx = read_json(folder / "config.json")["n_positions"]
    n_generate = min(64, n_ctx - max(len(chat_prompt_ids(load_tokenizer(folder), p)) for p in prompts) - 1)
    chat, probes = [chat_prompt(p) for p in prompts], texts + fuzz_strings(texts)
    rows = []
    for ftype in types:
        path = write_gguf(folder, out_dir / f"pocketGPT-{ftype}.gguf", ftype)
        row = {"type": ftype, "file": path.name, "size_mb": path.stat().st_size / 1e6}
        problem = llama_cpp_problem(path)
        if problem is None:
            row["verify"] = verify_gguf(path, folder, chat, probes, n_generate)
            speed = generation_speed(path, folder, chat[0])
            row["tokens_per_s"], row["hf_tokens_per_s"] = speed["llama_cpp_tokens_per_s"], speed["hf_tokens_per_s"]
        else:
            row["skipped"] = problem
            if problem != LLAMA_SKIPPED:
                print(f"GGUF {ftype}: {problem}", flush=True)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Stage 4: evaluation, the report card, the exported pocketGPT folder

DEFAULT_PROMPTS = ["What does torch.nn.LayerNorm do?", "Explain transformers.GPT2LMHeadModel.",
                   "What is `DataFrame.groupby` used for?", "What does numpy.linalg.norm do?",
                   "Describe the class accelerate.Accelerator."]


@dataclasses.dataclass
class ExportConfig:
    stage: ClassVar[str] = "export"
    profile: str = "t4"
    run_dir: str | None = None
    seed: int = 1337
    tokenizer_dir: str | None = None
    pretrain_dir: str | None = None
    sft_dir: str | None = None
    out_dir: str | None = None
    prompts: list | None = None           # extra instructions to answer, after the fixed ones
    gguf_types: list | None = None        # None: ["f16", "q8_0"]; [] skips GGUF

    def __post_init__(self):
        self.run_dir = str(self.run_dir or default_run_dir(self.profile))
        self.out_dir = str(self.out_dir or Path(self.run_dir) / "export")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.gguf_types = ["f16", "q8_0"] if self.gguf_types is None else list(self.gguf_types)


def stage_hours(folder) -> float:
    """Training hours from metrics (they add up across resumed sessions), else the manifest's span."""
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
    if "hours" in metrics:
        return metrics["hours"]
    m = read_json(folder / "manifest.json")
    return (datetime.fromisoformat(m["finished_at"]) - datetime.fromisoformat(m["started_at"])).total_seconds() / 3600


def model_card(report: dict, answers: list[dict]) -> str:
    """README.md of the exported folder: what it is, how it was made, its numbers, how to use it."""
    r = report
    sample = "\n".join(f"| {md_cell(a['instruction'])} | {md_cell(a['greedy'][:160])} |" for a in answers[:3])
    return f"""# pocketGPT

A small GPT-2 ({r['parameters'] / 1e6:.1f}M parameters, {r['n_layer']} layers, {r['n_embd']} wide, context
{r['n_positions']}) trained from scratch with the pocketGPT notebooks: a byte-level BPE
tokenizer ({r['vocab_size']:,} tokens), pretraining on {r['pretrain_tokens']:,} tokens, then supervised finetuning
on {r['sft_rows']:,} instruction/response pairs (loss on the response only). Weights are fp32.

| number | value |
|---|---|
| pretrain val loss | {r['pretrain_val_loss']:.3f} (perplexity {r['pretrain_perplexity']:.1f}, {r['pretrain_bits_per_byte']:.3f} bits/byte) |
| SFT val loss on responses | {r['sft_response_loss']:.3f} (before SFT: {r['pretrain_response_loss']:.3f}) |
| answers ending with `<|eos|>` (greedy) | {r['greedy_eos_share']:.0%} |

## Use it with transformers

```python
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)
inputs = tokenizer.encode(f"<|bos|>Instruction: {{prompt}}\\nResponse:", return_tensors="pt")
out = model.generate(inputs, max_length={r['n_positions']}, do_sample=True, top_p=0.9, temperature=0.8,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```
The prompt format is also the tokenizer's chat template (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`).

## Use it with llama.cpp

`pocketGPT-f16.gguf` and `pocketGPT-q8_0.gguf` sit beside this folder (when exported). They carry this
chat template, the context length and `<|eos|>` as the end of a turn, so llama.cpp's own chat works as is:
```
llama-server -m pocketGPT-q8_0.gguf --port 8080      # /v1/chat/completions
llama-cli -m pocketGPT-q8_0.gguf -cnv
```
or in Python: `llama_cpp.Llama(model_path="pocketGPT-q8_0.gguf", n_ctx=0).create_chat_completion(messages=[{{"role": "user", "content": "What does a tokenizer do?"}}])`.

## Sample answers (greedy)

| instruction | answer |
|---|---|
{sample}
"""


def report_markdown(report: dict, answers: list[dict], versions: dict) -> str:
    rows = "\n".join(f"| {md_cell(k)} | {md_cell(v)} |" for k, v in report_rows(report))
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    ans = "\n".join(f"| {md_cell(a['instruction'])} | {md_cell(a['sampled'][:200])} | {md_cell(a['greedy'][:200])} |"
                    for a in answers)
    table = quality_table(report["quality"])
    names = list(report["quality"])
    quality = "\n".join("| " + " | ".join(md_cell(r[c]) for c in ["measure", *names]) + " |" for r in table)
    return (f"# pocketGPT report card\n\n{report['device']}; {vers}\n\n| measure | value |\n|---|---|\n{rows}\n\n"
            f"![losses](losses.png)\n\n## Answer quality on {report['quality'][names[0]]['rows']} held-out instructions\n\n"
            f"| measure | {' | '.join(names)} |\n|{'---|' * (len(names) + 1)}\n{quality}\n\n![quality](quality.png)\n\n"
            f"## Answers\n\n| instruction | sampled | greedy |\n|---|---|---|\n{ans}\n")


def duration(seconds: float) -> str:
    """8 s, 4.4 min or 10.2 h: a stage takes anything from seconds (a tokenizer) to a Kaggle session."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report_rows(r: dict) -> list[tuple[str, str]]:
    """The report card's table, in reading order."""
    pref = r.get("preference")
    rows = [("hardware", r["device"]), ("parameters", f"{r['parameters']:,}"),
            ("exported model", r.get("exported_model", "SFT") + (
                f" (preference={pref['source']!r}: {pref['pairs']:,} pairs, beta {pref['beta']}, "
                f"{pref['steps']:,} steps)" if pref else "")),
            ("tokenizer", f"{r['vocab_size']:,} tokens, {r['bytes_per_token']:.2f} bytes/token on val"),
            ("time: tokenizer / pretrain / SFT", " / ".join(duration(r[f"{s}_minutes"] * 60) for s in ["tokenizer", "pretrain", "sft"])),
            ("pretrain tokens seen", f"{r['pretrain_tokens']:,} ({r['pretrain_steps']:,} steps, finished: {r['pretrain_finished']})"),
            ("val sample (02 and 04 alike)", f"{r['pretrain_tokens_evaluated']:,} tokens of the {r['pretrain_val_split_tokens']:,}-token val split"
             + (" (all of it)" if r["pretrain_whole_split"] else ", a fixed sample spread over it")),
            ("pretrain val loss / perplexity / bits per byte", f"{r['pretrain_val_loss']:.3f} / {r['pretrain_perplexity']:.1f} / {r['pretrain_bits_per_byte']:.3f}"),
            ("SFT model on the same: val loss / perplexity / bits per byte", f"{r['sft_val_loss']:.3f} / {r['sft_perplexity']:.1f} / {r['sft_bits_per_byte']:.3f}"),
            ("SFT rows / tokens seen", f"{r['sft_rows']:,} / {r['sft_tokens']:,}"),
            ("response loss before / after SFT", f"{r['pretrain_response_loss']:.3f} / {r['sft_response_loss']:.3f} "
             f"(on SFT's {r['heldout_rows']:,} held-out evaluation rows)"),
            ("answers ending with <|eos|> (sampled / greedy)", f"{r['sampled_eos_share']:.0%} / {r['greedy_eos_share']:.0%}"),
            ("distinct-2 (sampled / greedy)", f"{r['sampled_distinct2']:.2f} / {r['greedy_distinct2']:.2f}")]
    for f in r.get("gguf", []):
        if "verify" not in f:  # never a nan: what was not checked, and the command that checks it
            size = f"{f['size_mb']:.1f} MB, " if f.get("file") else ""
            rows.append((f"GGUF {f['type']}", size + f.get("skipped", LLAMA_SKIPPED)))
            continue
        v = f["verify"]
        rows.append((f"GGUF {f['type']}", f"{f['size_mb']:.1f} MB; against HF: top-1 agreement {v['top1_agreement']:.1%}, "
                     f"greedy tokens the same {v['greedy_same_tokens']}/{v['greedy_tokens']}; "
                     f"{f['tokens_per_s']:.0f} tok/s greedy (HF generate: {f['hf_tokens_per_s']:.0f} tok/s)"))
    if not r.get("gguf"):
        rows.append(("GGUF", "not written (gguf_types=[])"))
    return rows


def export_checks(r: dict) -> list[dict]:
    """What the checks of the export found, one row each, for 04 to show (a skipped check says why)."""
    v = r["verify"]
    yes = {True: "yes", False: "NO"}
    rows = [("pocketGPT/ loaded by the seed's code in a fresh process: largest logit difference",
             f"{v['max_abs_logit_diff']:.2g} ({v['dtype']})"),
            ("its decoded answer starts with the instruction", yes[v["text_starts_with_instruction"]]),
            ("tokenizer size equals the model's vocabulary", yes[v["tokenizer_matches_vocab"]]),
            ("slow tokenizer (vocab.json + merges.txt) encodes as the fast one", yes[v["slow_tokenizer_matches_fast"]]),
            ("<pad> and <|eos|> have the ids the seed uses", yes[v["special_ids"]]),
            ("sample answer", v["sample"])]
    rows += [(k, val) for k, val in report_rows(r) if k.startswith("GGUF")]
    return [{"check": k, "result": val} for k, val in rows]


def show_report(export_dir) -> None:
    """report.md inside a notebook: its markdown, and each figure it links shown as an image (the
    links are relative to the export folder, which the notebook's browser cannot open)."""
    from IPython.display import Image, Markdown, display

    export_dir = Path(export_dir)
    text = (export_dir / "report.md").read_text(encoding="utf-8")
    for i, part in enumerate(re.split(r"^!\[[^\]]*\]\(([^)]+)\)$", text, flags=re.M)):
        if i % 2:  # a figure's file name
            if (export_dir / part).is_file():
                display(Image(filename=str(export_dir / part)))
        elif part.strip():
            display(Markdown(part))


def md_cell(value) -> str:
    """Text for a markdown table cell: a '|' in it (as in `<|eos|>`) would end the cell, a newline the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@quiet_library_bars()
def run_export_stage(cfg: ExportConfig) -> Path:
    """Stage 4, whole: evaluate both models, write and verify the export, the zip and the report card."""
    tok_dir = find_stage("tokenizer", cfg.tokenizer_dir, cfg.run_dir)
    pre = find_stage("pretrain", cfg.pretrain_dir, cfg.run_dir)
    sft = find_stage("sft", cfg.sft_dir, cfg.run_dir)
    pre_model, sft_model = load_model(pre / "model"), load_model(sft / "model")  # model/: what 03 exports
    tuned = read_json(sft / "metrics.json")["exported_model"] == "SFT + DPO"  # model_sft/ is the SFT model before it
    sft_phase_model = load_model(sft / "model_sft") if tuned else sft_model
    tok = load_tokenizer(sft / "model")
    heldout = [(r["prompt"], r["response"]) for r in read_json(sft / "heldout.json")]
    n_windows = read_json(pre / "manifest.json")["params"].get("eval_windows", PretrainConfig.eval_windows)
    pre_eval = eval_val_split(pre_model, tok_dir, n_windows)
    answers, summary = answer_table(sft_model, tok, DEFAULT_PROMPTS + list(cfg.prompts or []),
                                    sft_model.config.n_positions, cfg.seed)
    meta, pre_m, sft_m = read_json(tok_dir / "meta.json"), read_json(pre / "metrics.json"), read_json(sft / "metrics.json")
    c = sft_model.config
    report = {
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "parameters": count_params(sft_model), "n_layer": c.n_layer, "n_embd": c.n_embd, "n_positions": c.n_positions,
        "vocab_size": c.vocab_size, "bytes_per_token": meta["val_bytes_per_token"],
        "tokenizer_minutes": stage_hours(tok_dir) * 60, "pretrain_minutes": stage_hours(pre) * 60,
        "sft_minutes": stage_hours(sft) * 60, "pretrain_tokens": pre_m["tokens"], "pretrain_steps": pre_m["steps"],
        "pretrain_finished": pre_m["finished"], **{f"pretrain_{k}": v for k, v in pre_eval.items()},
        "sft_rows": sft_m.get("data_train_rows", 0), "sft_tokens": sft_m["tokens"],
        "heldout_rows": len(heldout), "pretrain_response_loss": eval_responses(pre_model, tok, heldout),
        "sft_response_loss": eval_responses(sft_phase_model, tok, heldout),
        "exported_model": "SFT + DPO" if tuned else "SFT",
        **{f"sft_{k}": v for k, v in eval_val_split(sft_model, tok_dir, n_windows).items()}, **summary,
    }
    sample = [heldout[i] for i in eval_sample(len(heldout), QUALITY_ROWS)]
    quality, quality_answers = {}, {}
    models = [("pretrained", pre_model, report["pretrain_response_loss"]),
              ("SFT", sft_phase_model, report["sft_response_loss"])]
    if tuned:
        pref = read_json(sft / "metrics.json").get("preference", {})
        report["preference"] = {k: pref.get(k) for k in ["source", "beta", "rpo_alpha", "learning_rate", "pairs",
                                                          "steps", "final_val_loss", "finished"]}
        models.append(("SFT + DPO", sft_model, eval_responses(sft_model, tok, heldout)))
    for name, model, loss in models:
        quality[name], quality_answers[name] = answer_quality(model, tok, sample, cfg.seed)
        quality[name]["response_loss"] = loss
    report["quality"] = quality
    inputs = {"tokenizer": tok_dir, "pretrain": pre, "sft": sft}
    with stage_output(cfg.out_dir, "export", dataclasses.asdict(cfg), inputs) as work:
        folder = work / "pocketGPT"
        write_export_folder(sft_model, tok, folder, model_card(report, answers))
        report["verify"] = verify_export(folder, sft_model)
        val_docs = decode_documents(np.asarray(read_bin(tok_dir / "val.bin"))[:200_000], tok)[:200]
        # more positions to compare logits at: held-out prompts that leave half the context for the greedy text
        gguf_prompts = DEFAULT_PROMPTS + [p for p, _ in heldout
                                          if len(chat_prompt_ids(tok, p)) <= sft_model.config.n_positions // 2][:15]
        report["gguf"] = export_gguf_files(folder, work, cfg.gguf_types, gguf_prompts, val_docs)
        write_file(work / "pocketGPT.zip", zip_folder(folder), needed=size_of(folder))
        plot_losses({"pretrain": pre / "log.csv", "sft": sft / "log.csv"}, work / "losses.png", show=False)
        plot_quality(quality, work / "quality.png", show=False)
        write_json(work / "answers.json", answers)
        write_json(work / "quality_answers.json", quality_answers)
        write_json(work / "metrics.json", report)
        write_file(work / "report.md", report_markdown(report, answers, library_versions()))
    return Path(cfg.out_dir)


# -----------------------------------------------------------------------------
# Plotting (figures are returned for the notebook to show, and saved as PNG beside the data)

def plot_length_distributions(stage_dir):
    """Histograms of document length in bytes and in tokens (log scale: corpora have long tails)."""
    import matplotlib.pyplot as plt

    d = np.load(Path(stage_dir) / "doc_stats.npz")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, unit in zip(axes, ["bytes", "tokens"], ["bytes", "tokens"]):
        values = np.maximum(d[key], 1)
        bins = np.logspace(0, np.log10(values.max() + 1), 50)
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"document length ({unit})")
        ax.set_ylabel("documents")
        ax.set_title(f"median {np.median(values):,.0f} {unit}, max {values.max():,} {unit}")
    fig.tight_layout()
    return finish_figure(fig, Path(stage_dir) / "lengths.png")


def read_log(path) -> list[dict]:
    """log.csv as a list of rows, numbers as floats and empty cells as None."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def save_figure(fig, path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def finish_figure(fig, out_png=None, show: bool = True):
    """Saved as PNG when asked; show=False closes it, so a stage that only saves a figure does not
    draw it in the notebook."""
    import matplotlib.pyplot as plt

    if out_png:
        save_figure(fig, out_png)
    if not show:
        plt.close(fig)
    return fig


def plot_losses(logs: dict, out_png=None, show: bool = True):
    """Train and val loss against tokens seen, one panel per stage; saved as PNG when asked.
    show=False closes the figure, so a stage that only saves it does not draw it in the notebook."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(7 * len(logs), 4.2), squeeze=False)
    for ax, (name, path) in zip(axes[0], logs.items()):
        rows = read_log(path)
        train = [(r["tokens"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
        val = [(r["tokens"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if train:  # each logged train loss is the mean over its log window
            ax.plot(*zip(*train), color="C0", label="train")
        if val:
            ax.plot(*zip(*val), "o-", color="C1", label="val")
        accuracy = [(r["tokens"], r["reward_accuracy"]) for r in rows if r.get("reward_accuracy") is not None]
        if accuracy:  # DPO: the share of pairs whose chosen answer the model now prefers
            twin = ax.twinx()
            twin.plot(*zip(*accuracy), color="C2", label="reward accuracy")
            twin.set_ylim(0, 1)
            twin.set_ylabel("reward accuracy")
            twin.legend(loc="upper right")
        ax.set_title(name)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return finish_figure(fig, out_png, show)


# -----------------------------------------------------------------------------
# Chat: talk to an exported model (its folder or a GGUF) from a terminal, or answer one prompt

class PrintStreamer(TextStreamer):
    """transformers' streamer, handing each finished piece of text to a function (not print)."""

    def __init__(self, tok, on_text):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.on_text(text)


class FolderChat:
    """A conversation with an export folder (or any pocketGPT model folder) through transformers,
    on the GPU where there is one, sampled as the seed samples unless greedy."""

    def __init__(self, path):
        folder = Path(path)
        folder = folder / "pocketGPT" if (folder / "pocketGPT" / "config.json").is_file() else folder
        self.model = load_model(folder).to("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(folder)
        self.tok.chat_template = self.tok.chat_template or CHAT_TEMPLATE
        self.n_ctx = self.model.config.n_positions
        self.where = f"{folder} (transformers, {self.model.device.type})"

    def prompt_ids(self, messages) -> list[int]:
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                 tokenizer_kwargs={"verbose": False}))  # a long one is cut after

    def answer(self, messages, max_new_tokens: int, greedy: bool, seed: int, on_text) -> str:
        new = generate(self.model, self.tok, self.prompt_ids(messages), max_new_tokens, greedy=greedy, seed=seed,
                       streamer=PrintStreamer(self.tok, on_text))
        return self.tok.decode(new, skip_special_tokens=True).strip()


class GGUFChat:
    """The same conversation through llama.cpp (llama-cpp-python), which formats it with the chat
    template the GGUF carries and stops at <|eos|>: what llama-server and llama-cli do with it."""

    def __init__(self, path):
        problem = llama_cpp_problem(path)
        if problem == LLAMA_SKIPPED:
            raise PocketGPTError(f"{path} is a GGUF: chatting with it needs llama-cpp-python "
                                 f"(pip install llama-cpp-python), or chat with the export folder instead.")
        if problem:
            raise PocketGPTError(f"{path}: llama.cpp {problem.removeprefix('not run: llama.cpp ')}. Or chat with the "
                                 f"export folder instead.")
        self.llm = load_llama(path, n_ctx=0, logits_all=False)  # n_ctx=0: the model's own context
        if not self.llm.metadata.get("tokenizer.chat_template"):
            raise PocketGPTError(f"{path} carries no chat template (a GGUF from before it did): export again with 04.")
        self.n_ctx = int(self.llm.metadata["gpt2.context_length"])
        self.where = f"{path} (llama.cpp)"

    def prompt_ids(self, messages) -> list[int]:
        return llama_chat_ids(self.llm, messages)

    def answer(self, messages, max_new_tokens: int, greedy: bool, seed: int, on_text) -> str:
        room = self.n_ctx - len(self.prompt_ids(messages))
        if room < 1:
            raise PocketGPTError(f"the message is longer than the model's context ({self.n_ctx} tokens): shorten it.")
        sampling = (dict(temperature=0.0, top_k=1) if greedy else  # the seed's sampling, as transformers does it
                    dict(temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=50, min_p=0.0))
        parts = []
        for chunk in self.llm.create_chat_completion(messages=messages, max_tokens=min(max_new_tokens, room),
                                                     stream=True, seed=seed, **sampling):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                parts.append(text)
                on_text(text)
        return "".join(parts).strip()

    def close(self):
        self.llm.close()


def open_chat(path):
    """A FolderChat for a folder, a GGUFChat for a .gguf file; an error that says which paths work."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFChat(path)
    if path.is_dir() and ((path / "config.json").is_file() or (path / "pocketGPT" / "config.json").is_file()):
        return FolderChat(path)
    raise PocketGPTError(f"chat {path}: give an export folder (04's export/ or its pocketGPT/), a model folder "
                         f"with config.json, or a .gguf file.")


def fit_conversation(bot, messages: list[dict], room: int) -> list[dict]:
    """Drop the oldest exchanges (a system text stays) until the prompt leaves `room` tokens of the
    context for the answer; the newest message is always kept (generate() cuts it if it must)."""
    messages = list(messages)
    while len(bot.prompt_ids(messages)) > bot.n_ctx - room:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) <= 1:
            break
        messages = [m for i, m in enumerate(messages) if m["role"] == "system" or i >= users[1]]
    return messages


def chat(path, prompt: str | None = None, system: str | None = None, greedy: bool = False,
         max_new_tokens: int | None = None, seed: int = 1337, stdin=None, out=None) -> int:
    """`python pocketgpt_utils.py chat PATH`: a conversation in the terminal (each answer streams;
    earlier turns stay in the prompt while they fit the context; /reset forgets them; an empty
    line is ignored; Ctrl-D or /quit ends), or with `prompt` one answer, printed, for scripts."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    bot = open_chat(path)
    max_new = max_new_tokens or bot.n_ctx // 2
    room = min(max_new, bot.n_ctx // 4)  # what an answer keeps at least, when old turns are dropped

    def write(text):
        out.write(text)
        out.flush()

    base = [{"role": "system", "content": system}] if system else []
    try:
        if prompt is not None:
            messages = fit_conversation(bot, base + [{"role": "user", "content": prompt}], room)
            answer = bot.answer(messages, max_new, greedy, seed, on_text=lambda t: None)
            write(answer + "\n")
            return 0
        write(f"pocketGPT chat: {bot.where}, {'greedy' if greedy else 'sampled as the seed samples'}. "
              f"/reset forgets the conversation, Ctrl-D or /quit ends.\n")
        messages, turn = list(base), 0
        while True:
            write("you> ")
            line = stdin.readline()
            if not line or line.strip() == "/quit":
                write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                messages = list(base)
                continue
            messages = fit_conversation(bot, messages + [{"role": "user", "content": text}], room)
            write("pocketGPT>")
            started = []  # the first piece starts after the "Response:" of the prompt: one space, not two

            def show(piece):
                write(piece if started else " " + piece.lstrip())
                started.append(True)
            answer = bot.answer(messages, max_new, greedy, seed + turn, on_text=show)
            write("\n")
            messages.append({"role": "assistant", "content": answer})
            turn += 1
    finally:
        if hasattr(bot, "close"):
            bot.close()


# -----------------------------------------------------------------------------
# Command line: the pipeline (papermill), demo data, the benchmark

def parse_value(text: str):
    """`-p NAME VALUE`: a Python literal where it is one (3, 0.1, None, True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_notebook(notebook: Path, out_path: Path, parameters: dict, log_output: bool = True) -> None:
    """Execute one notebook with papermill, save it, render it to HTML; one clear error on failure."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    params = {k: v for k, v in parameters.items() if k in declared}
    before = os.environ.get("POCKETGPT_PROGRESS")
    os.environ.setdefault("POCKETGPT_PROGRESS", "lines")  # the kernel inherits it: a saved notebook gets lines, not bars
    try:
        pm.execute_notebook(str(notebook), str(out_path), parameters=params, cwd=str(notebook.parent),
                            kernel_name="python3", log_output=log_output, progress_bar=False)
    except pm.PapermillExecutionError as e:
        raise PocketGPTError(f"{notebook.stem} failed in cell {e.exec_count} ({e.ename}: {e.evalue}). "
                             f"The executed notebook is saved at {out_path}.") from None
    finally:
        if before is None:
            os.environ.pop("POCKETGPT_PROGRESS", None)
        if out_path.exists():
            render_html(out_path)


def render_html(notebook_path: Path) -> Path:
    """An executed notebook as one self-contained HTML page (plots embedded) to read in a browser."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook_path), as_version=4))
    html = notebook_path.with_suffix(".html")
    write_file(html, body)
    return html


DATA_FILES = {"corpus": "corpus.txt", "dialogs": "dialogs.csv"}
DATA_STAGES = {"corpus": "tokenizer", "dialogs": "sft"}  # the stage that reads each


def pipeline_inputs(run_dir, corpus=None, dialogs=None, stages=None) -> dict:
    """corpus_path and dialogs_path for the notebooks. Your own corpus with the demo dialogs (or
    the reverse) is never chosen in silence: give both, or neither (the demo data), or say `demo`
    for the one you want from the demo data."""
    given = {"corpus": corpus, "dialogs": dialogs}
    needed = {k for k, stage in DATA_STAGES.items() if not stages or stage in stages}
    if any(v not in (None, "demo") for v in given.values()):
        for key in needed:
            if given[key] is None:
                other = next(k for k in given if k != key)
                raise PocketGPTError(f"--{other} was given without --{key}: pass --{key} PATH (your "
                                     f"{DATA_FILES[key]}), or --{key} demo to use the demo {DATA_FILES[key]}.")
    out = {}
    for key in needed:
        path = given[key] if given[key] not in (None, "demo") else demo_data(run_dir) / DATA_FILES[key]
        out[f"{key}_path"] = str(path)
    return out


def run_pipeline(profile: str | None = None, run_dir=None, corpus=None, dialogs=None, params=None,
                 stages=None, log_output: bool = True) -> Path:
    """Run the notebooks that exist, 01 -> 04, each reading the folder the previous one wrote."""
    profile, why = resolve_profile(profile)
    print(f"profile {profile!r}: {why}", flush=True)
    run_dir = Path(run_dir or default_run_dir(profile)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"profile": profile, "run_dir": str(run_dir), **pipeline_inputs(run_dir, corpus, dialogs, stages),
                  **(params or {})}
    (run_dir / "notebooks").mkdir(exist_ok=True)
    for stage, name in STAGES.items():
        notebook = HERE / "notebooks" / f"{name}.ipynb"
        if not notebook.exists() or (stages and stage not in stages):
            continue
        started = time.time()
        print(f"== {name} ==", flush=True)
        run_notebook(notebook, run_dir / "notebooks" / f"{name}.ipynb", parameters, log_output)
        print(f"== {name} done in {time.time() - started:.0f}s ==", flush=True)
    return run_dir


STAGE_RUNNERS = {"tokenizer": (TokenizerConfig, build_tokenizer_stage), "pretrain": (PretrainConfig, run_pretrain_stage),
                 "sft": (SFTConfig, run_sft_stage), "export": (ExportConfig, run_export_stage)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pocketgpt_utils.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="run notebooks 01-04 with papermill")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: t4 on a GPU, demo on a CPU")
    p.add_argument("--run-dir", help="the run folder (default runs/<profile>)")
    p.add_argument("--corpus", help="your corpus: a .txt file, folder or glob; `demo` or none: the demo corpus")
    p.add_argument("--dialogs", help="your instruction/response CSV; `demo` or none: the demo dialogs")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), help="run only these stages")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter, e.g. -p max_steps 100")
    d = sub.add_parser("demo-data", help="write the demo corpus.txt and dialogs.csv")
    d.add_argument("--out", required=True)
    d.add_argument("--max-bytes", type=int, default=6_000_000)
    d.add_argument("--max-dialogs", type=int, default=20_000)
    st = sub.add_parser("stage", help="run one stage without a notebook (e.g. under `accelerate launch`)")
    st.add_argument("name", choices=list(STAGES))
    st.add_argument("--profile", choices=sorted(PROFILES), help="default: t4 on a GPU, demo on a CPU")
    st.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    c = sub.add_parser("chat", help="talk to an exported model (its folder or a .gguf) in the terminal")
    c.add_argument("path", help="04's export folder, its pocketGPT/ folder, or a pocketGPT-*.gguf")
    c.add_argument("--prompt", help="answer this one instruction and exit (for scripts)")
    c.add_argument("--system", help="a system text put before the first instruction")
    c.add_argument("--greedy", action="store_true", help="always the likeliest token (default: the seed's sampling)")
    c.add_argument("--max-new-tokens", type=int, help="longest answer (default: half the context)")
    c.add_argument("--seed", type=int, default=1337)
    b = sub.add_parser("bench", help="time the training step (tokens/s, MFU) on this device")
    b.add_argument("--profile", default="t4", choices=sorted(PROFILES))
    b.add_argument("--reference", action="store_true", help="also time a plain PyTorch GPT of the same shape")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    try:
        if args.command == "pipeline":
            import logging  # papermill logs each cell's output: the progress of a headless run

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            noise = ("Executing Cell", "Ending Cell", "Input Notebook", "Output Notebook", "Working directory",
                     "Executing notebook", "<IPython.core.display.")  # a figure's text stand-in
            def keep(record) -> bool:  # a cell's output ends with its own newline: no blank line after each
                record.msg, record.args = record.getMessage().rstrip("\n"), ()
                return not record.msg.startswith(noise) and bool(record.msg.strip())

            logging.getLogger().handlers[0].addFilter(keep)
            params = {k: parse_value(v) for k, v in args.param}
            run_dir = run_pipeline(args.profile, args.run_dir, args.corpus, args.dialogs, params, args.stages)
            print(f"done: {run_dir}")
        elif args.command == "stage":
            cls, fn = STAGE_RUNNERS[args.name]
            cfg = make_config(cls, args.profile, **{k: parse_value(v) for k, v in args.param})
            note = launcher_mismatch()
            if note and is_main_process():
                print(f"note: {note}", flush=True)
            out = fn(cfg)
            if is_main_process():
                print(f"done: {out}")
        elif args.command == "bench":
            params = {k: parse_value(v) for k, v in args.param}
            try:
                print(json.dumps(bench(args.profile, params, args.reference, args.steps, args.warmup)))
            except torch.cuda.OutOfMemoryError:
                size = params.get("batch_size", make_config(PretrainConfig, args.profile, run_dir="unused").batch_size)
                raise PocketGPTError(f"bench: out of GPU memory at batch_size={size}: try -p batch_size "
                                     f"{max(1, int(size) // 2)}.") from None
        elif args.command == "chat":
            return chat(args.path, args.prompt, args.system, args.greedy, args.max_new_tokens, args.seed)
        elif args.command == "demo-data":
            print(json.dumps(make_demo_data(args.out, args.max_bytes, args.max_dialogs)))
    except PocketGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
