"""The package's rooms: pocketgpt_utils.py's table lists every module of pocketgpt/ once, in pipeline order, each
module imports only those above it, and its docstring says what it imports."""
import ast
import re

import pocketgpt_utils
from pocketgpt.common import HERE


def table() -> list[str]:
    """The modules as pocketgpt_utils.py's docstring lists them, top (the bottom layer) first."""
    listing = pocketgpt_utils.__doc__.split("the ones above it:\n\n")[1].split("\n\n")[0]
    return re.findall(r"^    (\w+) +\S", listing, flags=re.M)


def test_every_module_is_in_the_table_once_and_imports_only_those_above_it():
    order = table()
    modules = sorted(p.stem for p in (HERE / "pocketgpt").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == modules, "pocketgpt_utils.py's table and the modules of pocketgpt/ differ"
    for i, name in enumerate(order):
        source = (HERE / "pocketgpt" / f"{name}.py").read_text()
        tree = ast.parse(source)
        imported = {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert imported <= set(order[:i]), f"{name} imports {sorted(imported - set(order[:i]))}, listed below it"
        assert re.search(r"^Imports: ", ast.get_docstring(tree), flags=re.M), f"{name}'s docstring says not what it imports"
