"""The one door through which files are written: atomically, by rank 0 only, a full disk said once.

Owns: write_file / write_folder (a temporary name renamed into place; the other processes of a multi-GPU run
write nothing), the contents they take (torch_file, zip_folder, csv_text, write_json), DiskFullError and its one
message (disk_full_error, space_for), check_writable (an output folder tried before hours of work), and
report_launch_event (a worker's report to launch(): a file, never a sentence).
Imports: common, the standard library (torch where a function needs it).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .common import LAUNCH_EVENTS, PocketGPTError, human_bytes, is_main_process, now_iso

# -----------------------------------------------------------------------------
# A full disk: one message, whatever the writer

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


# -----------------------------------------------------------------------------
# Writing: a temporary name renamed into place, by rank 0

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
