"""On Kaggle, stages find their inputs by manifest under /kaggle/input and write to /kaggle/working.
Simulated in a temp folder laid out as Kaggle mounts things since 2026."""
import shutil

import pytest
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.train import read_log


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("POCKETGPT_KAGGLE_ROOT", str(tmp_path))
    (tmp_path / "working").mkdir()
    return tmp_path


def pretrain_cfg(**kw):
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    return pg.make_config(pg.PretrainConfig, "demo", precision="fp32", **{**params, **kw})


def test_tokenizer_stage_finds_the_attached_corpus(kaggle, demo_data):
    data = kaggle / "input" / "datasets" / "someone" / "my-data"
    data.mkdir(parents=True)
    shutil.copy(demo_data / "corpus.txt", data / "corpus.txt")
    out = pg.build_tokenizer_stage(pg.make_config(pg.TokenizerConfig, "t4", vocab_size=400))
    assert out == kaggle / "working" / "tokenizer"
    assert pg.read_json(out / "manifest.json")["inputs"]["corpus"]["path"] == str(data / "corpus.txt")


def test_pretrain_finds_its_input_and_resumes_in_a_second_session(kaggle, tokenizer_stage):
    shutil.copytree(tokenizer_stage, kaggle / "input" / "notebooks" / "someone" / "pocketgpt-01-tokenizer" / "tokenizer")
    first = pg.run_pretrain_stage(pretrain_cfg(max_steps=12), stop_at_step=6)  # the session's budget ran out
    assert first == kaggle / "working" / "pretrain"
    assert not pg.read_json(first / "metrics.json")["finished"]
    # session 2: the previous version's output is attached as an input; /kaggle/working starts empty
    previous = kaggle / "input" / "notebooks" / "someone" / "pocketgpt-02-pretrain" / "pretrain"
    shutil.move(first, previous)
    second = pg.run_pretrain_stage(pretrain_cfg(max_steps=12))
    metrics = pg.read_json(second / "metrics.json")
    assert metrics["finished"] and metrics["steps"] == 12
    assert [r["step"] for r in read_log(second / "log.csv")][:3] == [5, 6, 10]  # the first session's rows kept
    assert "resumed_from" in pg.read_json(second / "manifest.json")["inputs"]


def test_init_from_the_attached_run_starts_from_it_rather_than_resuming_it(kaggle, tokenizer_stage):
    """On Kaggle resume_from=None continues an attached pretrain run; with init_from naming that run it is the
    model to start from (here: to grow), not a run to continue (whose shorter context would be refused)."""
    shutil.copytree(tokenizer_stage, kaggle / "input" / "notebooks" / "someone" / "pocketgpt-01-tokenizer" / "tokenizer")
    short = pg.run_pretrain_stage(pretrain_cfg(max_steps=6))
    attached = kaggle / "input" / "notebooks" / "someone" / "pocketgpt-02-pretrain" / "pretrain"
    shutil.move(short, attached)
    grown = pg.run_pretrain_stage(pretrain_cfg(max_steps=6, n_positions=2 * TINY["n_positions"],
                                               init_from=str(kaggle / "input")))
    m = pg.read_json(grown / "metrics.json")
    assert m["steps"] == 6 and m["context"]["grown_from"] == TINY["n_positions"]
    assert m["context"]["init_from"] == str(attached) and "resumed_from" not in pg.read_json(grown / "manifest.json")["inputs"]


def test_missing_input_on_kaggle_says_to_attach_it(kaggle):
    with pytest.raises(pg.PocketGPTError, match="attach the output of the 01_tokenizer notebook"):
        pg.run_pretrain_stage(pretrain_cfg())


def test_two_attached_corpora_are_not_concatenated_in_silence(kaggle, demo_data, capsys):
    for owner in ["someone", "someone-else"]:
        data = kaggle / "input" / "datasets" / owner / "my-data"
        data.mkdir(parents=True)
        shutil.copy(demo_data / "corpus.txt", data / "corpus.txt")
    with pytest.raises(pg.PocketGPTError, match=r"corpus_path=None and 2 files named corpus.txt are attached: "
                                                r".*someone/my-data/corpus.txt \(0.2 MB\).*Set corpus_path"):
        pg.build_tokenizer_stage(pg.make_config(pg.TokenizerConfig, "t4", vocab_size=400))
    assert not (kaggle / "working" / "tokenizer").exists()
    chosen = kaggle / "input" / "datasets" / "someone" / "my-data" / "corpus.txt"
    pg.build_tokenizer_stage(pg.make_config(pg.TokenizerConfig, "t4", vocab_size=400, corpus_path=str(chosen)))
    assert f"corpus_path={chosen}: {chosen} (0.2 MB)" in capsys.readouterr().out  # what was used, said before the work


def test_a_notebook_on_kaggle_imports_the_package_from_the_code_dataset(tmp_path):
    """On Kaggle the code dataset holds pocketgpt_utils.py and the package as a wheel (a dataset keeps no
    folders): the notebooks' own first cell, run where Kaggle runs it (/kaggle/working, the repository
    nowhere on the path), imports both from there."""
    import json
    import os
    import subprocess
    import sys

    from pocketgpt.common import HERE

    code = tmp_path / "input" / "datasets" / "someone" / "pocketgpt-code"
    code.mkdir(parents=True)
    shutil.copy(HERE / "pocketgpt_utils.py", code)
    src = tmp_path / "src"  # the sources the wheel is built from (setuptools writes build/ beside them)
    shutil.copytree(HERE / "pocketgpt", src / "pocketgpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["pocketgpt_utils.py", "pyproject.toml", "README.md", "requirements.txt"]:
        shutil.copy(HERE / name, src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(code),
                    str(src)], check=True, capture_output=True)
    first = json.loads((HERE / "notebooks" / "02_pretrain.ipynb").read_text())["cells"][1]["source"]
    first = "".join(first).replace("/kaggle/input", str(tmp_path / "input"))
    (tmp_path / "working").mkdir()
    check = first + ("\nimport pocketgpt\nprint(pocketgpt.__file__)\nprint(pg.__file__)\n"
                     "print(pg.make_config(pg.PretrainConfig, 't4', run_dir='.').n_embd)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path / "working", capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    wheel = next(code.glob("pocketgpt-*.whl"))
    assert out[0].startswith(str(wheel)) and out[1] == str(code / "pocketgpt_utils.py") and out[2] == "384"
