"""Data as it comes: a file's format, the files a parameter names, tables read strictly, the seeded split.

Owns: a path's format by its extension (.txt, .jsonl/.json, .parquet, .csv, .arrow; .gz/.bz2/.zst included; a
save_to_disk folder), its size and fingerprint; the files a path, folder or glob names, and the one attached
on Kaggle; reading a table: JSON Lines, Parquet, Arrow and save_to_disk folders streamed through `datasets`,
CSV through Python's csv module (`,` `;` or tab, UTF-8 or UTF-16, checked strictly first); where a row is,
said as the user finds it; the seeded train/val split.
Imports: common.
"""
from __future__ import annotations

import bisect
import codecs
import csv
import functools
import glob
import hashlib
import io
import json
from contextlib import contextmanager
from pathlib import Path

from .common import PocketGPTError, kaggle_root

# -----------------------------------------------------------------------------
# A path's format, size and fingerprint

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst")
DIALOG_FORMATS = ("csv", "json", "parquet", "arrow", "saved")  # dialogs and preference pairs: tables
CORPUS_FORMATS = ("text", "json", "parquet", "csv", "arrow", "saved")


def data_format(path, default: str | None = None) -> str | None:
    """How a path is read: by its extension under any .gz/.bz2/.zst (text, json, parquet, csv, arrow);
    'saved' for a folder written by `datasets`' save_to_disk; else `default`."""
    p = Path(path)
    if p.is_dir():
        return "saved" if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() else default
    suffixes = [s.lower() for s in p.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return FORMATS.get(suffixes[-1] if suffixes else "", default)


def data_size(path) -> int:
    """Bytes on disk: a file's size, or the size of a save_to_disk folder's .arrow files."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*.arrow")) if p.is_dir() else p.stat().st_size


def fingerprint(path) -> str:
    """sha256 of a file, or of a save_to_disk folder's state.json files (which hold the fingerprints `datasets`
    gives its data). A stage folder is fingerprinted by its manifest: stages.input_fingerprint."""
    path = Path(path)
    parts = sorted(path.rglob("state.json")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# The files a parameter names

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


def attached_input(name: str, param: str, formats=None) -> Path:
    """The one input called `name` attached under /kaggle/input, for a parameter left None. With `formats`,
    `name` is a stem: corpus.txt, corpus.jsonl.gz, corpus.parquet or a save_to_disk folder `corpus` all count.

    Several matches (two datasets each with a corpus.txt, say) are not concatenated in silence:
    the user says which with `param`."""
    root = kaggle_root() / "input"
    pattern = f"{name}*" if formats else name
    found = sorted(Path(f) for f in glob.glob(str(root / "**" / pattern), recursive=True)
                   if (not formats and Path(f).is_file()) or (formats and data_format(f) in formats
                       and Path(f).name.split(".")[0] == name and (Path(f).is_file() or data_format(f) == "saved")))
    label = f"{name}.txt, {name}.jsonl, {name}.parquet, ... or a saved folder {name}" if formats else name
    if not found:
        raise PocketGPTError(f"{param}=None and no {label} is attached under {root}: attach the dataset holding "
                             f"it, or set {param} to your file.")
    if len(found) > 1:
        raise PocketGPTError(f"{param}=None and {len(found)} files named {' / '.join(sorted({f.name for f in found}))} "
                             f"are attached: {files_summary(found)}. "
                             f"Set {param} to the one to use (or to a glob, to use them all).")
    return found[0]


def files_summary(files) -> str:
    """'a.txt (1.2 MB), b.txt (0.3 MB)': what was found and used, printed before the work."""
    files = list(files)
    shown = ", ".join(f"{f} ({data_size(f) / 1e6:.1f} MB)" for f in files[:10])
    return shown + (f" and {len(files) - 10} more" if len(files) > 10 else "")


# -----------------------------------------------------------------------------
# Tables, read as they stream: datasets for JSON Lines, Parquet, Arrow, saved folders; csv for CSV

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


# -----------------------------------------------------------------------------
# The seeded train/val split

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
