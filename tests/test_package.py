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
