"""A stage folder: the names of its files, finding it, resuming it, which phase a run in it reached, its status.

Owns: StageDir (every file name a stage writes, and what the files say: finished, the newest checkpoint, a phase
finished); stage_output (a stage's .partial folder, renamed into place with its manifest; a full disk said with
what survived it); find_stage (a finished stage by its manifest, here or among Kaggle's inputs); resolve_resume
(the folder a run resumes from); stage_status (how a run ended, in one line); carry_over (a finished phase's
files from the folder resumed from into the new one). Nobody else spells a stage's file names.
Imports: common, files, data.
"""
from __future__ import annotations

import functools
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .common import (
    STAGES,
    PocketGPTError,
    duration,
    is_main_process,
    kaggle_root,
    library_versions,
    now_iso,
    on_kaggle,
    read_json,
)
from .data import fingerprint
from .files import DiskFullError, check_writable, disk_full_error, is_disk_full, write_file, write_folder, write_json

PREFERENCE = "preference"  # 03's preference phase: its sub-folder, the parameter that asks for it, its metrics key
LATER_PHASES = (PREFERENCE,)  # phases after a stage's first, each in a sub-folder with its own checkpoint and log


def _file(name: str, doc: str) -> property:
    return property(lambda self: self.path / name, doc=doc)


class StageDir:
    """A stage's folder, its .partial, or a later phase's folder inside one: the names of the files in it, and
    what they say. A StageDir joins like its path (`work / "x"`) and opens like one (os.fspath)."""

    def __init__(self, path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"StageDir({str(self.path)!r})"

    # every stage
    manifest = _file("manifest.json", "what made the folder; a folder without one never counts as finished")
    metrics = _file("metrics.json", "the stage's key numbers, read by the notebooks, the tests and the report card")
    # the training stages (02, 03) and their phases
    ckpt = _file("ckpt.pt", "the checkpoint a resume starts from")
    log = _file("log.csv", "a row per logged step")
    loss_plot = _file("loss.png", "the loss curves")
    model = _file("model", "the Hugging Face folder of the trained model (03's: the one 04 exports)")
    # 01
    train_bin = _file("train.bin", "the training split's ids (uint16)")
    val_bin = _file("val.bin", "the val split's ids (uint16)")
    meta = _file("meta.json", "the vocabulary, the ids' dtype and the corpus's counts")
    doc_stats = _file("doc_stats.npz", "a row per piece of a document: its split, place, bytes and tokens")
    # 03
    data_report = _file("data_report.json", "what reading and cleaning the dialogs did")
    heldout = _file("heldout.json", "the held-out rows SFT's val loss and 04's response loss are measured on")
    sft_model = _file("model_sft", "the SFT model when a preference phase follows: its reference, 04's SFT row")
    sft_phase = _file("sft_phase.json", "the SFT phase's numbers: the mark of a finished SFT phase")
    pairs = _file("pairs.json", "the preference phase's pairs, so a resumed phase trains on the same ones")
    # 04
    export = _file("pocketGPT", "the exported model folder")
    export_zip = _file("pocketGPT.zip", "the export folder zipped")
    losses_plot = _file("losses.png", "pretraining's and SFT's loss curves side by side")
    quality_plot = _file("quality.png", "the answer quality of each model")
    answers = _file("answers.json", "the exported model's answers to the prompts")
    quality_answers = _file("quality_answers.json", "each model's answers on the quality sample")
    report = _file("report.md", "the report card")

    @property
    def partial(self) -> StageDir:
        """Where the stage works until it is done: `<folder>.partial`."""
        return StageDir(self.path.with_name(self.path.name + ".partial"))

    @property
    def preference(self) -> StageDir:
        return StageDir(self.path / PREFERENCE)

    def phases(self) -> list[StageDir]:
        """The folder of each phase: the stage's own (its first phase), then each later phase's sub-folder."""
        return [self] + [StageDir(self.path / name) for name in LATER_PHASES]

    def newest_ckpt(self) -> Path | None:
        """The checkpoint a resume starts from: the newest of its phases' (03's preference phase keeps its own)."""
        found = [p.ckpt for p in self.phases() if p.ckpt.is_file()]
        return max(found, key=lambda c: c.stat().st_mtime) if found else None

    def finished(self, stage: str) -> dict | None:
        """The manifest when it says a finished `stage` wrote this folder, else None."""
        try:
            manifest = read_json(self.manifest)
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("stage") == stage and \
            manifest.get("finished_at") else None

    def sft_finished(self) -> bool:
        """Whether the SFT phase ended here before a preference phase (the later phase resumes from here)."""
        return self.sft_phase.is_file()

    def sft_phase_files(self) -> list[Path]:
        """What a finished SFT phase left beside its preference phase: its model, log, numbers and checkpoint."""
        return [self.sft_model, self.log, self.sft_phase, self.ckpt]


def stage_manifest(folder, stage: str) -> dict | None:
    """The manifest of `folder` when it says a finished `stage` wrote the folder, else None."""
    return StageDir(folder).finished(stage)


def partial_dir(out_dir) -> Path:
    """Where a stage works until it is done: `<out_dir>.partial`."""
    return StageDir(out_dir).partial.path


def input_fingerprint(path) -> str:
    """sha256 of a stage's input: a stage folder's manifest (which lists and dates its files), else
    data.fingerprint's (a file, or a save_to_disk folder)."""
    manifest = StageDir(path).manifest
    return fingerprint(manifest if Path(path).is_dir() and manifest.is_file() else path)


# -----------------------------------------------------------------------------
# Finding a finished stage

def find_stage(stage: str, path=None, run_dir=None) -> Path:
    """Find the folder a finished `stage` wrote, by its manifest.json.

    `path` (a notebook parameter) wins: the folder itself, or any folder above it. On Kaggle the
    inputs are searched under /kaggle/input (mount paths have changed before, so none is
    hard-coded); locally the stage's folder in the run folder. The newest finished one wins.
    """
    manifest_name = StageDir(".").manifest.name
    if path is not None:
        roots, where = [Path(path)], f"{path}"
        if not Path(path).exists():
            raise PocketGPTError(f"{stage}: the path {path} does not exist. Pass the folder the "
                                 f"{STAGES[stage]} notebook wrote (it holds a {manifest_name}).")
    elif on_kaggle():
        roots, where = [kaggle_root() / "input"], f"{kaggle_root() / 'input'} (attached inputs)"
    else:
        roots, where = [Path(run_dir) / stage], f"{Path(run_dir) / stage}"
    found = []
    for root in roots:
        candidates = [StageDir(root).manifest] + sorted(root.glob(f"**/{manifest_name}")) if root.is_dir() else []
        for m in candidates:
            manifest = stage_manifest(m.parent, stage)
            if manifest:
                found.append((manifest["finished_at"], m.parent))
    if not found:
        hint = (f"attach the output of the {STAGES[stage]} notebook to this one" if on_kaggle()
                else f"run notebooks/{STAGES[stage]}.ipynb first")
        raise PocketGPTError(f"No finished '{stage}' stage found in {where}: {hint}, "
                             f"or pass its folder (the one holding {manifest_name}) as a parameter.")
    return max(found)[1]


# -----------------------------------------------------------------------------
# Writing a stage: a .partial renamed into place with its manifest

@contextmanager
def stage_output(out_dir, stage: str, params: dict, inputs: dict | None = None, resuming: Path | None = None):
    """Write a stage into `<out_dir>.partial` (yielded as a StageDir), then rename it into place with its manifest.

    A folder without manifest.json never counts as finished, so a crash (or Kaggle's 12-hour
    kill) can leave a .partial behind, holding the last checkpoint, but never a folder that
    looks done. A run that resumes from that .partial keeps it: its ckpt.pt is replaced only by
    a newer one. A fresh run clears it first. The manifest says what made the folder.
    """
    out_dir = Path(out_dir)
    work = StageDir(out_dir).partial
    if not is_main_process():  # in a multi-GPU run only rank 0 writes files
        yield work
        return
    check_writable(out_dir)
    if work.manifest.is_file() and not out_dir.exists():  # killed between the renames below: finish them
        os.replace(work.path, out_dir)
    for stale in out_dir.parent.glob(f"{out_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if work.path.exists() and (resuming is None or Path(resuming).resolve() != work.path.resolve()):
        if work.ckpt.exists():
            print(f"removing {work}, an unfinished earlier run (resume_from='auto' would have continued it)")
        shutil.rmtree(work.path)
    work.path.mkdir(parents=True, exist_ok=True)
    started = now_iso()
    # the inputs as they are now: a checkpoint resumed from is replaced as the run goes on
    fingerprints = {k: {"path": str(v), "fingerprint": input_fingerprint(v)} for k, v in (inputs or {}).items()}
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
            "files": sorted(str(p.relative_to(work.path)) for p in work.path.rglob("*") if p.is_file()),
        }
        write_json(work.manifest, manifest)
    except Exception as e:
        if isinstance(e, DiskFullError) or is_disk_full(e):
            raise stage_disk_full(e, work, resuming, checkpoints="resume_from" in params) from None
        raise
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(work.path, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(work.path, out_dir)


def stage_disk_full(e: Exception, work: StageDir, resuming, checkpoints: bool) -> DiskFullError:
    """A full disk inside a stage, said with what survived it: the last checkpoint (written atomically,
    so whole) and how to continue from it, or that nothing finished was touched. `checkpoints`: the stage
    writes checkpoints (it takes resume_from)."""
    if isinstance(e, DiskFullError):
        what, where, needed = e.what, e.where, e.needed
    else:  # a write that did not go through the door
        what, where, needed = "the stage's files", work.path, None
    folder = newest_checkpoint([f for f in [work, resuming] if f])
    out_dir = work.path.with_name(work.path.name.removesuffix(".partial"))
    if checkpoints and folder:
        last = StageDir(folder).newest_ckpt()
        when = datetime.fromtimestamp(last.stat().st_mtime).strftime("%H:%M:%S")
        kept = f"The last checkpoint, {last} (written at {when}), is intact: writes replace a file only once it is whole."
        next_step = "run this stage again with resume_from='auto': it continues from that checkpoint"
    elif checkpoints:
        kept, next_step = "No checkpoint had been written yet.", "run this stage again"
    else:
        kept = f"Nothing finished was touched ({out_dir} is as it was)."
        next_step = "run this stage again"
    return disk_full_error(what, where, needed, kept, next_step)


@dataclass(frozen=True)
class Phase:
    """Where a training phase runs, and from what: the folder it writes, the same phase's folder in the run it
    resumes (None: it starts fresh), this session's budget (train.Budget) and the step tests stop it at."""
    folder: StageDir
    resumed: StageDir | None
    budget: object
    stop_at_step: int | None = None

    def resume_dir(self) -> StageDir | None:
        """The folder whose checkpoint the phase continues from, None when there is none."""
        return self.resumed if self.resumed and self.resumed.ckpt.is_file() else None


def carry_over(files, into: StageDir) -> None:
    """Copy these files and folders (of a folder resumed from) into `into` under the same names, through the
    write door (rank 0, atomically); one already there (the same folder resumed in place) is left as it is."""
    for src in files:
        dst = into.path / src.name
        if dst.resolve() == src.resolve():
            continue
        if src.is_dir():
            write_folder(dst, functools.partial(shutil.copytree, src, dirs_exist_ok=True))
        else:
            write_file(dst, functools.partial(shutil.copyfile, src))


# -----------------------------------------------------------------------------
# Resuming: the newest checkpoint of this stage's own folders

def newest_checkpoint(folders) -> Path | None:
    """Of these folders with a ckpt.pt, the one whose newest checkpoint (of any of its phases) was written last,
    or None."""
    found = [Path(f) for f in folders if StageDir(f).ckpt.is_file()]
    return max(found, key=lambda f: StageDir(f).newest_ckpt().stat().st_mtime) if found else None


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
            raise PocketGPTError(f"resume_from={resume_from}: no {StageDir(folder).ckpt.name} there (nor in "
                                 f"{partial_dir(folder).name}). Point it at a {stage} folder written by an earlier "
                                 f"run, or use 'auto'.")
        return found
    if on_kaggle():
        try:
            attached = [find_stage(stage)]
        except PocketGPTError:
            attached = []
        return newest_checkpoint(attached + own_checkpoints(stage, out_dir))
    return None


# -----------------------------------------------------------------------------
# How a run ended

def stage_status(folder) -> str:
    """How a stage's run ended, in one line for the pipeline, the notebook and the report card: finished, or
    stopped by its time budget at step N of M (in which phase, when it has several), and how to go on from there."""
    d = StageDir(folder)
    if not d.metrics.is_file():
        return f"not finished: {d.path} holds no {d.metrics.name}"
    m, manifest = read_json(d.metrics), read_json(d.manifest)
    if "steps" not in m:  # 01 and 04 have no steps: a manifest means done
        return "finished"
    stage = manifest["stage"]
    phases = phase_numbers(stage, m, manifest["params"])
    stopped = next(((name, p) for name, p in phases if p["max_steps"] is None or p["steps"] < p["max_steps"]), None)
    if stopped is None:
        return "finished: " + ", ".join(f"{name + ' ' if name else ''}{p['steps']:,} steps" for name, p in phases)
    name, p = stopped
    why = "by its time budget" if p["stop_reason"] == "time_budget" else f"({p['stop_reason']})"
    later = " ".join(list(STAGES)[list(STAGES).index(stage):])
    return (f"stopped {why} at step {p['steps']:,} of {p['max_steps']:,}{' in ' + name if name else ''} "
            f"(this session: {duration(p['session_hours'] * 3600)}); to continue, run {STAGES[stage]} again with "
            f"resume_from='auto' (pipeline: --stages {later} -p resume_from auto)")


def phase_numbers(stage: str, metrics: dict, params: dict) -> list[tuple[str, dict]]:
    """Each phase a run reached, named for the status line, with its numbers: the stage's first phase (its numbers
    are the metrics' own; named after the stage, "the SFT phase", only when the parameters ask for a later phase),
    then each later phase that has numbers (under its name in the metrics)."""
    later = [(f"the {name} phase", metrics[name]) for name in LATER_PHASES if metrics.get(name)]
    asked = any(params.get(name) for name in LATER_PHASES)
    return [(f"the {stage.upper()} phase" if asked else "", metrics)] + later
