"""The Kaggle metadata in kaggle/ is what `kaggle kernels push` / `kaggle datasets create` accept,
chains the notebooks the way they read each other, and kaggle/push.py --dry-run fills it in.

The rules below are the kaggle CLI's own checks (kaggle/api/kaggle_api_extended.py: kernels_push,
validate_kernel_string, validate_dataset_string, get_bool, dataset_create_new). No network, no kaggle package.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KAGGLE = REPO / "kaggle"
spec = importlib.util.spec_from_file_location("pocketgpt_kaggle_push", KAGGLE / "push.py")
push = importlib.util.module_from_spec(spec)
spec.loader.exec_module(push)

USER, DATA = "ada-lovelace", "my-corpus-data"
NOTEBOOKS = ["01_tokenizer", "02_pretrain", "03_sft", "04_eval_export"]
WRITES = {"01_tokenizer": "tokenizer", "02_pretrain": "pretrain", "03_sft": "sft", "04_eval_export": "export"}
READS = {"01_tokenizer": set(), "02_pretrain": {"tokenizer"}, "03_sft": {"pretrain"},
         "04_eval_export": {"tokenizer", "pretrain", "sft"}}
READS_DATA = {"01_tokenizer", "03_sft"}  # corpus.txt, dialogs.csv
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# -----------------------------------------------------------------------------
# the CLI's rules

def slugify(title):  # what python-slugify does to our titles
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")

def check_ref(ref, min_slug):
    owner, _, slug = ref.partition("/")
    assert ref.count("/") == 1 and owner and slug, f"{ref!r} is not 'user/slug'"
    assert SLUG.match(owner) or owner == USER, ref
    assert SLUG.match(slug) and len(slug) >= min_slug, f"bad slug in {ref!r}"

def check_kernel_metadata(meta):
    for key in ("id", "title", "code_file", "language", "kernel_type"):
        assert meta.get(key), f"missing {key}"
    check_ref(meta["id"], min_slug=5)  # "Kernel slug must be at least five characters"
    assert len(meta["title"]) >= 5 and slugify(meta["title"]) == meta["id"].split("/")[1]  # else the CLI warns
    assert meta["language"] in ("python", "r", "rmarkdown")
    assert meta["kernel_type"] in ("script", "notebook")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        assert isinstance(meta[key], bool), f"{key} must be a JSON boolean"
    assert meta["enable_internet"] is False  # the CLI's default is True; pip is not used on Kaggle
    assert meta["enable_tpu"] is False
    for key in ("dataset_sources", "kernel_sources", "competition_sources", "model_sources"):
        assert isinstance(meta[key], list) and all(isinstance(s, str) for s in meta[key]), key
    for ref in meta["dataset_sources"]:
        check_ref(ref, min_slug=6)  # dataset slugs are 6-50 characters
    for ref in meta["kernel_sources"]:
        check_ref(ref, min_slug=5)
    assert meta["competition_sources"] == [] and meta["model_sources"] == []

def check_dataset_metadata(meta):
    check_ref(meta["id"], min_slug=6)
    assert 6 <= len(meta["id"].split("/")[1]) <= 50, "dataset slug must be 6-50 characters"
    assert 6 <= len(meta["title"]) <= 50, "dataset title must be 6-50 characters"
    assert "INSERT" not in meta["id"] + meta["title"]
    assert len(meta["licenses"]) == 1 and meta["licenses"][0]["name"]
    if meta.get("subtitle"):
        assert 20 <= len(meta["subtitle"]) <= 80

def filled(name):
    return push.load_template(name, USER, DATA)

# -----------------------------------------------------------------------------
# the committed templates

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_kernel_metadata_follows_the_cli_rules(name):
    check_kernel_metadata(filled(name))

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_gpu_only_for_training(name):
    meta = filled(name)
    if name in ("02_pretrain", "03_sft"):
        assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4"  # T4 x2; P100 is retired
    else:
        assert meta["enable_gpu"] is False and not meta.get("machine_shape")

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_kernel_sources_are_the_stages_the_notebook_reads(name):
    stage_of = {filled(n)["id"]: WRITES[n] for n in NOTEBOOKS}
    sources = filled(name)["kernel_sources"]
    assert all(s in stage_of for s in sources), sources
    assert {stage_of[s] for s in sources} == READS[name]
    assert len(sources) == len(set(sources))

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_kernel_gets_the_module_and_the_data_where_read(name):
    code, data = filled("code")["id"], filled("data")["id"]
    sources = filled(name)["dataset_sources"]
    assert code in sources
    assert (data in sources) == (name in READS_DATA)

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_file_is_the_notebook(name):
    template = json.loads((KAGGLE / name / "kernel-metadata.json").read_text())
    code_file = (KAGGLE / name / template["code_file"]).resolve()  # the CLI joins it to the metadata's folder
    assert code_file == REPO / "notebooks" / f"{name}.ipynb"
    assert code_file.is_file(), f"{code_file} does not exist"

@pytest.mark.parametrize("name", ["code", "data"])
def test_dataset_metadata_follows_the_cli_rules(name):
    check_dataset_metadata(filled(name))

def test_templates_are_valid_json_with_placeholders_only_for_user_and_data():
    for path in KAGGLE.glob("*/*-metadata.json"):
        text = path.read_text()
        json.loads(text)
        assert set(re.findall(r"<[^>]*>", text)) <= {push.USERNAME, push.DATA_SLUG}, path

# -----------------------------------------------------------------------------
# the parameters cell

def notebook(params_source, tagged=True):
    cell = lambda src, tags: {"cell_type": "code", "metadata": {"tags": tags}, "source": src,
                              "outputs": [], "execution_count": None}
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "markdown", "metadata": {}, "source": "# Tiny"},
                      cell(params_source, ["parameters"] if tagged else []),
                      cell('print(profile)  # profile = "demo" here is not a parameter', [])]}

def params(nb):
    return "".join(nb["cells"][1]["source"])

def test_set_params_rewrites_the_parameters_lines_only():
    source = ['run_dir = None\n', 'profile = "demo"  # demo | t4\n', 'corpus_path = None      # a file\n', 'seed = 0\n']
    nb = push.set_params(notebook(source), {"profile": "t4", "corpus_path": "/kaggle/input/**/corpus.txt"})
    assert params(nb) == ('run_dir = None\nprofile = "t4"  # demo | t4\n'
                          'corpus_path = "/kaggle/input/**/corpus.txt"      # a file\nseed = 0\n')
    assert nb["cells"][2]["source"] == 'print(profile)  # profile = "demo" here is not a parameter'

def test_set_params_accepts_a_string_source_and_single_quotes():
    assert params(push.set_params(notebook("seed = 1\nprofile='demo'"), {"profile": "t4"})) == 'seed = 1\nprofile="t4"'

def test_set_params_writes_numbers_and_none_as_python():
    nb = push.set_params(notebook("max_hours = 11.0\nresume_from = 'x'"), {"max_hours": "5.5", "resume_from": "None"})
    assert params(nb) == "max_hours = 5.5\nresume_from = None"

def test_set_params_adds_profile_but_skips_parameters_the_notebook_lacks():
    nb = push.set_params(notebook("seed = 1"), {"profile": "t4", "dialogs_path": "/kaggle/input/**/dialogs.csv"})
    assert params(nb) == 'seed = 1\nprofile = "t4"\n'

def test_set_params_needs_a_parameters_cell():
    with pytest.raises(ValueError, match="parameters"):
        push.set_params(notebook('profile = "demo"', tagged=False), {"profile": "t4"})

# -----------------------------------------------------------------------------
# push.py --dry-run

@pytest.fixture
def dry_run(tmp_path):
    """Run push.py --dry-run on tiny notebooks; no kaggle CLI on PATH, so nothing can be pushed."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    data_param = {"01_tokenizer": "corpus_path = None\n", "03_sft": "dialogs_path = None\n"}
    for name in NOTEBOOKS:
        source = ['profile = "demo"\n', data_param.get(name, ""), 'seed = 0\n']
        (nb_dir / f"{name}.ipynb").write_text(json.dumps(notebook(source)))
    (tmp_path / "pocketgpt_utils.py").write_text("# the module\n")
    (tmp_path / "c.txt").write_text("some text\n")
    (tmp_path / "d.csv").write_text("prompt,response\nhi,hello\n")
    before = {p: p.read_bytes() for p in KAGGLE.rglob("*") if p.is_file()}

    def run(*extra):
        out = tmp_path / "out"
        cmd = [sys.executable, str(KAGGLE / "push.py"), "--username", USER, "--data-slug", DATA,
               "--notebooks", str(nb_dir), "--module", str(tmp_path / "pocketgpt_utils.py"),
               "--out", str(out), "--dry-run", *extra]
        env = dict(os.environ, PATH=str(tmp_path))  # no `kaggle` here
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert {p: p.read_bytes() for p in KAGGLE.rglob("*") if p.is_file()} == before, "templates edited"
        return out, result.stdout

    run.tmp = tmp_path
    return run

def test_dry_run_writes_filled_folders_with_no_placeholder_left(dry_run):
    out, stdout = dry_run("--corpus", str(dry_run.tmp / "c.txt"), "--dialogs", str(dry_run.tmp / "d.csv"))
    assert sorted(p.name for p in out.iterdir()) == sorted(["code", "data", *NOTEBOOKS])
    for path in (p for p in out.rglob("*") if p.is_file()):
        text = path.read_text()
        assert push.USERNAME not in text and push.DATA_SLUG not in text, path
    assert (out / "code" / "pocketgpt_utils.py").is_file()
    assert sorted(p.name for p in (out / "data").iterdir()) == ["corpus.txt", "dataset-metadata.json", "dialogs.csv"]
    check_dataset_metadata(json.loads((out / "data" / "dataset-metadata.json").read_text()))
    assert json.loads((out / "data" / "dataset-metadata.json").read_text())["id"] == f"{USER}/{DATA}"
    for name in NOTEBOOKS:
        meta = json.loads((out / name / "kernel-metadata.json").read_text())
        check_kernel_metadata(meta)
        assert meta["id"].startswith(f"{USER}/") and all(s.startswith(f"{USER}/") for s in
                                                         meta["dataset_sources"] + meta["kernel_sources"])
        assert meta["code_file"] == f"{name}.ipynb"
        nb = json.loads((out / name / meta["code_file"]).read_text())
        data_param = {"01_tokenizer": 'corpus_path = "/kaggle/input/**/corpus.txt"\n',  # found wherever Kaggle
                      "03_sft": 'dialogs_path = "/kaggle/input/**/dialogs.csv"\n'}   # mounts the data
        assert params(nb) == 'profile = "t4"\n' + data_param.get(name, "") + 'seed = 0\n'
    pushes = re.findall(r"kaggle kernels push -p \S+/(\w+)", stdout)
    assert pushes == NOTEBOOKS  # in order
    assert stdout.index("datasets create") < stdout.index("kernels push")
    assert re.search(r"datasets create -p \S+/data -r zip", stdout)

def test_a_corpus_in_another_format_keeps_its_extension_on_kaggle(dry_run):
    """The notebooks read a file by its extension: a .jsonl.gz pushed as corpus.txt would be read as text."""
    (dry_run.tmp / "c.jsonl.gz").write_bytes(b"")
    shards = dry_run.tmp / "shards"
    shards.mkdir()
    for name in ["a.parquet", "b.parquet", "README.md"]:
        (shards / name).write_bytes(b"")
    out, _ = dry_run("--corpus", str(dry_run.tmp / "c.jsonl.gz"), "--dialogs", str(dry_run.tmp / "d.csv"))
    assert "corpus.jsonl.gz" in [p.name for p in (out / "data").iterdir()]
    assert 'corpus_path = "/kaggle/input/**/corpus.jsonl.gz"' in params(json.loads((out / "01_tokenizer" / "01_tokenizer.ipynb").read_text()))
    out, _ = dry_run("--corpus", str(shards), "--dialogs", str(dry_run.tmp / "d.csv"))
    assert 'corpus_path = "/kaggle/input/**/corpus/**/*.parquet"' in params(json.loads((out / "01_tokenizer" / "01_tokenizer.ipynb").read_text()))


def test_dry_run_resume_attaches_02s_own_output(dry_run):
    out, stdout = dry_run("--only", "02", "--resume")
    meta = json.loads((out / "02_pretrain" / "kernel-metadata.json").read_text())
    assert meta["kernel_sources"] == [f"{USER}/pocketgpt-01-tokenizer", f"{USER}/pocketgpt-02-pretrain"]
    assert sorted(p.name for p in out.iterdir()) == ["02_pretrain"]
    assert stdout.count("kernels push") == 1

def test_dry_run_passes_parameters_through(dry_run):
    out, _ = dry_run("--only", "01", "03", "-p", "seed", "7", "-p", "dialogs_path", "/kaggle/input/x/d.csv")
    assert params(json.loads((out / "01_tokenizer" / "01_tokenizer.ipynb").read_text())).endswith("seed = 7\n")
    assert 'dialogs_path = "/kaggle/input/x/d.csv"' in params(json.loads((out / "03_sft" / "03_sft.ipynb").read_text()))

def test_dry_run_without_resume_leaves_02_unattached_to_itself(dry_run):
    out, _ = dry_run("--only", "02", "03")
    assert filled("02_pretrain")["id"] not in json.loads((out / "02_pretrain" / "kernel-metadata.json").read_text())["kernel_sources"]

FAKE_KAGGLE = """#!{python}
import json, pathlib, sys
print(' '.join(sys.argv[1:]), file=open(sys.argv[0] + '.log', 'a'))
if sys.argv[1:3] == ['kernels', 'status']:
    print('KernelWorkerStatus.COMPLETE')
if sys.argv[1:3] == ['kernels', 'output']:  # 02's output: a complete pretrain folder, finished or not
    dest = pathlib.Path(sys.argv[sys.argv.index('-p') + 1]) / 'pretrain'
    dest.mkdir(parents=True, exist_ok=True)
    (dest / 'manifest.json').write_text(json.dumps({{'stage': 'pretrain', 'finished_at': '2026-01-01'}}))
    (dest / 'metrics.json').write_text(json.dumps({{'finished': {finished}}}))
"""


@pytest.mark.parametrize("finished", [False, True])
def test_push_continues_after_02_only_when_pretraining_finished(dry_run, tmp_path, finished):
    """A stand-in `kaggle` reports every run complete; 02's output is a complete pretrain folder whose
    metrics say whether max_steps was reached (a run stopped by its time budget is complete but not
    finished). Unfinished: the push stops with the resume command. Finished: it goes on to 03."""
    fake = tmp_path / "kaggle"
    fake.write_text(FAKE_KAGGLE.format(python=sys.executable, finished=finished))
    fake.chmod(0o755)
    cmd = [sys.executable, str(KAGGLE / "push.py"), "--username", USER, "--only", "02", "03", "--poll", "0",
           "--notebooks", str(tmp_path / "notebooks"), "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PATH=str(tmp_path)))
    calls = [c.split()[:2] for c in (tmp_path / "kaggle.log").read_text().splitlines()]
    if finished:
        assert result.returncode == 0, result.stderr
        assert calls[:4] == [["kernels", "push"], ["kernels", "status"], ["kernels", "output"], ["kernels", "push"]]
    else:
        assert result.returncode != 0 and "--only 02 --resume" in result.stderr
        assert calls == [["kernels", "push"], ["kernels", "status"], ["kernels", "output"]]
