"""What every stage stands on: errors, paths, processes, progress, the one write door, stage folders.

Owns: PocketGPTError; the special tokens and stage names; where a run lives (here or on Kaggle); which
process may write (rank 0); progress bars for watched and headless runs; write_file / write_folder, the
only way a stage writes (atomic, rank 0 only, a full disk said once); stage_output (a stage's .partial
folder, renamed into place with its manifest) and finding finished stages and checkpoints by manifest.
Imports: the standard library and tqdm only (torch where a function needs it; data's fingerprint inside
stage_output, until stage folders move above data), so the command line's help and its checks answer without
loading torch.
"""
from __future__ import annotations

import csv
import errno
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

# before the libraries import tqdm.auto: without ipywidgets it warns, and text bars are what we want
warnings.filterwarnings("ignore", message="IProgress not found")
from tqdm import tqdm  # noqa: E402

HERE = Path(__file__).resolve().parent.parent  # the folder of pocketgpt_utils.py, notebooks/ and runs/
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|bos|>", "<|eos|>"]  # ids 0..3, in this order
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# the four by the names transformers gives them, in the order of its special_tokens_map.json
TOKEN_ROLES = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
               "unk_token": SPECIAL_TOKENS[UNK_ID], "pad_token": SPECIAL_TOKENS[PAD_ID]}
IGNORE_ID = -100  # a target the loss skips (a prompt, padding): cross_entropy's ignore_index
STAGES = {"tokenizer": "01_tokenizer", "pretrain": "02_pretrain", "sft": "03_sft", "export": "04_eval_export"}


# -----------------------------------------------------------------------------
# Errors

class PocketGPTError(Exception):
    """An error the user can fix: the message names the file or parameter and what to do."""


class DiskFullError(PocketGPTError):
    """A write that found the disk full; the message says where, what is free and about what was needed."""


# -----------------------------------------------------------------------------
# Where a run lives, and which process writes

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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_main_process() -> bool:
    """Rank 0, or the only process: torchrun and `accelerate launch` (and so pg.launch's workers) set RANK."""
    return int(os.environ.get("RANK", "0")) == 0


LAUNCH_EVENTS = "POCKETGPT_LAUNCH_EVENTS"  # launch() -> its workers: the folder they report events into


def report_launch_event(event: str, **info) -> bool:
    """Tell launch(), when it started this process, that `event` happened ("started": the processes took their
    first step together; "done": the stage finished): a file `<event>.json` in the folder it named, written by
    rank 0. Processes talk in files, never in the words of a message, so a message can be reworded freely.
    Returns whether a launcher was told (False when none started this process)."""
    folder = os.environ.get(LAUNCH_EVENTS)
    if not folder:
        return False
    if is_main_process():
        write_json(Path(folder) / f"{event}.json", {"event": event, "at": now_iso(), **info})
    return True


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


# -----------------------------------------------------------------------------
# Progress: live where someone watches, a few lines in a saved notebook

def child_env() -> dict:
    """The environment for a fresh Python process of ours: it finds what this one imports (the package, and on
    Kaggle the wheels the notebook put on sys.path), after whatever PYTHONPATH already says."""
    paths = [p for p in [os.environ.get("PYTHONPATH"), str(HERE), *sys.path] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


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


# -----------------------------------------------------------------------------
# The one door through which files are written

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
    import torch

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
    import torch

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


# -----------------------------------------------------------------------------
# Stage folders: a .partial renamed into place with its manifest, found by it

def stage_manifest(folder, stage: str) -> dict | None:
    """The manifest of `folder` when it says a finished `stage` wrote the folder, else None."""
    try:
        manifest = read_json(Path(folder) / "manifest.json")
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("stage") == stage and manifest.get("finished_at") \
        else None


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
            manifest = stage_manifest(m.parent, stage)
            if manifest:
                found.append((manifest["finished_at"], m.parent))
    if not found:
        hint = (f"attach the output of the {STAGES[stage]} notebook to this one" if on_kaggle()
                else f"run notebooks/{STAGES[stage]}.ipynb first")
        raise PocketGPTError(f"No finished '{stage}' stage found in {where}: {hint}, "
                             f"or pass its folder (the one holding manifest.json) as a parameter.")
    return max(found)[1]


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
    from .data import fingerprint  # data sits above common: stage_output moves to stages.py, above data (issue 32)

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


def stage_status(folder) -> str:
    """How a stage's run ended, in one line for the pipeline, the notebook and the report card: finished, or
    stopped by its time budget at step N of M, and how to go on from there."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        return f"not finished: {folder} holds no metrics.json"
    m, stage = read_json(folder / "metrics.json"), read_json(folder / "manifest.json")["stage"]
    if "steps" not in m:  # 01 and 04 have no steps: a manifest means done
        return "finished"
    preference = m.get("preference")
    phases = [("the SFT phase" if stage == "sft" and read_json(folder / "manifest.json")["params"].get("preference")
               else "", m)] + ([("the preference phase", preference)] if preference else [])
    stopped = next(((name, p) for name, p in phases if p["max_steps"] is None or p["steps"] < p["max_steps"]), None)
    if stopped is None:
        return "finished: " + ", ".join(f"{name + ' ' if name else ''}{p['steps']:,} steps" for name, p in phases)
    name, p = stopped
    why = "by its time budget" if p["stop_reason"] == "time_budget" else f"({p['stop_reason']})"
    later = " ".join(list(STAGES)[list(STAGES).index(stage):])
    return (f"stopped {why} at step {p['steps']:,} of {p['max_steps']:,}{' in ' + name if name else ''} "
            f"(this session: {duration(p['session_hours'] * 3600)}); to continue, run {STAGES[stage]} again with "
            f"resume_from='auto' (pipeline: --stages {later} -p resume_from auto)")


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


def own_checkpoints(stage: str, out_dir) -> list[Path]:
    """The folders of this stage's own output that a resume found without a path may start from: `out_dir`
    when its manifest says it is a finished `stage` folder, and the .partial that stage_output makes beside it
    (it has no manifest until it is renamed into place). A ckpt.pt anywhere else is never picked up."""
    out_dir = Path(out_dir)
    return [f for f in [out_dir] if stage_manifest(f, stage)] + [partial_dir(out_dir)]


def resolve_resume(resume_from, stage: str, out_dir) -> Path | None:
    """The folder to resume from, or None for a fresh run.

    "auto": the newer checkpoint of this stage's folder (by its manifest) and its .partial (a run killed
    after it resumed has a .partial newer than the finished folder it started from). A folder: that one,
    or the .partial beside it when that is newer (after a crash only the .partial exists). None:
    a fresh run here; on Kaggle, the newest of an attached earlier run (a finished folder of this stage, by its
    manifest: find_stage) and this session's own. Whatever is found is read as data only (load_checkpoint).
    """
    if resume_from == "auto":
        return newest_checkpoint(own_checkpoints(stage, out_dir))
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
        return newest_checkpoint(attached + own_checkpoints(stage, out_dir))
    return None


# -----------------------------------------------------------------------------
# Numbers for people

def is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """8 s, 4.4 min or 10.2 h: a stage takes anything from seconds (a tokenizer) to a Kaggle session."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
