"""Data as it comes: the demo corpus and dialogs, and readers for a corpus in every format.

Owns: the demo data (ML prose from the docstrings of the installed ML libraries, read from source with
`ast`, never imported); reading a corpus as documents from .txt (streamed in blocks of lines; documents by
blank lines, lines or the whole file) or from JSON Lines, Parquet, Arrow and save_to_disk folders (streamed
through `datasets`) and CSV (Python's csv module: `,` `;` or tab, UTF-8 or UTF-16, checked strictly first),
.gz/.bz2/.zst included; long documents in pieces cut where the tokenizer splits anyway; where a row is, said
as the user finds it; the seeded train/val split.
Imports: common, files, config (DOCUMENTS).
"""
from __future__ import annotations

import ast
import bisect
import codecs
import csv
import functools
import glob
import hashlib
import importlib.util
import inspect
import io
import json
import re
from contextlib import contextmanager
from pathlib import Path

from .common import COMPRESSIONS, FORMATS, PocketGPTError, data_format, data_size, progress
from .config import DOCUMENTS
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


def make_demo_data(out_dir, max_bytes: int = 6_000_000, max_dialogs: int = 20_000,
                   packages=DEMO_PACKAGES) -> dict:
    """Write corpus.txt (documents separated by blank lines) and dialogs.csv; deterministic."""
    out_dir = Path(out_dir)
    check_writable(out_dir / "corpus.txt", "--out")
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
    write_file(out_dir / "corpus.txt", "".join(d + "\n\n" for d in documents))
    write_file(out_dir / "dialogs.csv", csv_text(["instruction", "response"], dialogs[:max_dialogs]))
    return {"corpus": str(out_dir / "corpus.txt"), "documents": len(documents), "bytes": n_bytes,
            "dialogs": str(out_dir / "dialogs.csv"), "dialog_rows": min(len(dialogs), max_dialogs)}


def demo_data(run_dir) -> Path:
    """The run folder's data/ with the demo corpus.txt and dialogs.csv, built on first use."""
    data = Path(run_dir) / "data"
    if not ((data / "corpus.txt").exists() and (data / "dialogs.csv").exists()):
        print(f"building the demo data in {data}")
        make_demo_data(data)
    return data


DIALOG_FORMATS = ("csv", "json", "parquet", "arrow", "saved")  # dialogs and preference pairs: tables
CORPUS_FORMATS = ("text", "json", "parquet", "csv", "arrow", "saved")


TEXT_COLUMNS = ["text", "content", "document", "body", "raw_content", "article", "passage", "markdown"]


def data_files(path, param: str, formats, hint: str) -> list[Path]:
    """The inputs a path names: a file, a save_to_disk folder, a glob, or a folder: every file (and saved
    folder) under it in one of `formats`, in sorted order. A folder holding two formats (a corpus beside a
    metadata.csv, say) is not read in silence: a glob says which files to read."""
    p = Path(path)
    if p.is_file() or data_format(p) == "saved":
        return [p]
    if p.is_dir():
        found = [f for f in sorted(p.rglob("*")) if not f.name.startswith(".") and data_format(f) in formats
                 and (f.is_file() or data_format(f) == "saved")]
        saved = [f for f in found if f.is_dir()]
        found = [f for f in found if not any(s in f.parents for s in saved)]  # a saved folder is read whole
        kinds = sorted({data_format(f) for f in found})
        if len(kinds) > 1:
            raise PocketGPTError(f"{param}={path}: the folder holds files of {len(kinds)} formats ({', '.join(kinds)}). "
                                 f"Set {param} to a glob of the ones to read, e.g. {p / '**' / '*.jsonl'}.")
        if not found:
            names = sorted(ext for ext, fmt in FORMATS.items() if fmt in formats)
            raise PocketGPTError(f"{param}={path}: the folder holds no {', '.join(names)} files (plain or .gz, .bz2, "
                                 f".zst){' or save_to_disk folders' if 'saved' in formats else ''}. {hint}")
        return found
    found = sorted(Path(f) for f in glob.glob(str(path), recursive=True)
                   if Path(f).is_file() or data_format(f) == "saved")
    if not found:
        raise PocketGPTError(f"{param}={path}: no such file, folder or glob match. {hint}")
    return found


def corpus_files(corpus_path) -> list[Path]:
    """A corpus is a file, a folder or a glob of .txt, .jsonl/.json, .parquet, .csv, .arrow files (any of
    them .gz, .bz2 or .zst) or save_to_disk folders; files in sorted order."""
    if corpus_path is None:
        raise PocketGPTError("corpus_path is not set: pass a corpus file (.txt, .jsonl, .parquet, ...), a folder "
                             "of them or a glob.")
    return data_files(corpus_path, "corpus_path", CORPUS_FORMATS,
                      "Check the path (on Kaggle, attach the dataset holding your corpus).")


def open_data(file, raw=None):
    """A file to read bytes from, decompressed by its extension (.gz, .bz2, .zst); `raw`: the file already
    open (it is returned as it is when the file is not compressed, and left open)."""
    suffix, own = Path(file).suffix.lower(), raw is None
    if suffix == ".gz":
        import gzip
        return gzip.open(file if own else raw, "rb")
    if suffix == ".bz2":
        import bz2
        return bz2.open(file if own else raw, "rb")
    raw = open(file, "rb") if own else raw
    if suffix == ".zst":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=own))
    return raw


def bytes_read() -> int | None:
    """Bytes this process has read so far (Linux's /proc/self/io), for progress in bytes through readers
    that do not say where they are in a file; None where the system does not tell."""
    try:
        with open("/proc/self/io", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"rchar"))
    except (OSError, ValueError, StopIteration):
        return None


class InvalidUTF8:
    """Counts invalid UTF-8 bytes and remembers where the first ones are (file, line, byte offset)."""

    def __init__(self):
        self.count, self.where = 0, []

    def decode(self, raw: bytes, file, line_no: int, offset: int) -> str:
        """`raw` starts at line `line_no` (from 1), byte `offset` of the file; it may hold many lines."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        out, pos = [], 0
        while True:
            try:
                out.append(raw[pos:].decode("utf-8"))
                return "".join(out)
            except UnicodeDecodeError as e:
                out.append(raw[pos:pos + e.start].decode("utf-8") + "\ufffd")
                self.count += e.end - e.start
                if len(self.where) < 5:
                    at = pos + e.start
                    line = line_no + raw.count(b"\n", 0, at)
                    self.where.append(f"{file}:{line} (byte {offset + at})")
                pos += e.end


def first_bad_json_line(file) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object, and why (for a file holding one JSON
    array: the line where it breaks); None when every line parses (the trouble is elsewhere)."""
    try:
        with open_data(file) as f:
            for n, line in enumerate(f, 1):
                line = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line  # a UTF-8 byte order mark
                if n == 1 and line.lstrip().startswith(b"["):
                    try:
                        json.loads(line + f.read())
                    except json.JSONDecodeError as e:
                        return e.lineno, e.msg
                    except ValueError as e:
                        return 1, str(e)
                    return None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return n, f"{e.msg} at column {e.colno}"
                except ValueError as e:  # a line that is not UTF-8
                    return n, str(e)
                if not isinstance(record, dict):
                    return n, f"a JSON {type(record).__name__}, not an object"
    except (OSError, EOFError, ValueError):  # a damaged compressed file: said by the caller
        return None
    return None


def table_error(file, fmt: str, e: Exception) -> PocketGPTError:
    """What went wrong reading a table, said so it can be fixed: the line of a JSON Lines file that is not
    JSON, a file that is not UTF-8, else the reader's own words, with the file's name."""
    while e.__cause__ is not None and not isinstance(e, PocketGPTError):  # datasets wraps the reader's error
        e = e.__cause__
    if isinstance(e, PocketGPTError):
        return e
    if Path(file).suffix.lower() in COMPRESSIONS:  # a download that stopped halfway: say so, not "bad JSON"
        try:
            with open_data(file) as f:
                while f.read(1 << 24):
                    pass
        except Exception as damage:
            return PocketGPTError(f"{file} is damaged or cut short: it does not decompress ({type(damage).__name__}: "
                                  f"{damage}). Copy or compress it again.")
    bad = first_bad_json_line(file) if fmt == "json" else None
    if bad:
        return PocketGPTError(f"{file}, line {bad[0]}: not a JSON object ({bad[1]}). A JSON Lines file holds one JSON "
                              f"object a line: fix or remove that line.")
    if isinstance(e, UnicodeDecodeError):
        return PocketGPTError(f"{file} is not UTF-8 (byte {e.start}: {e.reason}). Save it as UTF-8 and try again.")
    name = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "arrow": "Arrow", "saved": "a save_to_disk folder"}[fmt]
    return PocketGPTError(f"{file} cannot be read as {name} ({type(e).__name__}: {e}). Check that it is whole and that its "
                          f"extension says its format (.jsonl, .json, .parquet, .csv, .arrow; .gz, .bz2, .zst compressed).")


@contextmanager
def datasets_errors_ours():
    """`datasets` logs a parse error itself ("Failed to load JSON ... in row 1", a row counted within a
    chunk) before raising it; the error it raises becomes our message, which names the file's line."""
    import logging
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def open_table(file, fmt: str):
    """A table as `datasets` streams (a save_to_disk folder: memory-mapped, a DatasetDict's splits in turn)
    and its column names ([] when it holds no rows). A CSV is read by CsvTable, as written, every cell a
    string: "007", "nan" and "" stay what they are."""
    try:
        if fmt == "csv":
            header = csv_row_lines(file)[2]  # quoting and cell counts checked strictly first, the whole file
            return ([CsvTable(file, header)], header) if header else ([], [])
        import datasets  # only here: a CSV is read without it (and its 0.1 GB)
        if fmt == "saved":
            ds = datasets.load_from_disk(str(file))
            parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
            return parts, parts[0].column_names if parts else []
        ds = datasets.load_dataset(fmt, data_files=[str(file)], split="train", streaming=True)
        with datasets_errors_ours():
            return [ds], ds.column_names or list(next(iter(ds), {}))
    except StopIteration:  # datasets found no row to learn the columns from
        return [], []
    except Exception as e:
        raise table_error(file, fmt, e) from None


CSV_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab"}  # as spreadsheets save CSV, by locale and kind


def csv_dialect(file) -> tuple[str, str]:
    """(encoding, separator) of a CSV as spreadsheets save it: a byte order mark says UTF-8 or UTF-16 (Excel's
    "Unicode text"), none says UTF-8; the separator is the one of `,` `;` tab that the header line holds most
    of outside quotes (a comma where it holds none: a one-column file)."""
    with open_data(file) as f:
        head = f.read(1 << 16)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif head[:4096].count(0) > len(head[:4096]) // 4:  # ASCII text as UTF-16: every other byte is 0
        raise PocketGPTError(f"{file} looks like UTF-16 without a byte order mark (every other byte is 0). Save it as "
                             f"UTF-8 (Excel: \"CSV UTF-8\"), or as UTF-16 with its byte order mark (\"Unicode text\").")
    else:
        encoding = "utf-8-sig"
    text = head.decode(encoding, errors="ignore")
    header, quoted = [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch in "\r\n" and not quoted:
            break
        elif not quoted:
            header.append(ch)
    counts = {sep: header.count(sep) for sep in CSV_SEPARATORS}
    best = max(counts, key=lambda s: counts[s])  # ties: the first, a comma
    return encoding, best if counts[best] else ","


class CsvTable:
    """A CSV streamed by Python's csv module with its detected dialect (csv_dialect), as iter_table reads a
    `datasets` table: select_columns, then iter(batch_size) of {column: values}. Blank lines are no rows."""

    def __init__(self, file, columns):
        self.file, self.columns = file, list(columns)

    def select_columns(self, columns):
        return CsvTable(self.file, columns)

    def iter(self, batch_size: int):
        encoding, sep = csv_dialect(self.file)
        with open_data(self.file) as raw:
            reader = csv.reader(io.TextIOWrapper(raw, encoding=encoding, newline=""), delimiter=sep, strict=True)
            header = next(reader, [])
            take = [header.index(c) for c in self.columns]
            batch = [[] for _ in take]
            for row in reader:
                if not row:
                    continue
                for values, i in zip(batch, take):
                    values.append(row[i])
                if len(batch[0]) == batch_size:
                    yield dict(zip(self.columns, batch))
                    batch = [[] for _ in take]
            if batch and batch[0]:
                yield dict(zip(self.columns, batch))


def iter_table(parts, file, fmt: str, columns, progress=None, batch_rows: int = 1000):
    """Yield (number of the batch's first row, {column: values}) for `columns` of an open table, streamed.
    `progress` advances by the file's bytes on disk: what this process has read of it (bytes_read), or
    for a memory-mapped saved folder the share of its rows."""
    size, done, start = data_size(file), 0, 0
    n_rows = sum(len(p) for p in parts) if fmt == "saved" else None
    before = bytes_read()
    try:
        with datasets_errors_ours():
            for part in parts:
                for batch in part.select_columns(columns).iter(batch_size=batch_rows):
                    yield start, batch
                    start += len(batch[columns[0]])
                    if progress is not None:
                        now = size * start // max(n_rows, 1) if n_rows is not None else (bytes_read() or 0) - (before or 0)
                        step = min(now, size) - done
                        if step > 0:
                            progress.update(step)
                            done += step
    except Exception as e:
        raise table_error(file, fmt, e) from None
    if progress is not None:
        progress.update(size - done)


def csv_row_lines(file) -> tuple[list[int], list[int], list[str]]:
    """A strict pass over a CSV file with Python's csv module (in its detected encoding and separator,
    csv_dialect), which stops where pandas guesses: a quote inside a quoted cell that is not doubled ("He
    said "hi" to me" reads as `He said hi" to me"` there), a quoted cell that never closes, a row with more
    or fewer cells than the header (pandas takes the extra first cell for an index). Each is an error naming
    the line. Returns where rows start, for row_place: the rows (from 0) that do not start on the line after
    the previous row's (the first; after a cell over several lines or a blank line), and their lines; and
    the header. Read once per file and process."""
    stat = Path(file).stat()
    return _csv_row_lines(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _csv_row_lines(file: str, size: int, mtime: int) -> tuple[list[int], list[int], list[str]]:
    csv.field_size_limit(2 ** 31 - 1)  # a document can be longer than the 128 kB default
    encoding, sep = csv_dialect(file)
    name = CSV_SEPARATORS[sep]
    rows, lines, n, previous, end, header = [], [], 0, None, 0, []
    with open_data(file) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding=encoding, newline=""), delimiter=sep, strict=True)
        try:
            header = next(reader, [])
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line: pandas skips it, so no row
                    continue
                if len(row) != len(header):
                    raise PocketGPTError(f"{file}, line {start}: {len(row)} cells where the header has {len(header)} (read "
                                         f"as {name}-separated: the header's separator). A cell that holds a {name} "
                                         f"must be in double quotes; fix the line or remove it.")
                if previous is None or start != previous + 1:
                    rows.append(n)
                    lines.append(start)
                n, previous = n + 1, start
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise PocketGPTError(f"{file}, line {end + 1}: a cell opens a double quote that never closes (the file ends "
                                     f"inside it). Close the quote, or double each quote inside the cell.") from None
            raise PocketGPTError(f"{file}, line {reader.line_num}: a double quote inside a quoted cell is not doubled "
                                 f"({e}). In CSV a quoted cell writes each quote inside it twice: \"He said \"\"hi\"\" to "
                                 f"me\". Fix that line (or save the file again from a spreadsheet program).") from None
    return rows, lines, header


def csv_read_as(file) -> str:
    """How a CSV was read, said in one phrase: "semicolon-separated, UTF-16"."""
    encoding, sep = csv_dialect(file)
    return f"{CSV_SEPARATORS[sep]}-separated, {'UTF-16' if encoding == 'utf-16' else 'UTF-8'}"


def row_place(file, fmt: str, i: int) -> str:
    """Where row i (from 0) is, as the user finds it in an editor: a .jsonl or CSV file's line (a CSV's header
    is line 1; a cell over several lines counts them), else the row or record number."""
    if fmt == "json":
        return f"{file}, line {i + 1}" if ".jsonl" in [s.lower() for s in Path(file).suffixes] else f"{file}, record {i + 1}"
    if fmt == "csv":
        rows, lines, _ = csv_row_lines(file)
        k = bisect.bisect_right(rows, i) - 1
        return f"{file}, line {lines[k] + i - rows[k] if k >= 0 else i + 2}"
    return f"{file}, row {i + 1}"


def find_text_column(columns, text_column=None, file="") -> str:
    """The column of documents: `text_column` (in any case), else the first of TEXT_COLUMNS, in any case."""
    lower = {c.lower(): c for c in columns}
    if text_column:
        if text_column in columns or text_column.lower() in lower:
            return text_column if text_column in columns else lower[text_column.lower()]
        raise PocketGPTError(f"{file}: text_column={text_column!r} is not a column; the columns are {list(columns)}. "
                             f"Set text_column to the one holding the documents.")
    found = next((lower[name] for name in TEXT_COLUMNS if name in lower), None)
    if found is None:
        raise PocketGPTError(f"{file}: no text column found among {list(columns)}. Set text_column to the column "
                             f"holding the documents (found by name: {', '.join(TEXT_COLUMNS)}, in any case).")
    return found


def table_documents(file, fmt: str, text_column=None, progress=None, counts: dict | None = None):
    """A table's documents: the text cell of each row, as it is. Rows whose cell is empty are skipped and
    counted in `counts`, with the rows read and the column used."""
    counts = {} if counts is None else counts
    parts, columns = open_table(file, fmt)
    if not columns:  # no rows
        if progress is not None:
            progress.update(data_size(file))
        return
    column = find_text_column(columns, text_column, file)
    counts.setdefault("text_columns", {})[str(file)] = column
    for start, batch in iter_table(parts, file, fmt, [column], progress):
        counts["rows"] = counts.get("rows", 0) + len(batch[column])
        for i, text in enumerate(batch[column], start):
            if text is not None and not isinstance(text, str):
                raise PocketGPTError(f"{row_place(file, fmt, i)}: the {column!r} cell is a {type(text).__name__}, not "
                                     f"text. Set text_column to the column that holds the documents as strings.")
            if not text or not text.strip():
                counts["empty_rows"] = counts.get("empty_rows", 0) + 1
                continue
            yield text


# --- a .txt corpus as documents, of any shape ----------------------------------------------------------
# How a .txt file is cut into documents (DOCUMENTS, 01's `documents`): "blank_lines" (the text between blank
# lines), "lines" (each line), "whole_file" (the file, as it is), or "auto": blank_lines where the file has a
# blank line between text, else lines (a WikiText dump, a file with no newline at all).
READ_BYTES = 1 << 20  # a .txt is read in blocks of whole lines of about this size (a longer line: in parts)
BLANK_LINE = re.compile(rb"\n[^\S\n]*\n")  # bytes: ASCII whitespace, enough to choose
NON_SPACE = re.compile(rb"\S")
WHITESPACE_LINE = re.compile(r"(?m)^[^\S\n]+$")  # a line of spaces: blank, as an empty one
CR_BEFORE_LF = re.compile(r"\r+\n")


def document_mode(file, documents: str = "auto") -> str:
    """How a .txt file is read: `documents`, or for "auto" blank_lines where a blank line stands between
    text anywhere in the file (read until the first one), else lines."""
    if documents not in DOCUMENTS:
        raise PocketGPTError(f"documents={documents!r}: use one of {', '.join(DOCUMENTS)}.")
    if documents != "auto":
        return documents
    stat = Path(file).stat()
    return _auto_mode(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _auto_mode(file: str, size: int, mtime: int) -> str:
    seen_text, tail = False, b""
    with open_data(file) as f:
        while block := f.read(16 * READ_BYTES):
            data = tail + block
            for m in BLANK_LINE.finditer(data):  # a blank line with text before it and after it
                if (seen_text or NON_SPACE.search(data, 0, m.start())) and NON_SPACE.search(data, m.end()):
                    return "blank_lines"
            seen_text = seen_text or NON_SPACE.search(data) is not None
            tail = data[-4096:]  # a blank line across two blocks (a line of spaces longer than this: rare)
    return "lines"


def text_blocks(file, invalid: InvalidUTF8, progress=None, block_bytes: int = READ_BYTES):
    """A .txt file as decoded text, in blocks of about READ_BYTES: (text, whole_lines). A block ends at a
    line's end ("\n" included) unless one line is longer than a block; then whole_lines is False and the
    line goes on in the next block (cut between two characters, a few bytes before the end)."""
    line_no, offset, counted, rest = 1, 0, 0, b""
    with open(file, "rb") as disk, open_data(file, disk) as f:
        while True:
            raw = f.read(block_bytes)
            data = rest + raw
            if not data:
                break
            cut = data.rfind(b"\n") + 1 if raw else len(data)
            whole = cut > 0
            if not whole:  # one line longer than a block: its last character waits for the next block
                cut = len(data) - 1
                while cut > 0 and data[cut] & 0xC0 == 0x80 and len(data) - cut < 4:
                    cut -= 1
                if cut == 0 or data[:cut].decode("utf-8", "replace").isspace():  # blank so far: wait for the rest
                    rest = data
                    continue
            block, rest = data[:cut], data[cut:]
            yield invalid.decode(block, file, line_no, offset), whole
            line_no += block.count(b"\n")
            offset += len(block)
            if progress is not None:
                now = offset if f is disk else disk.tell()
                progress.update(now - counted)
                counted = now
        if progress is not None:
            progress.update(data_size(file) - counted)


def block_documents(text: str, mode: str) -> tuple[list[str], bool, bool]:
    """A block of whole lines as its documents: (documents, the first continues the one before, the last
    may go on in the next block). Lines lose their line ending ("\r\n" too); blank lines are dropped."""
    if "\r" in text:
        text = CR_BEFORE_LF.sub("\n", text)
    if mode == "lines":
        return [line for line in text.split("\n") if line and not line.isspace()], False, False
    if WHITESPACE_LINE.search(text):
        text = WHITESPACE_LINE.sub("", text)
    docs = [d.strip("\n") for d in text.split("\n\n")]
    return [d for d in docs if d], not text.startswith("\n"), not text.endswith("\n\n")


class Fragments:
    """Documents put together from the blocks of a file: each fragment is held until the next one says
    whether it continues the same document (a newline between them where a line ended)."""

    def __init__(self):
        self.held = None  # [text, starts a document, ends at a line's end]

    def add(self, text: str, continues: bool, ends_line: bool):
        if self.held is not None:
            t, start, line_end = self.held
            yield (t + "\n" if continues and line_end else t), start, not continues
        self.held = [text, not continues, ends_line]

    def close(self, strip_cr: bool):
        if self.held is not None:
            t, start, _ = self.held
            yield (t.rstrip("\r") if strip_cr else t), start, True
        self.held = None


def text_fragments(file, mode: str, invalid: InvalidUTF8, progress=None, block_bytes: int = READ_BYTES):
    """A .txt file's documents as fragments (text, starts a document, ends it): a document in one block is
    one fragment; one that spans blocks (longer than READ_BYTES) comes in several. Lines keep their leading
    spaces; line endings become "\n" (whole_file keeps the file's text as it is)."""
    out, open_doc, mid_line = Fragments(), False, False
    for text, whole in text_blocks(file, invalid, progress, block_bytes):
        if mode == "whole_file":
            yield from out.add(text, open_doc, False)
            open_doc = True
            continue
        if mid_line:  # the rest of a line longer than a block: it goes on the open document
            i = text.find("\n")
            tail = text if i < 0 else text[:i].rstrip("\r")
            if tail:
                yield from out.add(tail, True, i >= 0)
            elif out.held is not None:  # the line ended with the block before (its "\r" there too)
                out.held[0], out.held[2] = out.held[0].rstrip("\r"), True
            if i < 0:
                continue
            text, mid_line = text[i + 1:], False
            if not text:
                continue
        if not whole:  # a line longer than a block starts here
            yield from out.add(text, mode == "blank_lines" and open_doc, False)
            open_doc = mid_line = True
            continue
        docs, first_continues, open_end = block_documents(text, mode)
        for i, doc in enumerate(docs):
            yield from out.add(doc, i == 0 and first_continues and open_doc, True)
        open_doc = bool(docs) and open_end
    yield from out.close(strip_cr=mode != "whole_file")


def iter_fragments(files, invalid: InvalidUTF8 | None = None, progress=None, text_column=None,
                   counts: dict | None = None, documents="auto", block_bytes: int = READ_BYTES):
    """Yield the corpus as (text, starts a document, ends it), at most about READ_BYTES of text at a time.
    A .txt file's documents are found by `documents` (a name of DOCUMENTS, or {file: name}); any other
    file's documents are the cells of its text column (table_documents), each one fragment. `progress`
    (a tqdm bar) advances by the bytes read from disk."""
    invalid = invalid or InvalidUTF8()
    for file in files:
        fmt = data_format(file, "text")
        if fmt != "text":
            for doc in table_documents(file, fmt, text_column, progress, counts):
                yield doc, True, True
            continue
        mode = document_mode(file, documents.get(str(file), "auto") if isinstance(documents, dict) else documents)
        yield from text_fragments(file, mode, invalid, progress, block_bytes)


def iter_documents(files, invalid: InvalidUTF8 | None = None, progress=None, text_column=None,
                   counts: dict | None = None, documents="auto", block_bytes: int = READ_BYTES):
    """Yield whole documents (iter_fragments joined): for tests and tools; the stage reads fragments, so a
    document of any length never has to be one string."""
    parts = []
    for text, start, end in iter_fragments(files, invalid, progress, text_column, counts, documents, block_bytes):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []


# A document longer than this many characters is cut into pieces for BPE training and encoding, where the
# byte-level pre-tokenizer splits anyway, so the ids are the same as the whole's: before a space that stands
# between two non-spaces, or after a newline that does. (GPT-2's split pattern: a token holding a non-space
# character has whitespace only as its first character, a leading " "; a run of whitespace is its own
# token; the pattern looks ahead only within whitespace.)
CUT_POINT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
HARD_CUT = 1 << 22  # characters without a cut point (no space or newline): cut there anyway, and counted


def split_piece_chars(text_bytes: int, val_fraction: float) -> int:
    """The piece length for a corpus: small enough that the val split holds about 100 pieces or more
    (so its share is close to val_fraction even for one huge document), at least 2048 and at most 64k
    characters (a piece is one string in the tokenizer, about 200 bytes of its memory per character)."""
    return int(min(max(text_bytes * val_fraction / 100, 2048), 1 << 16))


def iter_pieces(fragments, size: int, counts: dict | None = None):
    """Yield (piece, first of its document, last of it): a document up to 2*size characters whole, a
    longer one in pieces of about `size` cut at CUT_POINT, so encoding the pieces one by one gives the ids
    of the whole. `counts["forced_cuts"]` counts cuts made without a cut point (HARD_CUT characters of
    text without a space or newline between non-spaces)."""
    buf, first = "", True
    for text, start, end in fragments:
        if start and end and len(text) <= 2 * size:
            yield text, True, True
            continue
        buf = buf + text if buf else text
        pos = 0
        while len(buf) - pos > 2 * size:
            m = CUT_POINT.search(buf, pos + size, pos + HARD_CUT)
            if m is not None:
                cut = m.start()
            elif len(buf) - pos > HARD_CUT:
                cut = pos + HARD_CUT
                if counts is not None:
                    counts["forced_cuts"] = counts.get("forced_cuts", 0) + 1
            else:
                break  # no cut point yet: wait for more text, or the document's end
            yield buf[pos:cut], first, False
            first, pos = False, cut
        buf = buf[pos:]
        if end:
            yield buf, first, True
            buf, first = "", True


def scan_corpus(files, on_invalid_utf8: str = "fail", text_column=None, documents="auto") -> dict:
    """One pass before the work: sizes, how each .txt is cut into documents, their count and the longest,
    invalid UTF-8 (fail or replace); for tables the text column of each file and the rows without text."""
    invalid, counts, n_docs, n_text, longest, length = InvalidUTF8(), {}, 0, 0, 0, 0
    modes = {str(f): document_mode(f, documents) for f in files if data_format(f, "text") == "text"}
    n_bytes = sum(data_size(f) for f in files)
    with progress(total=n_bytes, unit="B", unit_scale=True, desc="scan") as bar:
        for text, start, end in iter_fragments(files, invalid, progress=bar, text_column=text_column,
                                               counts=counts, documents=modes):
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            length = size if start else length + size
            n_text += size
            if end:
                n_docs += 1
                longest = max(longest, length)
    if n_docs == 0:
        raise PocketGPTError(f"The corpus {', '.join(map(str, files))} is empty (no text). Point corpus_path at a file "
                             f"with documents separated by blank lines, or with rows of text in a text column.")
    if invalid.count and on_invalid_utf8 == "fail":
        raise PocketGPTError(f"The corpus has {invalid.count} invalid UTF-8 byte(s), first at "
                             f"{'; '.join(invalid.where)}. Fix the file(s), or set "
                             f"on_invalid_utf8='replace' to replace them with U+FFFD.")
    return {"files": [str(f) for f in files], "bytes": n_bytes, "text_bytes": n_text, "documents": n_docs,
            "longest_document_bytes": longest, "document_modes": modes,
            "rows": counts.get("rows", 0), "empty_rows": counts.get("empty_rows", 0),
            "text_columns": counts.get("text_columns", {}),
            "invalid_utf8_bytes": invalid.count, "invalid_utf8_where": invalid.where}


def split_of(document: str, seed: int, val_fraction: float) -> str:
    """'train' or 'val' from a seeded hash of the text: deterministic, disjoint, and streaming.

    Hashing the text (not its position) also puts exact duplicates in the same split, so the
    validation loss never measures memorized training documents. Stage 01 hashes each piece of a
    long document (iter_pieces) on its own, so one huge document still gives a val split.
    """
    return split_of_bytes(document.encode("utf-8", "surrogatepass"), seed, val_fraction)


def split_of_bytes(data: bytes, seed: int, val_fraction: float) -> str:
    h = hashlib.blake2b(data, digest_size=8, key=str(seed).encode())
    return "val" if int.from_bytes(h.digest(), "little") / 2**64 < val_fraction else "train"
