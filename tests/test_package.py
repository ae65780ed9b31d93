"""The package: its metadata (`pip install -e .` on someone's GPU machine takes ranges the code supports, never
the CPU build of torch pinned here, never pytest; requirements.txt stays the exact set CI installs and tests), and
facts written once."""
import ast
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parents[1]
TEST_TOOLS = {"pytest", "llama-cpp-python", "tensorboard"}


def pinned(*files) -> dict[str, str]:
    """name -> version of every `name==version` line in the requirements files."""
    pins = {}
    for name in files:
        for line in (HERE / name).read_text().splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
            if m:
                pins[m[1].lower()] = m[2]
    return pins


def project() -> dict:
    return tomllib.loads((HERE / "pyproject.toml").read_text())["project"]


def test_the_runtime_dependencies_are_ranges_that_the_pinned_set_satisfies_and_no_test_tool():
    deps = [Requirement(d) for d in project()["dependencies"]]
    pins = pinned("requirements.txt")
    names = {d.name.lower() for d in deps}
    assert not names & TEST_TOOLS, "a test tool is a runtime dependency"
    assert names == set(pins) - TEST_TOOLS, "pyproject.toml and requirements.txt name different packages"
    for d in deps:
        assert d.specifier and not any(s.operator == "==" for s in d.specifier), f"{d}: a range, not a pin"
        assert d.specifier.contains(pins[d.name.lower()]), f"{d} does not admit the tested {pins[d.name.lower()]}"
        assert any(s.operator == ">=" for s in d.specifier), f"{d}: say the lowest version that works"
    torch = next(d for d in deps if d.name == "torch")
    assert torch.specifier.contains("2.10.0"), "Kaggle's image carries torch 2.10"


def test_the_test_tools_are_an_extra_that_the_dev_pins_satisfy():
    extra = [Requirement(d) for d in project()["optional-dependencies"]["test"]]
    pins = pinned("requirements.txt", "requirements-dev.txt")
    assert {d.name.lower() for d in extra} == TEST_TOOLS
    for d in extra:
        assert d.specifier.contains(pins[d.name.lower()]), f"{d} does not admit the tested {pins[d.name.lower()]}"


def test_the_seed_and_the_model_shape_are_written_once():
    """The default seed (1337) is spelled in config.py alone, and so is the list of the model's shape parameters;
    every other module imports them (SEED, MODEL_SHAPE)."""
    shape = {"n_layer", "n_head", "n_embd", "n_positions"}
    for path in sorted((HERE / "pocketgpt").glob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.Constant) and node.value == 1337), f"{path.name}:{node.lineno}: use SEED"
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert not shape <= names, f"{path.name}:{node.lineno}: use MODEL_SHAPE"


def pipeline_order() -> list[str]:
    """The modules as pocketgpt_utils.py's docstring lists them: the table of contents, in pipeline order."""
    doc = ast.get_docstring(ast.parse((HERE / "pocketgpt_utils.py").read_text()))
    block = next(part for part in doc.split("\n\n") if part.startswith("    common "))  # the indented list
    return [line.split()[0] for line in block.splitlines()]


def test_the_table_of_contents_lists_every_module_and_imports_run_down_it():
    """pocketgpt_utils.py lists each module of the package once, a module imports only those above it in that
    list, at its top or inside a function (cli, on top, imports the rest when work starts), and its docstring
    says what it imports."""
    order = pipeline_order()
    package = sorted(p.stem for p in (HERE / "pocketgpt").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == package and len(order) == len(set(order)), "pocketgpt_utils.py's module list"
    upward = []
    for module in order:
        tree = ast.parse((HERE / "pocketgpt" / f"{module}.py").read_text())
        assert re.search(r"^Imports: ", ast.get_docstring(tree) or "", flags=re.M), f"{module}.py: no Imports: line"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]  # `from . import config`
                upward += [f"{module}.py:{node.lineno} imports {name}, which comes after it"
                           for name in (n.split(".")[0] for n in names) if order.index(name) >= order.index(module)]
    assert not upward, "\n".join(upward)


def test_the_readmes_table_of_parameters_names_modules_and_functions_that_exist():
    """README's "Where each parameter is used": every module it names is in the package, and every function it
    names beside a module is defined there."""
    readme = (HERE / "README.md").read_text()
    table = readme.split("### Where each parameter is used", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| `")]
    assert rows
    for cell in rows:
        for module, names in re.findall(r"`(\w+)\.py`(?: \(([^)]*)\))?", cell):
            path = HERE / "pocketgpt" / f"{module}.py"
            assert path.is_file(), f"README names {module}.py"
            defined = {n.name for n in ast.parse(path.read_text()).body
                       if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            for name in re.findall(r"`(\w+)`", names):
                assert name in defined, f"README: {name} is not in {module}.py"


# a stage folder's file names: stages.py spells them, everyone else asks it (StageDir)
STAGE_FILES = {"ckpt.pt", "metrics.json", "log.csv", "meta.json", "manifest.json", "sft_phase.json", "heldout.json",
               "data_report.json", "loss.png", "train.bin", "val.bin", "doc_stats.npz", "pairs.json", "pocketGPT.zip",
               "losses.png", "quality.png", "answers.json", "quality_answers.json", "report.md"}
# folders: words of their own elsewhere ("model" keys a checkpoint, pocketGPT is the project): a path join counts
STAGE_FOLDERS = {"model", "preference", "model_sft", "pocketGPT"}


def spelled_stage_files(path: Path) -> list[str]:
    """Where a module spells a stage file's name in code (docstrings and comments may name them for the reader):
    a string that is one, or holds one as a word, and a path joined with a stage folder's name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words = set(re.findall(r"\w+\.\w+", node.value)) | {node.value}
            found += [f"{path.name}:{node.lineno}: {name!r}" for name in STAGE_FILES & words]
            if node.value == "model_sft":
                found.append(f"{path.name}:{node.lineno}: 'model_sft'")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in STAGE_FOLDERS:
            found.append(f"{path.name}:{node.lineno}: / {node.right.value!r}")
    return found


def test_each_stage_file_name_is_spelled_in_one_module():
    """stages.StageDir names every file a stage writes; the stage code, the loop, the report and the plots ask it,
    so a name changes in one place and a folder's layout is read in one place."""
    spelled = {p.name: spelled_stage_files(p) for p in sorted((HERE / "pocketgpt").glob("*.py"))}
    spelled["pocketgpt_utils.py"] = spelled_stage_files(HERE / "pocketgpt_utils.py")
    assert {name for name, found in spelled.items() if found} == {"stages.py"}, \
        [hit for name, found in spelled.items() if name != "stages.py" for hit in found]
    names = {n.value for n in ast.walk(ast.parse((HERE / "pocketgpt" / "stages.py").read_text()))
             if isinstance(n, ast.Constant)}
    assert STAGE_FILES | STAGE_FOLDERS <= names, "stages.py names every one"
