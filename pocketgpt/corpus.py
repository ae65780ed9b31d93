"""A corpus as documents, in every format and of any shape, and in pieces the tokenizer can take whole.

Owns: the corpus's files; the documents of a table (the cells of its text column, found by name); a .txt's
documents (streamed in blocks of lines; by blank lines, lines or the whole file, DOCUMENTS), invalid UTF-8
found by file, line and byte; long documents in pieces cut where the tokenizer splits anyway; the one pass
that measures a corpus before the work (scan_corpus).
Imports: common, data, config (DOCUMENTS, TokenizerConfig's defaults).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from .common import PocketGPTError, progress
from .config import DOCUMENTS, TokenizerConfig  # its defaults are these functions' defaults
from .data import CORPUS_FORMATS, data_files, data_format, data_size, iter_table, open_data, open_table, row_place


# -----------------------------------------------------------------------------
# The corpus's files, and a table's documents

def corpus_files(corpus_path) -> list[Path]:
    """A corpus is a file, a folder or a glob of .txt, .jsonl/.json, .parquet, .csv, .arrow files (any of
    them .gz, .bz2 or .zst) or save_to_disk folders; files in sorted order."""
    if corpus_path is None:
        raise PocketGPTError("corpus_path is not set: pass a corpus file (.txt, .jsonl, .parquet, ...), a folder "
                             "of them or a glob.")
    return data_files(corpus_path, "corpus_path", CORPUS_FORMATS,
                      "Check the path (on Kaggle, attach the dataset holding your corpus).")


TEXT_COLUMNS = ["text", "content", "document", "body", "raw_content", "article", "passage", "markdown"]


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


# -----------------------------------------------------------------------------
# A .txt corpus as documents, of any shape

# How a .txt file is cut into documents (DOCUMENTS, 01's `documents`): "blank_lines" (the text between blank
# lines), "lines" (each line), "whole_file" (the file, as it is), or "auto": blank_lines where the file has a
# blank line between text, else lines (a WikiText dump, a file with no newline at all).
READ_BYTES = 1 << 20  # a .txt is read in blocks of whole lines of about this size (a longer line: in parts)
BLANK_LINE = re.compile(rb"\n[^\S\n]*\n")  # bytes: ASCII whitespace, enough to choose
NON_SPACE = re.compile(rb"\S")
WHITESPACE_LINE = re.compile(r"(?m)^[^\S\n]+$")  # a line of spaces: blank, as an empty one
CR_BEFORE_LF = re.compile(r"\r+\n")


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


def document_mode(file, documents: str = TokenizerConfig.documents) -> str:
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
                   counts: dict | None = None, documents=TokenizerConfig.documents):
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
        yield from text_fragments(file, mode, invalid, progress)


def iter_documents(files, progress=None, text_column=None, documents=TokenizerConfig.documents):
    """Yield whole documents (iter_fragments joined): for tests and tools; the stage reads fragments, so a
    document of any length never has to be one string."""
    parts = []
    for text, start, end in iter_fragments(files, progress=progress, text_column=text_column, documents=documents):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []


# -----------------------------------------------------------------------------
# Long documents in pieces, and the pass that measures a corpus

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


def scan_corpus(files, on_invalid_utf8: str = TokenizerConfig.on_invalid_utf8, text_column=None,
                documents=TokenizerConfig.documents) -> dict:
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