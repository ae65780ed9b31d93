"""What every layer stands on: errors, special tokens, where a run lives, which process writes, progress bars.

Owns: PocketGPTError; the special tokens and stage names; where a run lives (here or on Kaggle); which
process may write (rank 0) and how many train together; the launcher's event folder (LAUNCH_EVENTS);
progress bars for watched and headless runs; numbers for people.
The write door is files.py, data formats data.py, a stage folder stages.py.
Imports: the standard library and tqdm only (transformers where a function needs it), so the command line's
help and its checks answer without loading torch.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import warnings
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
