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


# imports that still run up the order, each until the change that ends it lands: (module, the module it imports)
UPWARD_FOR_NOW = {("common", "data"): "stage_output's fingerprint, until stage folders move to a module above data"}


def test_the_table_of_contents_lists_every_module_and_imports_run_down_it():
    """pocketgpt_utils.py lists each module of the package once, and a module imports only those above it in
    that list, at its top or inside a function (cli, on top, imports the rest when work starts)."""
    order = pipeline_order()
    package = sorted(p.stem for p in (HERE / "pocketgpt").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == package and len(order) == len(set(order)), "pocketgpt_utils.py's module list"
    upward = {}
    for module in order:
        for node in ast.walk(ast.parse((HERE / "pocketgpt" / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]  # `from . import config`
                for name in (n.split(".")[0] for n in names):
                    if order.index(name) >= order.index(module):
                        upward[(module, name)] = f"{module}.py:{node.lineno} imports {name}, which comes after it"
    assert set(upward) == set(UPWARD_FOR_NOW), "\n".join(v for k, v in upward.items() if k not in UPWARD_FOR_NOW) \
        or f"no longer upward, take it off UPWARD_FOR_NOW: {set(UPWARD_FOR_NOW) - set(upward)}"


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
