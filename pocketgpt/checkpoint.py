"""What a checkpoint holds and how a run comes back from one: the run's state (RunState, saved and restored
whole), reading ckpt.pt as data only (a file that is not ours is refused in one message), restoring model,
optimizers, scaler and data position, and each process's random streams.

train.py writes the checkpoint (Run.save_checkpoint); pretrain, sft and dpo read one to resume.
Imports: common, stages.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .common import PocketGPTError
from .stages import StageDir


@dataclasses.dataclass
class RunState:
    """Where a run is, besides its weights, optimizers and data position: saved whole in every checkpoint
    and restored whole, so a resumed run carries on as if it had never stopped."""
    step: int = 0
    tokens: int = 0                 # real tokens trained on by all processes, up to the last closed log window
    log: list = dataclasses.field(default_factory=list)  # the log rows so far (log.csv is written from them)
    hours: float = 0.0              # training hours of every session so far (for the report, not the budget)
    skipped_steps: int = 0          # fp16 steps the GradScaler skipped
    max_steps: int | None = None    # the plan: the run's max_steps, or what max_steps="auto" planned (None: not yet)
    data_limited: bool = False      # max_steps="auto" planned no more than max_epochs of the data (the budget had room)
    val_loss: float | None = None   # the last evaluation's loss
    window: dict | None = None      # the log window open when the checkpoint was taken (LogWindow.saved)
    micro_batch: int | None = None  # rows per process per micro-step, as fitted to the device (None: not yet)
    grad_accum_steps: int | None = None  # micro-steps per optimizer step that go with it

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        if "state" in ckpt:
            return cls(**ckpt["state"])
        planned = ckpt["config"].get("max_steps")  # a checkpoint from before RunState: its fields at the top
        return cls(step=ckpt["step"], tokens=ckpt.get("tokens", 0), log=list(ckpt.get("log", [])),
                   hours=ckpt.get("hours", ckpt.get("elapsed_s", 0.0) / 3600), skipped_steps=ckpt.get("skipped_steps", 0),
                   max_steps=planned if isinstance(planned, int) else None, val_loss=ckpt.get("val_loss"),
                   window=ckpt.get("window"))


def restore_checkpoint(ckpt: dict, model, optimizers, kinds, scaler, train_data) -> RunState:
    """Model, optimizers, scaler and data position from a checkpoint (the random streams come after the DDP
    wrap, restore_rng); returns the run's state."""
    model.load_state_dict(ckpt["model"])
    saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
    saved_kinds = ckpt.get("optimizers", ["adamw"])  # checkpoints from before Muon hold one AdamW
    if saved_kinds != kinds:
        raise PocketGPTError(f"resume_from: that run trained with {' + '.join(saved_kinds)}, this one would use "
                             f"{' + '.join(kinds)}: set optimizer={'muon' if 'muon' in saved_kinds else 'adamw'!r} "
                             f"to resume it.")
    for opt, opt_state in zip(optimizers, saved):
        opt.load_state_dict(opt_state)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    train_data.load_state(ckpt["data"])
    return RunState.from_checkpoint(ckpt)


# -----------------------------------------------------------------------------
# The checkpoint file, read as data only

CHECKPOINT_KEYS = ("model", "optimizer", "data", "rng", "config")  # what every pocketGPT checkpoint has held


def legacy_numpy_globals() -> list:
    """What a checkpoint written before rng_state kept plain types holds beyond them: numpy's random state, an
    array of uint32 (numpy's array rebuilder, by the names numpy 1.x and 2.x pickle it under; ndarray; dtype and
    the class of its uint32 instance, which is built). Nothing else of numpy, and nothing that runs code."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            *[(reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy.core", "numpy._core")]]


def load_checkpoint(folder) -> dict:
    """ckpt.pt from a stage folder (finished, or the .partial a stopped run left), read as data only.

    torch.load with weights_only=True builds tensors, numbers, strings, lists, tuples and dicts (and the numpy
    array of an older checkpoint's RNG state), never anything a pickle asks for beyond them: a file from
    someone else (an attached Kaggle input) cannot run code here. What is not a pocketGPT checkpoint is
    refused in one message."""
    path = StageDir(folder).ckpt
    if not path.is_file():
        raise PocketGPTError(f"resume_from={folder}: no {path.name} there. Point it at a pretrain/sft folder "
                             f"(or its .partial) written by an earlier run.")
    try:
        with torch.serialization.safe_globals(legacy_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise refused_checkpoint(path, why_unreadable(e)) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        held = (f"a dict of {len(ckpt)} entries ({', '.join(map(str, list(ckpt)[:4]))}{', ...' if len(ckpt) > 4 else ''})"
                if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        raise refused_checkpoint(path, f"it holds {held}, not a pocketGPT checkpoint (no {', '.join(missing)}): "
                                       f"perhaps another tool's file")
    return ckpt


def why_unreadable(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words: what a crafted pickle asks for (torch names
    it), a pickle the data-only reader cannot follow, or a file that is not whole."""
    if isinstance(e, pickle.UnpicklingError):
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if asked:
            return (f"it asks for {asked.group(1)} when read, and a checkpoint holds only data (tensors, numbers, "
                    f"text, lists, dicts)")
        said = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        return f"it is not a PyTorch file that holds only data (torch: {' '.join(said)[-160:]})"
    if isinstance(e, (PermissionError, IsADirectoryError)):
        return f"it cannot be read ({e.strerror or e})"
    return f"it is not a whole PyTorch file ({type(e).__name__}{': ' if str(e) else ''}{str(e)[:160]}); it may be truncated"


def refused_checkpoint(path: Path, why: str) -> PocketGPTError:
    """The one message of a ckpt.pt that is not ours: which file, that nothing of it was loaded or run, why,
    and what to do."""
    why = " ".join(why.split())  # one line, whatever the library's message held
    return PocketGPTError(f"{path} was not loaded (nothing in it was run): {why}. Resume only from a pretrain or sft "
                          f"folder a pocketGPT run wrote: point resume_from at one; to start afresh instead, move "
                          f"this file's folder away (on Kaggle: detach the input holding it).")


# -----------------------------------------------------------------------------
# The random streams (dropout, sampling) of each process

def rng_state(device) -> dict:
    """This process's random streams (dropout, sampling): each process has its own. Kept in plain types and
    tensors (numpy's key as a list of ints), so the checkpoint loads as data (load_checkpoint)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_numpy_state(state) -> None:
    """numpy's stream from a checkpoint: the dict rng_state keeps, or the tuple (with an array) of a checkpoint
    written before it did."""
    if isinstance(state, dict):
        state = {**state, "state": {**state["state"], "key": np.asarray(state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(state)


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
        set_numpy_state(s["numpy"])
        torch.set_rng_state(s["torch"])
        cuda = s.get("cuda")
        cuda = cuda[0] if isinstance(cuda, list) and cuda else cuda  # checkpoints before per-process states
        if cuda is not None and acc.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, acc.device)
        elif (cuda is None) != (acc.device.type != "cuda"):
            note = note or "the checkpoint and this run differ in CPU/GPU: the GPU random stream starts from the seed"
    return note
