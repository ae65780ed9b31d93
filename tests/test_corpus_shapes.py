"""Stage 01 on a corpus as files really come: blank lines, one document a line, CRLF, no newline at all, one
JSON Lines row of megabytes. Each gives back every character, a val split of about val_fraction of the
tokens, and flat memory (a fresh process's peak RSS); long documents are encoded in pieces with exactly
the ids of the whole."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import pocketgpt_utils as pg
from pocketgpt.corpus import iter_documents
from pocketgpt.tokenizer import encode_text

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tools"))
import bench_corpus  # noqa: E402  (builds the shapes, and runs the stage in a fresh process)

VAL_FRACTION = 0.02
# A fresh process running the whole stage on 3 MB (its VmHWM): 0.15 GB here for a .txt of any shape, 0.45 GB
# for the JSON Lines row (datasets and pyarrow loaded). The code before pieces read a file without blank lines
# as one document: 0.87 GB (one line a document), 0.90 GB (no newline), 1.16 GB (the JSONL row) for 3 MB.
PEAK_RSS_MB = 650


@pytest.fixture(scope="module")
def texts(demo_data):
    return list(iter_documents([demo_data / "corpus.txt"]))


@pytest.fixture(scope="module")
def tok(tokenizer_stage):
    return pg.load_tokenizer(tokenizer_stage)


def expected_documents(path: Path, shape: str) -> list[str]:
    """The documents the file holds, by its shape, read without the stage's reader."""
    raw = path.read_text(encoding="utf-8") if shape != "crlf" else path.read_bytes().decode().replace("\r\n", "\n")
    if shape == "jsonl_row":
        return [json.loads(raw)["text"]]
    if shape in ("blank_lines", "crlf"):
        return [d for d in raw.strip("\n").split("\n\n")]
    return [line for line in raw.split("\n") if line]


@pytest.mark.parametrize("shape", bench_corpus.SHAPES)
def test_every_shape_gives_back_every_character_a_val_split_and_flat_memory(tmp_path, texts, shape):
    corpus = bench_corpus.corpus_path(tmp_path, texts, shape, 3)
    out = subprocess.run([sys.executable, str(HERE / "tools" / "bench_corpus.py"), "stage", str(corpus),
                          str(tmp_path / "run"), "-p", "profile", "demo", "-p", "vocab_size", "512",
                          "-p", "val_fraction", str(VAL_FRACTION)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["peak_rss_mb"] < PEAK_RSS_MB, m
    assert "error" not in m, m["error"]
    assert VAL_FRACTION / 2 <= m["val_share"] <= 2 * VAL_FRACTION, m["val_share"]
    from pocketgpt.tokenizer import document_ids
    stage = tmp_path / "run" / "tokenizer"
    tok = pg.load_tokenizer(stage)
    decoded = [tok.decode(ids) for ids in document_ids(stage)]
    docs = expected_documents(corpus, shape)
    assert len(decoded) == len(docs) == m["documents"]
    assert decoded == docs  # every character, in order
    meta = pg.read_json(stage / "meta.json")
    assert meta["forced_cuts"] == 0
    if len(docs) == 1:  # one huge document: its pieces fell on both sides
        assert meta["val_pieces"] > 10 and meta["train_pieces"] > 10


SNIPPETS = ["word", " ", "  ", "   ", "\n", "\n\n", "\t", "é", "日本語", "🤗", "123", "4.5", ".", ",", "!?", "'s", " 's",
            "'re", "-", "\u2028", "\xa0", "\u3000", "<|eos|>", "x", "\r\n", "  \n  ", "(copy 3)"]


def test_pieces_encode_to_exactly_the_ids_of_the_whole(tok, texts):
    """Cut where the byte-level pre-tokenizer splits anyway (before a space between two non-spaces, after a
    newline between two), pieces encoded one by one give the whole's ids: unicode, digits, punctuation,
    newlines, runs of spaces, quoted special tokens."""
    from pocketgpt.corpus import iter_pieces
    rng = random.Random(29)
    for trial in range(60):
        text = "".join(rng.choice(SNIPPETS + [rng.choice(texts)[:300]]) for _ in range(rng.randint(50, 300)))
        whole = encode_text(tok, [text])[0]
        for size in (3, 16, 100):
            pieces = list(iter_pieces([(text, True, True)], size))
            assert "".join(p for p, _, _ in pieces) == text
            assert [(f, last) for _, f, last in pieces] == [(i == 0, i == len(pieces) - 1) for i in range(len(pieces))]
            if len(text) > 2 * size:
                assert len(pieces) > 1
            assert [i for p, _, _ in pieces for i in encode_text(tok, [p])[0]] == whole, (trial, size)


def cfg(tmp_path, corpus, **kw):
    return pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path), corpus_path=str(corpus),
                          vocab_size=300, **kw)


def test_the_first_lines_say_how_documents_were_found_the_sample_and_the_split(tmp_path, texts, capsys):
    corpus = bench_corpus.corpus_path(tmp_path, texts, "lines", 2)
    out = pg.build_tokenizer_stage(cfg(tmp_path, corpus, bpe_sample_bytes=1_000_000, val_fraction=0.05))
    said = capsys.readouterr().out
    assert "documents (each line) (documents=auto: no blank line between text), the longest" in said
    assert "an even sample of 1.0 MB of the 2.0 MB (bpe_sample_bytes=1,000,000)" in said
    assert "goes to val by a seeded hash of its text" in said and "% of the tokens in val" in said
    meta = pg.read_json(out / "meta.json")
    assert meta["bpe_sample_bytes"] == 1_000_000 and meta["document_modes"] == {str(corpus): "lines"}
    pg.build_tokenizer_stage(cfg(tmp_path, corpus, documents="whole_file", out_dir=str(tmp_path / "whole")))
    assert "1 document (the whole file)" in capsys.readouterr().out


def test_documents_parameter_is_checked():
    with pytest.raises(pg.PocketGPTError, match="documents='paragraphs'.*auto, blank_lines, lines, whole_file"):
        pg.make_config(pg.TokenizerConfig, "demo", documents="paragraphs")


def test_a_corpus_too_small_to_split_says_what_it_found(tmp_path):
    (tmp_path / "tiny.txt").write_text("One short document about tensors.\n\nAnother, about gradients.\n")
    with pytest.raises(pg.PocketGPTError, match=r"too small to split: it holds 2 document\(s\), \d+ tokens in 2 "
                                                r"piece\(s\), and no piece fell in val at val_fraction=0.01"):
        pg.build_tokenizer_stage(cfg(tmp_path, tmp_path / "tiny.txt"))
    assert not (tmp_path / "tokenizer").exists()


def test_encoding_batches_hold_about_a_megabyte_of_text_whatever_the_pieces():
    """The tokenizer holds several bytes per character of a batch: a batch of 8192 pieces of 20k characters
    (one 200 MB line) took 1.9 GB when batches were counted in pieces instead of characters."""
    from pocketgpt.tokenizer import batched
    pieces = (("x" * 20_000, i == 0, False) for i in range(500))
    sizes = [sum(len(p[0]) for p in b) for b in batched(pieces, max_chars=1 << 20, max_texts=8192, text=lambda p: p[0])]
    assert len(sizes) == 10 and max(sizes) < (1 << 20) + 20_000
