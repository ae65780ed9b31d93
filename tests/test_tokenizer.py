"""Stage 1: the tokenizer round-trips text, keeps its special tokens, and encodes the corpus losslessly."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.common import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from pocketgpt.corpus import iter_documents
from pocketgpt.data import split_of
from pocketgpt.stages import stage_output
from pocketgpt.tokenizer import decode_documents, document_ids, read_bin

TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά",
    "emoji 🤗🚀 and 👩‍👩‍👧 family",
    "def f(x):\n    return x ** 2  # square\n\tindented with a tab",
    "   three leading spaces, and trailing   ",
    "lines\n\n\nwith blank lines\r\nand CRLF",
    "<|bos|>Instruction: what is a tensor?\nResponse: an array<|eos|>",
    "\x00control\x07chars and \u200bzero width",
]


@pytest.fixture(scope="module")
def tok(tokenizer_stage):
    return pg.load_tokenizer(tokenizer_stage)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trips_text_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_ids_0_to_3_and_are_never_split(tok):
    assert tok.convert_tokens_to_ids(["<pad>", "<unk>", "<|bos|>", "<|eos|>"]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special) == [i]
        ids = tok.encode(f"text{special}more text")
        assert ids.count(i) == 1
    assert tok.decode(tok.encode("<|bos|>hi<|eos|>"), skip_special_tokens=True) == "hi"


def test_saved_folder_loads_offline_in_a_fresh_process(tokenizer_stage):
    code = ("import os, sys; from transformers import GPT2TokenizerFast; "
            "t = GPT2TokenizerFast.from_pretrained(sys.argv[1]); "
            "print(t.eos_token_id, t.pad_token_id, t.bos_token_id, len(t), t.decode(t.encode('a b'), skip_special_tokens=True))")
    out = subprocess.run([sys.executable, "-c", code, str(tokenizer_stage)], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout.split()
    assert out[:4] == ["3", "0", "2", str(TINY["vocab_size"])]
    assert out[4:] == ["a", "b"]
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
        assert (tokenizer_stage / name).is_file(), name


def test_bins_decode_back_to_exactly_the_corpus_documents(tokenizer_stage, demo_data, tok):
    docs = list(iter_documents([demo_data / "corpus.txt"]))
    assert [tok.decode(ids) for ids in document_ids(tokenizer_stage)] == docs  # in order, pieces and all
    train = decode_documents(np.asarray(read_bin(tokenizer_stage / "train.bin")), tok)
    val = decode_documents(np.asarray(read_bin(tokenizer_stage / "val.bin")), tok)
    assert val and train
    whole = set(train) & set(docs), set(val) & set(docs)  # documents that went to one side whole
    assert not whole[0] & whole[1]  # disjoint
    meta = pg.read_json(tokenizer_stage / "meta.json")
    assert meta["train_tokens"] == len(read_bin(tokenizer_stage / "train.bin"))
    assert meta["vocab_size"] == TINY["vocab_size"] and meta["dtype"] == "uint16"


def test_split_is_deterministic_and_depends_on_the_seed(demo_data):
    docs = list(iter_documents([demo_data / "corpus.txt"]))
    a = [split_of(d, 1337, 0.2) for d in docs]
    assert a == [split_of(d, 1337, 0.2) for d in docs]
    assert a != [split_of(d, 7, 0.2) for d in docs]
    assert 0.1 < a.count("val") / len(a) < 0.3


def test_manifest_and_metrics_say_what_made_the_folder(tokenizer_stage):
    m = pg.read_json(tokenizer_stage / "manifest.json")
    assert m["stage"] == "tokenizer" and m["finished_at"]
    assert m["params"]["vocab_size"] == TINY["vocab_size"]
    assert set(m["files"]) >= {"train.bin", "val.bin", "meta.json", "metrics.json", "tokenizer.json"}
    assert "torch" in m["versions"] and "corpus" in m["inputs"]
    metrics = pg.read_json(tokenizer_stage / "metrics.json")
    assert 1.5 < metrics["val_bytes_per_token"] < 8.0  # 512 merges already beat 1 byte/token
    assert not Path(str(tokenizer_stage) + ".partial").exists()


def test_demo_data_is_deterministic(tmp_path):
    for name in ["a", "b"]:
        subprocess.run([sys.executable, str(Path(pg.__file__)), "demo-data", "--out", str(tmp_path / name),
                        "--max-bytes", "60000", "--max-dialogs", "50"], check=True, capture_output=True)
    for f in ["corpus.txt", "dialogs.csv"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert 50_000 < (tmp_path / "a" / "corpus.txt").stat().st_size <= 60_000


# --- bad input: each gets a clear error naming the file or parameter ---------------------------

def tokenizer_cfg(tmp_path, corpus, **kw):
    return pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path), corpus_path=str(corpus), **kw)


def test_missing_corpus_path_is_named(tmp_path):
    with pytest.raises(pg.PocketGPTError, match="corpus_path=.*nope.txt.*no such file"):
        pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, tmp_path / "nope.txt"))


def test_empty_corpus_is_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(pg.PocketGPTError, match="empty.txt is empty"):
        pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, tmp_path / "empty.txt"))
    assert not (tmp_path / "tokenizer").exists()


def test_invalid_utf8_is_counted_and_located_or_replaced(tmp_path, demo_data):
    corpus = tmp_path / "bad.txt"
    good = (demo_data / "corpus.txt").read_bytes()[:40_000]
    corpus.write_bytes(b"first line\nsecond \xff\xfe line\n\n" + good + b"\n\nend \xc3\n")
    with pytest.raises(pg.PocketGPTError, match=r"3 invalid UTF-8 byte\(s\), first at .*bad.txt:2 \(byte 18\).*on_invalid_utf8='replace'"):
        pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, corpus, vocab_size=300, val_fraction=0.2))
    out = pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, corpus, vocab_size=300, val_fraction=0.2,
                                                 on_invalid_utf8="replace"))
    assert pg.read_json(out / "meta.json")["invalid_utf8_bytes"] == 3


def test_vocab_size_too_small_names_the_parameter(tmp_path, demo_data):
    with pytest.raises(pg.PocketGPTError, match="vocab_size=100.*260"):
        tokenizer_cfg(tmp_path, demo_data / "corpus.txt", vocab_size=100)


def test_unwritable_output_folder_fails_before_work(tmp_path, demo_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(pg.PocketGPTError, match="Cannot write the output folder .*a_file/tok.*out_dir"):
        pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, demo_data / "corpus.txt", out_dir=str(blocker / "tok")))


def test_a_crash_leaves_no_finished_looking_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with stage_output(tmp_path / "tokenizer", "tokenizer", {}) as work:
            (work / "train.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not (tmp_path / "tokenizer").exists()
    with pytest.raises(pg.PocketGPTError, match="No finished 'tokenizer' stage"):
        pg.find_stage("tokenizer", run_dir=tmp_path)


def test_special_token_text_in_the_corpus_stays_text(tmp_path):
    """ML documentation quotes "<pad>" and "<|eos|>": such text must never become a control token
    (it would split the document, and skip_special_tokens would delete it)."""
    quoting = ["Pad with <pad> and end with <|eos|>; a document starts with <|bos|>.",
               "The <unk> token marks unknown words.\n  indented <|eos|><pad> line"]
    docs = [f"{quoting[i % 2]} Document {i} about tensors, layers and {i * 7} gradients." for i in range(300)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    out = pg.build_tokenizer_stage(tokenizer_cfg(tmp_path, tmp_path / "c.txt", vocab_size=300, val_fraction=0.2))
    tok = pg.load_tokenizer(out)
    decoded = []
    for split in ["train", "val"]:
        ids = np.asarray(read_bin(out / f"{split}.bin"))
        n_docs = pg.read_json(out / "meta.json")[f"{split}_documents"]
        assert (ids == BOS_ID).sum() == (ids == EOS_ID).sum() == n_docs  # one of each per document
        assert not np.isin(ids, [PAD_ID, UNK_ID]).any()
        decoded += decode_documents(ids, tok)
    assert Counter(decoded) == Counter(docs)
