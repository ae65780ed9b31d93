"""The demo data: an ML corpus and instruction/response pairs made from the installed ML libraries' docstrings.

Owns: the demo corpus.txt (documents separated by blank lines) and dialogs.csv, deterministic for the installed
versions; the docstrings are read from source with `ast`, never imported; building them into a run folder on
first use.
Imports: files.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from pathlib import Path

from .files import check_writable, csv_text, write_file

# Smallest first: what a small library cannot fill of its share rolls over to the big ones.
DEMO_PACKAGES = ["safetensors", "tokenizers", "accelerate", "datasets", "sklearn", "scipy", "pandas",
                 "numpy", "transformers", "torch"]


QUESTION_TEMPLATES = [
    "What does {name} do?",
    "Explain {qualname}.",
    "What is `{name}` used for?",
    "Describe the {kind} {qualname}.",
    "In {package}, what is {name}?",
    "Summarize the documentation of {qualname}.",
]


def iter_docstrings(packages=DEMO_PACKAGES):
    """Yield (package, qualname, kind, docstring) for every public documented object, in a fixed order."""
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for file in sorted(root.rglob("*.py")):
            rel = file.relative_to(root.parent).with_suffix("")
            if any(part.startswith("_") and part != "__init__" or part in ("tests", "testing") for part in rel.parts):
                continue
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            try:
                tree = ast.parse(file.read_bytes(), filename=str(file))
            except (SyntaxError, ValueError):
                continue
            yield from _walk_docstrings(tree, module, package)


def _walk_docstrings(node, prefix: str, package: str):
    kind = {"Module": "module", "ClassDef": "class"}.get(type(node).__name__, "function")
    doc = ast.get_docstring(node)
    if doc:
        yield package, prefix, kind, doc
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
            yield from _walk_docstrings(child, f"{prefix}.{child.name}", package)


def clean_docstring(doc: str) -> str:
    """One document per docstring: dedented, no blank lines inside (blank lines separate documents)."""
    lines = [line.rstrip() for line in inspect.cleandoc(doc).splitlines()]
    return "\n".join(line for line in lines if line.strip())


def summary_paragraph(doc: str) -> str:
    """The first paragraph of a docstring, on one line: the answer to 'what does X do?'."""
    first = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(first.split())


DEMO_BYTES, DEMO_DIALOGS = 6_000_000, 20_000  # the demo corpus's size and its dialog rows (demo-data's defaults)


DEMO_FILES = {"corpus": "corpus.txt", "dialogs": "dialogs.csv"}  # the demo data's two files, by what each holds


def make_demo_data(out_dir, max_bytes: int = DEMO_BYTES, max_dialogs: int = DEMO_DIALOGS,
                   packages=DEMO_PACKAGES) -> dict:
    """Write corpus.txt (documents separated by blank lines) and dialogs.csv; deterministic."""
    out_dir = Path(out_dir)
    corpus, dialogs_csv = (out_dir / DEMO_FILES[kind] for kind in ("corpus", "dialogs"))
    check_writable(corpus, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    packages = [p for p in packages if importlib.util.find_spec(p) is not None]
    seen, documents, n_bytes, dialogs = set(), [], 0, []
    for i, package in enumerate(packages):  # an equal share each, so no one library dominates
        budget = n_bytes + (max_bytes - n_bytes) // (len(packages) - i)
        dialog_budget = len(dialogs) + (max_dialogs - len(dialogs)) // (len(packages) - i)
        for _, qualname, kind, doc in iter_docstrings([package]):
            text = clean_docstring(doc)
            key = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if len(text) < 80 or key in seen:
                continue
            seen.add(key)
            document = f"{qualname}\n{text}"
            size = len(document.encode()) + 2
            if n_bytes + size > budget:
                if budget - n_bytes < 2000:
                    break
                continue  # one long docstring; smaller ones may still fit
            documents.append(document)
            n_bytes += size
            answer = summary_paragraph(doc)
            if kind != "module" and 40 <= len(answer) <= 600 and len(dialogs) < dialog_budget:
                name = qualname.rsplit(".", 1)[-1]
                for k in sorted({key[0] % len(QUESTION_TEMPLATES), key[1] % len(QUESTION_TEMPLATES)}):
                    q = QUESTION_TEMPLATES[k].format(name=name, qualname=qualname, kind=kind, package=package)
                    dialogs.append((q, answer))
    write_file(corpus, "".join(d + "\n\n" for d in documents))
    write_file(dialogs_csv, csv_text(["instruction", "response"], dialogs[:max_dialogs]))
    return {"corpus": str(corpus), "documents": len(documents), "bytes": n_bytes,
            "dialogs": str(dialogs_csv), "dialog_rows": min(len(dialogs), max_dialogs)}


def demo_data(run_dir, kind: str) -> Path:
    """The demo's `kind` file ("corpus" or "dialogs") in the run folder's data/, the data built on first use."""
    data = Path(run_dir) / "data"
    if not all((data / name).exists() for name in DEMO_FILES.values()):
        print(f"building the demo data in {data}")
        make_demo_data(data)
    return data / DEMO_FILES[kind]
