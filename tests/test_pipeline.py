"""The suite end to end: every notebook under papermill, chained by the pipeline command."""
import ast
import json
import re

import nbformat
import papermill as pm
import pytest
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.common import HERE, STAGES
from pocketgpt.pipeline import pipeline_inputs

NOTEBOOKS = sorted((HERE / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_clean_and_every_parameter_parses(path):
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assigned = {t.id for node in ast.parse(cells[0].source).body for t in node.targets}
    assert set(pm.inspect_notebook(str(path))) == assigned  # papermill can set every one of them
    assert {"profile", "run_dir", "seed"} <= assigned
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def rendered_text_lines(html: str) -> list[str]:
    """The text a browser shows for an HTML page (scripts and styles left out), line by line."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("script", "style")

        def handle_endtag(self, tag):
            self.skip -= tag in ("script", "style")

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    parser = Text()
    parser.feed(html)
    return "".join(parser.parts).splitlines()


def check_readable(nb_path):
    """What a reader of the saved notebook and its HTML sees: a few lines of progress, nothing on
    stderr, markdown rendered (no raw table pipes), and every image carrying its data."""
    executed = nbformat.read(str(nb_path), as_version=4)
    streams = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "stream"]
    lines = sum(o.text.count("\n") + o.text.count("\r") for o in streams)
    assert lines <= 100, f"{nb_path.name}: {lines} lines of stream output"
    stderr = [o.text for o in streams if o.name == "stderr"]
    assert not stderr, f"{nb_path.name} wrote to stderr: {stderr[:3]}"
    html = nb_path.with_suffix(".html").read_text()
    raw = [line for line in rendered_text_lines(html)
           if re.match(r"\s*\|.*\|\s*$", line) or "|---" in line or "\\|" in line]  # \| : an escape shown as is
    assert not raw, f"{nb_path.name}: raw markdown table in the rendered page: {raw[:3]}"
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", html)
    assert all(src.startswith("data:image/") for src in sources), [s[:60] for s in sources if not s.startswith("data:")]


def test_pipeline_runs_all_four_notebooks(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the notebooks show their progress, as for a user
    params = {**TINY, "max_steps": 40, "epochs": 1, "prompts": ["What is a tensor?"], "preference": "self"}
    run = pg.run_pipeline("demo", tmp_path / "run", demo_data / "corpus.txt", demo_data / "dialogs.csv", params,
                          log_output=False)
    for stage in ["tokenizer", "pretrain", "sft", "export"]:
        manifest = pg.read_json(run / stage / "manifest.json")
        assert manifest["stage"] == stage and manifest["finished_at"]
        assert (run / stage / "metrics.json").exists()
        nb = run / "notebooks" / f"{STAGES[stage]}.ipynb"
        executed = nbformat.read(str(nb), as_version=4)
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors
        html = nb.with_suffix(".html").read_text()
        assert "data:image/png;base64" in html  # plots are embedded: the run reads in a browser
        check_readable(nb)
    assert pg.read_json(run / "pretrain" / "metrics.json")["steps"] == 40
    assert pg.read_json(run / "pretrain" / "manifest.json")["params"]["n_embd"] == TINY["n_embd"]
    assert (run / "export" / "pocketGPT.zip").stat().st_size > 0
    assert "What is a tensor?" in json.dumps(pg.read_json(run / "export" / "answers.json"))
    # 03 ran its preference phase (DPO on self pairs), and 04 compared and exported the tuned model
    assert pg.read_json(run / "sft" / "metrics.json")["preference"]["finished"]
    # the report card in 04 renders: its tables and both figures (not links relative to the export folder)
    html = (run / "notebooks" / "04_eval_export.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "answers that end with" in html
    export = pg.read_json(run / "export" / "metrics.json")
    assert export["exported_model"] == "SFT + DPO" and set(export["quality"]) == {"pretrained", "SFT", "SFT + DPO"}
    # how each stage ended, where the user looks: the pipeline's line per stage, the notebook, the report card
    out = capsys.readouterr().out
    assert "== 02_pretrain done in " in out and ": finished: 40 steps ==" in out
    assert "finished: the SFT phase " in out and ", the preference phase " in out
    assert ("02_pretrain", "finished: 40 steps") in pg.report_rows(export)
    nb02 = nbformat.read(str(run / "notebooks" / "02_pretrain.ipynb"), as_version=4)
    assert "finished: 40 steps" in "".join(o.get("text", "") for c in nb02.cells for o in c.get("outputs", []))
    assert 'class="pocketgpt"' in (run / "notebooks" / "03_sft.html").read_text()  # tables that wrap
    # 04 is not silent while it answers hundreds of held-out instructions: a few progress lines, with time left
    nb04 = "".join(o.get("text", "") for c in nbformat.read(str(run / "notebooks" / "04_eval_export.ipynb"),
                                                             as_version=4).cells for o in c.get("outputs", []))
    assert "SFT: greedy answers: 100%" in nb04 and " left" in nb04


def test_a_failing_stage_stops_the_pipeline_with_stage_cell_and_error(demo_data, tmp_path):
    with pytest.raises(pg.PocketGPTError, match=r"01_tokenizer failed in cell \d+ \(PocketGPTError: vocab_size=100.*saved at"):
        pg.run_pipeline("demo", tmp_path, demo_data / "corpus.txt", demo_data / "dialogs.csv", params={"vocab_size": 100},
                        log_output=False)
    assert (tmp_path / "notebooks" / "01_tokenizer.ipynb").exists()
    assert not (tmp_path / "pretrain").exists()


def test_your_corpus_without_your_dialogs_is_refused(demo_data, tmp_path):
    with pytest.raises(pg.PocketGPTError, match="--corpus was given without --dialogs: pass --dialogs PATH .*--dialogs demo"):
        pg.run_pipeline("demo", tmp_path, demo_data / "corpus.txt", params=TINY, log_output=False)
    assert not (tmp_path / "tokenizer").exists()
    inputs = pipeline_inputs(tmp_path, demo_data / "corpus.txt", "demo")  # the demo dialogs, asked for by name
    assert inputs == {"corpus_path": str(demo_data / "corpus.txt"), "dialogs_path": str(tmp_path / "data" / "dialogs.csv")}
    assert pipeline_inputs(tmp_path, demo_data / "corpus.txt", stages=["tokenizer"]) == {
        "corpus_path": str(demo_data / "corpus.txt")}  # 03 is not run: no dialogs needed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_default_to_the_profile_of_the_hardware_and_say_which(path):
    nb = nbformat.read(str(path), as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert "profile = None" in nb.cells[i].source
    assert nb.cells[i + 1].source.startswith("profile, why = pg.resolve_profile(profile)\nprint(")


def test_each_default_is_written_once():
    """The dataclasses hold the t4 defaults; the demo profile changes real fields only; the README's
    table says what the dataclasses say; notebook comments quote no default value."""
    import dataclasses
    import re

    configs = {c.stage: c for c in [pg.TokenizerConfig, pg.PretrainConfig, pg.SFTConfig, pg.ExportConfig]}
    for stage, values in pg.PROFILES["demo"].items():
        assert set(values) <= {f.name for f in dataclasses.fields(configs[stage])}, stage
    readme = (HERE / "README.md").read_text()
    table = {row.split("|")[1].strip(): row for row in readme.splitlines() if row.startswith("| 0")}
    for notebook, stage in [("01_tokenizer", "tokenizer"), ("02_pretrain", "pretrain"), ("03_sft", "sft")]:
        fields = {f.name: f.default for f in dataclasses.fields(configs[stage])}
        quoted = re.findall(r"`(\w+)` \(([^)]*)\)", table[notebook])
        assert quoted, notebook
        for name, value in quoted:
            if not value.startswith("None"):
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass  # a word: auto, fail, truncate
                assert fields[name] == value, (notebook, name, value, fields[name])
    for path in NOTEBOOKS:
        cell = next(c for c in nbformat.read(str(path), as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        comments = " ".join(line.split("#", 1)[1] for line in cell.source.splitlines() if "#" in line)
        assert not re.search(r"\b(4096|24000|11\.25|0\.05|0\.01)\b", comments), path.stem


def test_ci_runs_exactly_the_readmes_set_up_and_test_commands():
    """A newcomer copies the README, CI runs .ci/run: the two once differed (CMAKE_ARGS only in CI), and the
    README's version died on a CPU with AVX-512/AMX while CI stayed green."""
    readme = (HERE / "README.md").read_text()
    block = re.search(r"^## Test it\n\n```bash\n(.*?)```", readme, re.S | re.M).group(1).strip().splitlines()
    ci = [line for line in (HERE / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set -", "cd "))]
    assert ci == block
    assert any("pip install -r requirements.txt -r requirements-dev.txt" in line for line in block)
    assert any(line.startswith("HF_HUB_OFFLINE=1") and "pytest" in line for line in block)


# --- a newcomer's first hour ------------------------------------------------------------------------

def test_relative_paths_mean_what_they_mean_where_they_were_typed(demo_data, tmp_path):
    """`pipeline --corpus mydata/corpus.txt` from the user's folder: the notebooks run in notebooks/, where
    that path means nothing; every path given is made absolute where it was typed."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "mydata").mkdir()
    for name in ["corpus.txt", "dialogs.csv"]:
        shutil.copy(demo_data / name, tmp_path / "mydata" / name)
    cmd = [sys.executable, str(HERE / "pocketgpt_utils.py"), "pipeline", "--profile", "demo", "--run-dir", "myrun",
           "--corpus", "mydata/corpus.txt", "--dialogs", "mydata/dialogs.csv", "--stages", "tokenizer",
           "-p", "vocab_size", "512", "-p", "out_dir", "myrun/tok"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pg.read_json(tmp_path / "myrun" / "tok" / "manifest.json")
    assert manifest["inputs"]["corpus"]["path"] == str(tmp_path / "mydata" / "corpus.txt")
    assert "== 01_tokenizer done in " in proc.stdout and ": finished ==" in proc.stdout


def test_a_misspelled_parameter_stops_before_any_kernel_with_the_closest_names(tmp_path, capsys):
    argv = ["pipeline", "--profile", "demo", "--run-dir", str(tmp_path / "run"), "-p", "max_step", "3000"]
    assert pg.main(argv) == 1
    err = capsys.readouterr().err
    assert "-p max_step: no notebook takes it; did you mean max_steps (02_pretrain)" in err and "Nothing was run" in err
    assert not (tmp_path / "run").exists()  # no run folder, no notebook, no kernel
    assert pg.main(["pipeline", "--profile", "demo", "--run-dir", str(tmp_path / "run"), "--stages", "sft",
                    "-p", "n_layer", "2"]) == 1
    assert "-p n_layer: only 02_pretrain takes it, and --stages sft does not run it" in capsys.readouterr().err
    assert pg.main(["stage", "pretrain", "--profile", "demo", "-p", "max_step", "3"]) == 1
    assert "PretrainConfig takes no parameter max_step (max_step: did you mean max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_parameter_reaches_its_stage(path):
    """A parameter a notebook declares but does not pass on would be dropped in silence: each one is a field of
    its stage's config and goes into make_config (profile, run_dir and seed included)."""
    import dataclasses

    nb = nbformat.read(str(path), as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    declared = {t.id for node in ast.parse(nb.cells[i].source).body for t in node.targets}
    call = next(n for n in ast.walk(ast.parse(nb.cells[i + 1].source))
                if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "make_config")
    passed = {k.arg for k in call.keywords} | {"profile"}
    config = getattr(pg, call.args[0].attr)
    assert declared == passed, (declared ^ passed)
    assert declared <= {f.name for f in dataclasses.fields(config)}


def test_help_and_a_misspelled_parameter_answer_without_importing_torch(tmp_path):
    """The command line's help and its checks come before the heavy imports: a fresh process answers them
    with neither torch nor papermill loaded."""
    import subprocess
    import sys

    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nfrom pocketgpt.cli import main\n"
            "try:\n    main(['pipeline', '--help'])\nexcept SystemExit:\n    pass\n"
            "rc = main(['pipeline', '--profile', 'demo', '--run-dir', sys.argv[2], '-p', 'max_step', '3000'])\n"
            "print(rc, 'torch' in sys.modules, 'papermill' in sys.modules, 'transformers' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(HERE), str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "1 False False False", proc.stdout + proc.stderr
    assert "every format" in proc.stdout or ".jsonl/.json, .parquet" in proc.stdout  # --corpus: what the README says
    assert "did you mean max_steps" in proc.stderr


def test_a_table_fits_the_page_long_cells_wrap_and_newlines_break_lines():
    t = pg.table([{"instruction": "Explain dropout.", "after": "line one\nline two " + "x" * 300}])
    html = t._repr_html_()
    assert "white-space:pre-wrap" in html and "overflow-wrap:anywhere" in html
    assert "line one\nline two" in html and "\\n" not in html  # a newline shown as a line break, not as \n
    assert "line one / line two" in repr(t) and len(repr(t).splitlines()[1]) < 100  # the terminal's: cut short
