"""The pipeline: notebooks 01 -> 04 under papermill, each stage's folder feeding the next.

Imports: common, files, data, config, demo, stages (papermill and nbconvert where a function needs them).
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import time
from pathlib import Path

from .common import HERE, STAGES, PocketGPTError, default_run_dir, duration
from .config import resolve_profile
from .data import CORPUS_FORMATS, DIALOG_FORMATS, data_files
from .demo import DEMO_FILES, demo_data
from .files import write_file
from .stages import stage_status


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


DATA_STAGES = {"corpus": "tokenizer", "dialogs": "sft"}  # the stage that reads each


def notebook_parameters(notebook: Path) -> list[str]:
    """The names a notebook's cell tagged `parameters` assigns (what papermill can set), read without a kernel."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return [t.id for node in ast.parse("".join(cell["source"])).body for t in node.targets]


PATH_KEYWORDS = ("auto", "self", "demo")  # values of path parameters that are not paths


def is_path_parameter(name: str) -> bool:
    return name.endswith(("_dir", "_path")) or name in ("resume_from", "init_from", "preference")


def where_typed(value):
    """A path as the user meant it where they typed it (the notebooks run in notebooks/): absolute."""
    if not isinstance(value, (str, Path)) or str(value) in PATH_KEYWORDS or Path(value).is_absolute():
        return value
    return str(Path(value).absolute())


def check_parameters(params: dict, stages=None) -> dict:
    """`-p NAME VALUE` checked before any kernel starts: a name that no notebook of this run takes stops with
    the closest names and the notebooks that take them (papermill would drop it in silence); a path is made
    absolute (where_typed)."""
    takes = {}  # name -> the notebooks that take it
    for stage, name in STAGES.items():
        for param in notebook_parameters(HERE / "notebooks" / f"{name}.ipynb"):
            takes.setdefault(param, []).append((stage, name))
    problems = []
    for name in params:
        if name not in takes:
            close = [f"{c} ({', '.join(n for _, n in takes[c])})" for c in difflib.get_close_matches(name, takes, n=3)]
            problems.append(f"-p {name}: no notebook takes it" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        elif stages and not any(stage in stages for stage, _ in takes[name]):
            problems.append(f"-p {name}: only {', '.join(n for _, n in takes[name])} takes it, and --stages "
                            f"{' '.join(stages)} does not run it")
    if problems:
        raise PocketGPTError("; ".join(problems) + ". Nothing was run. Each notebook's parameters are in its cell tagged "
                           "`parameters` (README, Parameters).")
    return {k: where_typed(v) if is_path_parameter(k) else v for k, v in params.items()}


def check_data(corpus=None, dialogs=None, stages=None) -> None:
    """Your own corpus with the demo dialogs (or the reverse) is never chosen in silence: give both, or
    neither (the demo data), or say `demo` for the one you want from the demo data; and a file given is
    there (checked before any kernel starts)."""
    given = {"corpus": corpus, "dialogs": dialogs}
    needed = {k for k, stage in DATA_STAGES.items() if not stages or stage in stages}
    if any(v not in (None, "demo") for v in given.values()):
        for key in needed:
            if given[key] is None:
                other = next(k for k in given if k != key)
                raise PocketGPTError(f"--{other} was given without --{key}: pass --{key} PATH (your "
                                     f"{DEMO_FILES[key]}), or --{key} demo to use the demo {DEMO_FILES[key]}.")
    for key, formats in [("corpus", CORPUS_FORMATS), ("dialogs", DIALOG_FORMATS)]:
        if key in needed and given[key] not in (None, "demo"):
            data_files(given[key], f"--{key}", formats, "Check the path (relative paths are from where you run this).")


def pipeline_inputs(run_dir, corpus=None, dialogs=None, stages=None) -> dict:
    """corpus_path and dialogs_path for the notebooks (check_data first): yours, or the demo data's."""
    check_data(corpus, dialogs, stages)
    needed = {k for k, stage in DATA_STAGES.items() if not stages or stage in stages}
    given = {"corpus": corpus, "dialogs": dialogs}
    return {f"{key}_path": str(where_typed(given[key]) if given[key] not in (None, "demo")
                               else demo_data(run_dir, key)) for key in sorted(needed)}


def run_pipeline(profile: str | None = None, run_dir=None, corpus=None, dialogs=None, params=None,
                 stages=None, log_output: bool = True) -> Path:
    """Run the notebooks that exist, 01 -> 04, each reading the folder the previous one wrote. The
    parameters and the data are checked first, before a kernel (or torch) starts."""
    params = check_parameters(params or {}, stages)
    check_data(corpus, dialogs, stages)
    profile, why = resolve_profile(profile)
    print(f"profile {profile!r}: {why}", flush=True)
    run_dir = Path(run_dir or default_run_dir(profile)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"profile": profile, "run_dir": str(run_dir), **pipeline_inputs(run_dir, corpus, dialogs, stages),
                  **params}
    (run_dir / "notebooks").mkdir(exist_ok=True)
    for stage, name in STAGES.items():
        notebook = HERE / "notebooks" / f"{name}.ipynb"
        if not notebook.exists() or (stages and stage not in stages):
            continue
        started = time.time()
        print(f"== {name} ==", flush=True)
        run_notebook(notebook, run_dir / "notebooks" / f"{name}.ipynb", parameters, log_output)
        folder = Path(parameters.get("out_dir") or run_dir / stage)
        print(f"== {name} done in {duration(time.time() - started)}: {stage_status(folder)} ==", flush=True)
    return run_dir
