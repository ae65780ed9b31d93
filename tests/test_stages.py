"""A stage folder knows itself (pocketgpt/stages.py): the names of its files, its phases and their checkpoints,
which phase a run stopped in, and what a finished phase carries into the folder of a run that resumes it."""
import errno
import json
import os

import pytest

from pocketgpt.files import DiskFullError
from pocketgpt.stages import Phase, StageDir, carry_over, resolve_resume, stage_output, stage_status


def finished(folder, stage: str, params: dict | None = None, metrics: dict | None = None):
    """A finished stage folder as stage_output leaves one: its manifest, and its numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "params": params or {},
                                                      "finished_at": "2026-01-01T00:00:00+00:00"}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def numbers(steps: int, max_steps: int, **more) -> dict:
    return {"steps": steps, "max_steps": max_steps, "stop_reason": "time_budget" if steps < max_steps else "max_steps",
            "session_hours": 0.5, "finished": steps >= max_steps, **more}


def test_a_stage_folder_names_its_files_its_partial_and_its_phases(tmp_path):
    d = StageDir(tmp_path / "sft")
    assert d.ckpt == tmp_path / "sft" / "ckpt.pt" and d.metrics.name == "metrics.json" and d.log.name == "log.csv"
    assert d.partial.path == tmp_path / "sft.partial" and d.partial.ckpt == tmp_path / "sft.partial" / "ckpt.pt"
    assert d.preference.ckpt == tmp_path / "sft" / "preference" / "ckpt.pt"
    assert [p.path for p in d.phases()] == [d.path, d.preference.path]
    assert d / "x" == tmp_path / "sft" / "x" and os.fspath(d) == str(tmp_path / "sft")  # joins and opens as its path


def test_the_checkpoint_a_resume_starts_from_is_the_newest_of_the_stages_phases(tmp_path):
    out = finished(tmp_path / "sft", "sft")
    assert StageDir(out).newest_ckpt() is None and resolve_resume("auto", "sft", out) is None
    StageDir(out).ckpt.write_bytes(b"sft phase")
    os.utime(StageDir(out).ckpt, (1, 1))
    assert StageDir(out).newest_ckpt() == out / "ckpt.pt"
    StageDir(out).preference.path.mkdir()
    StageDir(out).preference.ckpt.write_bytes(b"preference phase")  # written later: the run is in that phase
    assert StageDir(out).newest_ckpt() == out / "preference" / "ckpt.pt"
    assert resolve_resume("auto", "sft", out) == out
    partial = StageDir(out).partial
    partial.path.mkdir()
    partial.ckpt.write_bytes(b"newer still")  # a run killed after it resumed
    assert resolve_resume("auto", "sft", out) == partial.path


def test_the_status_line_names_the_phase_a_run_stopped_in_only_when_the_stage_has_several(tmp_path):
    pretrain = finished(tmp_path / "pretrain", "pretrain", {"resume_from": None}, numbers(7, 16))
    assert stage_status(pretrain).startswith("stopped by its time budget at step 7 of 16 (this session: 30.0 min)")
    sft = finished(tmp_path / "sft", "sft", {"preference": "self"}, numbers(3, 10))  # stopped before DPO began
    assert stage_status(sft).startswith("stopped by its time budget at step 3 of 10 in the SFT phase (")
    assert "run 03_sft again with resume_from='auto' (pipeline: --stages sft export -p resume_from auto)" in \
        stage_status(sft)
    finished(sft, "sft", {"preference": "self"}, numbers(10, 10, preference=numbers(2, 4)))
    assert stage_status(sft).startswith("stopped by its time budget at step 2 of 4 in the preference phase (")
    finished(sft, "sft", {"preference": "self"}, numbers(10, 10, preference=numbers(4, 4)))
    assert stage_status(sft) == "finished: the SFT phase 10 steps, the preference phase 4 steps"
    finished(sft, "sft", {"preference": None}, numbers(10, 10))
    assert stage_status(sft) == "finished: 10 steps"
    assert stage_status(finished(tmp_path / "tokenizer", "tokenizer", {}, {"vocab_size": 300})) == "finished"
    assert stage_status(tmp_path / "nothing") == f"not finished: {tmp_path / 'nothing'} holds no metrics.json"


def test_a_finished_sft_phase_is_found_and_carried_into_the_folder_of_the_run_that_resumes_it(tmp_path):
    old = StageDir(finished(tmp_path / "old", "sft", {"preference": "self"}))
    assert not old.sft_finished()
    old.sft_model.mkdir()
    (old.sft_model / "config.json").write_text("{}")
    for path, text in [(old.log, "step\n1\n"), (old.sft_phase, "{}"), (old.ckpt, "ckpt")]:
        path.write_text(text)
    assert old.sft_finished()
    new = StageDir(tmp_path / "new.partial")
    new.path.mkdir()
    carry_over(old.sft_phase_files(), new)
    assert (new.sft_model / "config.json").read_text() == "{}" and new.log.read_text() == "step\n1\n"
    assert new.sft_finished() and new.ckpt.read_text() == "ckpt"
    carry_over(old.sft_phase_files(), old)  # resumed in place: nothing to copy, nothing lost
    assert old.log.read_text() == "step\n1\n" and (old.sft_model / "config.json").is_file()
    phase = Phase(new.preference, old.preference, budget=None)
    assert phase.resume_dir() is None  # the preference phase had not begun: it starts fresh
    old.preference.path.mkdir()
    old.preference.ckpt.write_text("dpo")
    assert phase.resume_dir().path == old.preference.path


@pytest.mark.parametrize("params, kept", [({"resume_from": None}, "No checkpoint had been written yet."),
                                          ({}, "Nothing finished was touched")])
def test_a_full_disk_says_what_survived_by_whether_the_stage_checkpoints_not_by_its_name(tmp_path, params, kept):
    """A stage writes checkpoints when it takes resume_from, whatever it is called."""
    with pytest.raises(DiskFullError) as e:
        with stage_output(tmp_path / "out", "export", params):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert kept in str(e.value)
    with pytest.raises(DiskFullError) as e:
        with stage_output(tmp_path / "out", "export", params) as work:
            work.ckpt.write_bytes(b"a step's checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (f"The last checkpoint, {work.ckpt}" in str(e.value)) == bool(params)
