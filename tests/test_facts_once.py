"""Each fact once: every default is written in config.py, and a constant several modules share is spelled in the
module that owns it; the others import it. The seed's own inference code, copied where a user sees it, keeps its
literals and says so."""
import ast
import dataclasses
import re
from pathlib import Path

from pocketgpt import config

PACKAGE = Path(__file__).resolve().parents[1] / "pocketgpt"
# the seed's code, copied as a user copies it (each place says so in a comment): a module (None: all of it) and
# the function that holds the copy
SEED_COPIES = {"seed_check.py": None, "export.py": "model_card"}
# a parameter named like a config field that is another fact: (module, name, value) -> what it is
ANOTHER_FACT = {
    ("evaluate.py", "batch_size", 16): "rows per forward pass while evaluating, not the training batch",
    ("evaluate.py", "batch_size", 32): "rows per forward pass while evaluating, not the training batch",
    ("model.py", "batch_size", 32): "prompts generate_many answers at once, not the training batch",
    ("optim.py", "weight_decay", 0.0): "Muon's default as torch's optimizers have one; AdamW's biases and norms never decay",
}
# a shared constant as a name spells it (key=value): where it is written, once
KEYED = {
    ("top_p", 0.9): "model.py",  # SAMPLING, the seed's sampling
    ("temperature", 0.8): "model.py",
    ("do_sample", True): "model.py",
    ("max_new_tokens", 64): "model.py",  # ANSWER_TOKENS
    ("n_generate", 64): "llama.py",  # CHECK_TOKENS
    ("temperature", 0.0): "llama.py",  # LLAMA_GREEDY
    ("bos_token", "<|bos|>"): "common.py",  # TOKEN_ROLES, from SPECIAL_TOKENS
    ("eos_token", "<|eos|>"): "common.py",
    ("unk_token", "<unk>"): "common.py",
    ("pad_token", "<pad>"): "common.py",
}
# a shared constant whose number says what it is: the one module that writes it
NUMBERS = {-100: "common.py", 6_000_000: "demo.py", 20_000: "demo.py"}  # the seed, 1337: test_package.py


def modules():
    for path in sorted(PACKAGE.glob("*.py")):
        yield path.name, ast.parse(path.read_text())


def literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ...  # not a literal: a name imported from where the fact lives


def same(a, b) -> bool:
    return type(a) is type(b) and a == b or {type(a), type(b)} == {int, float} and a == b


def spelled(tree, calls: bool = True):
    """(name, value node) of every name=value a module writes: parameter defaults, annotated fields, a dict's
    string keys and the keywords of dict(...), and with `calls` every call's keywords (a setting of that call)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            args = node.posonlyargs + node.args
            pairs = [*zip(args[len(args) - len(node.defaults):], node.defaults), *zip(node.kwonlyargs, node.kw_defaults)]
            yield from ((a.arg, d) for a, d in pairs if d is not None)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            yield node.target.id, node.value
        elif isinstance(node, ast.Call) and (calls or isinstance(node.func, ast.Name) and node.func.id == "dict"):
            yield from ((k.arg, k.value) for k in node.keywords if k.arg)
        elif isinstance(node, ast.Dict):
            yield from ((k.value, v) for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and isinstance(k.value, str))


def defaults_in_config() -> dict:
    """name -> the values config.py gives it: each dataclass field's default and each profile's values."""
    out = {}
    for cls in [c for c in vars(config).values() if dataclasses.is_dataclass(c)]:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and f.default is not None:
                out.setdefault(f.name, []).append(f.default)
    for stages in config.PROFILES.values():
        for values in stages.values():
            for name, value in values.items():
                out.setdefault(name, []).append(value)
    return out


def in_seed_copy(module: str, tree, line: int) -> bool:
    if module not in SEED_COPIES:
        return False
    function = SEED_COPIES[module]
    return function is None or any(isinstance(n, ast.FunctionDef) and n.name == function
                                   and n.lineno <= line <= n.end_lineno for n in ast.walk(tree))


def test_every_default_is_written_in_config_alone():
    """A parameter default, a dataclass field or a dict entry that spells a config default again
    (`documents="auto"` beside TokenizerConfig's) would drift from it: the others import it. A call's keyword
    is a setting of that call (the preference phase's own optimizer), not a default."""
    defaults = defaults_in_config()
    found = []
    for module, tree in modules():
        if module == "config.py":
            continue
        for name, node in spelled(tree, calls=False):
            value = literal(node)
            if value is not ... and any(same(value, d) for d in defaults.get(name, [])) \
                    and (module, name, value) not in ANOTHER_FACT:
                found.append(f"{module}:{node.lineno}: {name}={value!r} is config.py's default: use it from there")
    assert not found, "\n".join(found)


def test_a_shared_constant_is_spelled_by_its_owner_alone():
    """The seed's sampling, the answer and check lengths, llama.cpp's greedy settings and the special tokens'
    roles are written once, where they live (SAMPLING, ANSWER_TOKENS, CHECK_TOKENS, LLAMA_GREEDY, TOKEN_ROLES);
    so are the numbers that say what they are: the ignored target, the demo data's size."""
    keyed, numbers = {key: [] for key in KEYED}, {n: set() for n in NUMBERS}
    for module, tree in modules():
        for name, node in spelled(tree):
            value = literal(node)
            for key in keyed:
                if name == key[0] and same(value, key[1]) and not in_seed_copy(module, tree, node.lineno):
                    keyed[key].append(f"{module}:{node.lineno}")
        for node in ast.walk(tree):
            value = -node.operand.value if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant) else getattr(node, "value", None) \
                if isinstance(node, ast.Constant) else None
            if type(value) is int and value in numbers:
                numbers[value].add(module)
    wrong = [f"{k[0]}={k[1]!r} is written at {', '.join(places)}: once, in {KEYED[k]}"
             for k, places in keyed.items() if len(places) > 1 or any(not p.startswith(KEYED[k]) for p in places)]
    wrong += [f"{n} is written in {sorted(m)}: in {NUMBERS[n]} alone" for n, m in numbers.items() if m - {NUMBERS[n]}]
    assert not wrong, "\n".join(wrong)


def test_the_seeds_sampling_is_written_once_outside_the_seeds_copied_code():
    """top_p=0.9 and temperature=0.8 in any text (a generate() call in a string too) stand in model.py's SAMPLING
    and in the seed's own code where it is copied, and nowhere else."""
    for module, tree in modules():
        for line_no, line in enumerate((PACKAGE / module).read_text().splitlines(), 1):
            if re.search(r"\btop_p\W{1,4}0\.9\b|\btemperature\W{1,4}0\.8\b", line) and module != "model.py":
                assert in_seed_copy(module, tree, line_no), f"{module}:{line_no}: use model.SAMPLING"
