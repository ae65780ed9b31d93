"""Stage 1: a byte-level BPE trained with `tokenizers`, wrapped as GPT2TokenizerFast; the corpus as ids.

Owns: training (on an even sample), saving and loading the tokenizer; encoding user text (special-token strings
stay text); train.bin / val.bin (uint16, each document <|bos|> ... <|eos|>, a long one's pieces hashed to either
side) and doc_stats.npz (a row per piece), streamed; build_tokenizer_stage, the whole of 01.
Imports: common, files, data, config, corpus, demo, stages.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from transformers import GPT2TokenizerFast

from .common import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKEN_ROLES,
    UNK_ID,
    PocketGPTError,
    human_bytes,
    on_kaggle,
    progress,
    quiet_library_bars,
    read_json,
)
from .config import TokenizerConfig
from .corpus import corpus_files, iter_fragments, iter_pieces, scan_corpus, split_piece_chars
from .data import CORPUS_FORMATS, attached_input, files_summary
from .demo import demo_data
from .files import space_for, write_file, write_json
from .stages import StageDir, stage_output


def train_tokenizer(texts, vocab_size: int, n_texts: int | None = None):
    """Train a byte-level BPE on an iterator of texts (streamed in batches, never all in memory).

    ByteLevel with add_prefix_space=False and a ByteLevel decoder round-trips any text exactly;
    the 256 byte symbols are in the initial alphabet, so no text ever needs <unk>. The trainer counts
    pre-tokenized words, so pieces of a document cut where the pre-tokenizer splits (data.iter_pieces)
    teach it exactly what the whole would.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(batched(texts), trainer=trainer, length=n_texts)
    return tok


def batched(items, max_chars: int = 1 << 20, max_texts: int = 4096, text=lambda item: item):
    """Lists of items (texts, or what `text` finds the text in) of about max_chars characters of text, or
    max_texts items, each: the tokenizer holds about 200 bytes per character of a batch while it works."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(text(item))
        if chars >= max_chars or len(batch) >= max_texts:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def even_sample(pieces, total_bytes: int, sample_bytes: int):
    """The pieces' texts, or where the corpus is larger than sample_bytes an even sample of about that many
    bytes: a piece is taken while the bytes taken stay under sample_bytes/total_bytes of the bytes seen."""
    share, seen, taken = sample_bytes / max(total_bytes, 1), 0, 0
    for text, _, _ in pieces:
        n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        seen += n
        if taken < share * seen:
            taken += n
            yield text


def wrap_tokenizer(tok, model_max_length: int = 1024):
    """The transformers face of the tokenizer: GPT2TokenizerFast with the four special tokens set."""
    return GPT2TokenizerFast(tokenizer_object=tok, **TOKEN_ROLES, add_prefix_space=False,
                             model_max_length=model_max_length)


def save_tokenizer(hf_tok, out_dir) -> None:
    """save_pretrained, plus vocab.json/merges.txt (transformers 5 writes only tokenizer.json)."""
    out_dir = Path(out_dir)
    with space_for(out_dir / "tokenizer.json", needed=2 * len(hf_tok.backend_tokenizer.to_str())):  # and vocab, merges
        hf_tok.save_pretrained(out_dir)
        hf_tok.backend_tokenizer.model.save(str(out_dir))


def encode_text(tok, texts) -> list[list[int]]:
    """Token ids of user text (documents, prompts, answers), special-token strings kept as text.

    ML documentation quotes "<pad>" and "<|eos|>"; read as control tokens they would split a
    document, end an answer early and vanish under skip_special_tokens. Only the code inserts
    <|bos|>, <|eos|> and <pad>, as ids. (The seed's own prompt, `tok.encode("<|bos|>Instruction:
    ...")`, still parses its <|bos|>: the exported tokenizer is unchanged.)"""
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def load_tokenizer(folder):
    """Load a saved tokenizer, with an error that names the folder when it is missing or corrupt."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise PocketGPTError(f"{folder} holds no tokenizer.json: point tokenizer_dir at the folder the "
                             f"01_tokenizer notebook wrote, or run that notebook again.")
    try:
        tok = GPT2TokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # a truncated or hand-edited file fails deep inside the library
        raise PocketGPTError(f"The tokenizer in {folder} cannot be loaded ({type(e).__name__}: {e}). "
                             f"Run the 01_tokenizer notebook again to rebuild it.") from None
    if tok.convert_tokens_to_ids(SPECIAL_TOKENS) != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:
        raise PocketGPTError(f"The tokenizer in {folder} does not have {SPECIAL_TOKENS} at ids 0-3: "
                             f"it was not made by pocketGPT's 01_tokenizer notebook.")
    return tok


def fast_encoder(hf_tok):
    """encode_text's ids from the Rust tokenizer itself: a copy with special-token strings encoded as text,
    without the offsets and Python objects of transformers' BatchEncoding (the encode phase's cost)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.encode_special_tokens = True  # "<|eos|>" in the text stays text, as split_special_tokens=True
    backend.no_truncation()
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def encoded(encode, batches):
    """(batch, its ids) for batches of pieces, the next batch encoded (in Rust, without the GIL) while this
    one's ids are written and the one after is read: the Python work overlaps the tokenizer's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, [text for text, _, _ in batch])
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


STAT_COLUMNS = {"val": "u1", "first": "u1", "last": "u1", "bytes": "u4", "tokens": "u4"}  # doc_stats.npz, a piece a row


def encode_corpus(pieces, hf_tok, out_dir, seed: int, val_fraction: float, total_bytes: int) -> dict:
    """Encode the corpus's pieces (text, first of its document, last of it) into uint16 train.bin / val.bin.

    Each piece goes to train or val by a seeded hash of its text (data.split_of_bytes): a document that is
    one piece as a whole, a long one piece by piece, so its blocks can fall on both sides. A document's
    first piece is preceded by <|bos|>, its last followed by <|eos|>, in the file each falls in: never
    between pieces. Ids and the per-piece statistics (doc_stats.npz: val, first, last, bytes, tokens) go
    to disk batch by batch, so memory stays flat for any corpus size and shape.
    """
    out_dir = StageDir(out_dir)
    encode = fast_encoder(hf_tok)
    stats = {s: {"pieces": 0, "docs": 0, "tokens": 0, "special": 0, "bytes": 0, "words": 0, "chars": 0}
             for s in ("train", "val")}
    started = time.time()
    columns = {k: open(stat_column(out_dir, k), "wb") for k in STAT_COLUMNS}  # inside the stage's .partial
    # ids are 2 bytes and a token is about 4 bytes of text: about half the corpus's size on disk
    with space_for(out_dir.train_bin, needed=total_bytes // 2), open(out_dir.train_bin, "wb") as train, \
            open(out_dir.val_bin, "wb") as val:
        outs = {"train": train, "val": val}
        for batch, ids_of in encoded(encode, batched(pieces, max_chars=1 << 20, max_texts=8192, text=lambda p: p[0])):
            ids, col = split_batch(batch, ids_of, seed, val_fraction, stats)
            for s, a in ids.items():
                outs[s].write(a.tobytes())
            for k, a in col.items():
                columns[k].write(a.tobytes())
    for f in columns.values():
        f.close()
    seconds = time.time() - started
    t, v = stats["train"], stats["val"]
    if v["tokens"] == 0 or t["tokens"] == 0:
        empty = "val" if v["tokens"] == 0 else "train"
        raise PocketGPTError(f"The corpus is too small to split: it holds {t['docs'] + v['docs']:,} document(s), "
                             f"{t['tokens'] + v['tokens']:,} tokens in {t['pieces'] + v['pieces']:,} piece(s), and no "
                             f"piece fell in {empty} at val_fraction={val_fraction}. Give a larger corpus, or a "
                             f"val_fraction closer to 0.5 for a few pieces in val.")
    save_doc_stats(out_dir)
    text_tokens = v["tokens"] - v["special"]
    return {
        "train_tokens": t["tokens"], "val_tokens": v["tokens"],
        "train_documents": t["docs"], "val_documents": v["docs"],  # documents by where their first piece fell
        "train_pieces": t["pieces"], "val_pieces": v["pieces"],
        "val_token_share": v["tokens"] / (t["tokens"] + v["tokens"]),
        "val_bytes_per_token": v["bytes"] / max(text_tokens, 1),
        "val_chars_per_token": v["chars"] / max(text_tokens, 1),
        "val_tokens_per_word": text_tokens / max(v["words"], 1),
        "val_bytes": v["bytes"],
        "encode_seconds": seconds, "encode_mb_per_s": total_bytes / 1e6 / max(seconds, 1e-9),
    }


def stat_column(out_dir: StageDir, column: str) -> Path:
    """Where encode_corpus streams one per-piece column before save_doc_stats gathers them: beside doc_stats.npz."""
    return out_dir.doc_stats.with_suffix(f".{column}.tmp")


def split_batch(batch, ids_of, seed: int, val_fraction: float, stats: dict) -> tuple[dict, dict]:
    """A batch of encoded pieces sorted into train and val: each side's ids (a document's first piece after
    <|bos|>, its last before <|eos|>) and the pieces' doc_stats rows; `stats` counts them per side."""
    from array import array

    from .data import split_of_bytes

    ids = {"train": array("H"), "val": array("H")}
    col = {k: array("B" if t == "u1" else "I") for k, t in STAT_COLUMNS.items()}
    for (text, first, last), piece_ids in zip(batch, ids_of):
        data = text.encode("utf-8", "surrogatepass")
        s = split_of_bytes(data, seed, val_fraction)
        out, st = ids[s], stats[s]
        if first:
            out.append(BOS_ID)
        out.extend(piece_ids)
        if last:
            out.append(EOS_ID)
        n = len(piece_ids) + first + last
        st["pieces"] += 1; st["docs"] += first; st["tokens"] += n; st["special"] += first + last
        st["bytes"] += len(data)
        if s == "val":
            st["words"] += len(text.split()); st["chars"] += len(text)
        for k, v in (("val", s == "val"), ("first", first), ("last", last), ("bytes", len(data)), ("tokens", n)):
            col[k].append(v)
    return ids, col


def save_doc_stats(out_dir) -> None:
    """doc_stats.npz from the per-piece columns encode_corpus streamed to disk (written in chunks from
    memory maps, so never all in memory); the column files are removed."""
    out_dir = StageDir(out_dir)
    tmp = {k: stat_column(out_dir, k) for k in STAT_COLUMNS}
    arrays = {k: np.memmap(p, dtype=STAT_COLUMNS[k], mode="r") if p.stat().st_size else np.zeros(0, STAT_COLUMNS[k])
              for k, p in tmp.items()}

    def save(path):
        with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)
    write_file(out_dir.doc_stats, save)
    arrays.clear()  # the memmaps let go of the column files before they are deleted
    for p in tmp.values():
        p.unlink()


def document_lengths(stage_dir) -> dict:
    """Per document: its bytes and tokens (<|bos|>/<|eos|> included), summed over its pieces."""
    d = np.load(StageDir(stage_dir).doc_stats)
    starts = np.flatnonzero(d["first"])
    return {k: np.add.reduceat(d[k].astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
            for k in ("bytes", "tokens")}


MODE_WORDS = {"blank_lines": "the text between blank lines", "lines": "each line",
              "whole_file": "the whole file"}


def corpus_lines(scan: dict, files, cfg: TokenizerConfig, piece: int) -> list[str]:
    """What the stage found and what it will do, said before the work: how documents were found, how many,
    the longest; the pieces; the BPE's sample; how the split is made."""
    columns = sorted(set(scan["text_columns"].values()))
    found = sorted(set(scan["document_modes"].values()))
    how = "; ".join(f"{'a .txt: ' if columns else ''}{MODE_WORDS[m]}" for m in found)
    if columns:
        how = (how + "; " if how else "") + f"a row of the column {', '.join(columns)}"
    auto = " (documents=auto" + (": no blank line between text)" if "lines" in found else ": blank lines found)") \
        if cfg.documents == "auto" and found else ""
    sample = min(cfg.bpe_sample_bytes, scan["text_bytes"])
    return [
        f"corpus: {len(files)} file(s), {scan['bytes'] / 1e6:.1f} MB, {scan['documents']:,} "
        f"document{'s' * (scan['documents'] != 1)} ({how}){auto}, "
        f"the longest {human_bytes(scan['longest_document_bytes'])}"
        + (f"; {scan['rows']:,} rows" if columns else "")
        + (f" ({scan['empty_rows']:,} rows without text skipped)" if scan["empty_rows"] else "")
        + (f", {scan['invalid_utf8_bytes']} invalid UTF-8 bytes replaced" if scan["invalid_utf8_bytes"] else ""),
        f"pieces: a document longer than {2 * piece:,} characters is trained on and encoded in pieces of about "
        f"{piece:,}, cut where the tokenizer splits anyway (the same ids as the whole; no <|bos|>/<|eos|> between)",
        "BPE: learns from " + (f"the whole text ({human_bytes(scan['text_bytes'])})" if sample >= scan["text_bytes"] else
                                f"an even sample of {human_bytes(sample)} of the {human_bytes(scan['text_bytes'])} "
                                f"(bpe_sample_bytes={cfg.bpe_sample_bytes:,}); then the whole corpus is encoded"),
        f"split: each document, or each piece of a long one, goes to val by a seeded hash of its text "
        f"(seed={cfg.seed}, val_fraction={cfg.val_fraction}): exact duplicates fall on one side",
    ]


@quiet_library_bars()
def build_tokenizer_stage(cfg: TokenizerConfig) -> Path:
    """Stage 1, whole: scan, train the BPE on a sample, save it, encode the splits, write meta and manifest."""
    if cfg.corpus_path is None and on_kaggle():  # the attached corpus.txt (.jsonl, .parquet, ...), wherever it is mounted
        cfg.corpus_path = str(attached_input("corpus", "corpus_path", CORPUS_FORMATS))
    elif cfg.corpus_path is None:
        cfg.corpus_path = str(demo_data(cfg.run_dir, "corpus"))
    files = corpus_files(cfg.corpus_path)
    print(f"corpus_path={cfg.corpus_path}: {files_summary(files)}")
    started = time.time()
    scan = scan_corpus(files, cfg.on_invalid_utf8, cfg.text_column, cfg.documents)
    scan_seconds = time.time() - started
    piece = split_piece_chars(scan["text_bytes"], cfg.val_fraction)
    for line in corpus_lines(scan, files, cfg, piece):
        print(line)

    def pieces(bar, counts=None):
        fragments = iter_fragments(files, progress=bar, text_column=cfg.text_column, documents=scan["document_modes"])
        return iter_pieces(fragments, piece, counts)

    inputs = {f"corpus:{f.name}" if len(files) > 1 else "corpus": f for f in files}
    with stage_output(cfg.out_dir, "tokenizer", dataclasses.asdict(cfg), inputs) as work:
        started = time.time()
        with progress(total=scan["bytes"], unit="B", unit_scale=True, desc="train BPE") as bar:  # counting pairs
            tok = train_tokenizer(even_sample(pieces(bar), scan["text_bytes"], cfg.bpe_sample_bytes), cfg.vocab_size)
        train_seconds = time.time() - started
        print(f"trained a {tok.get_vocab_size():,}-token BPE in {train_seconds:.1f}s")
        hf_tok = wrap_tokenizer(tok)
        save_tokenizer(hf_tok, work)
        counts = {}
        with progress(total=scan["bytes"], unit="B", unit_scale=True, desc="encode") as bar:
            enc = encode_corpus(pieces(bar, counts), hf_tok, work, cfg.seed, cfg.val_fraction, scan["text_bytes"])
        print(f"split: {enc['val_token_share']:.2%} of the tokens in val ({enc['val_pieces']:,} of "
              f"{enc['train_pieces'] + enc['val_pieces']:,} pieces; val_fraction={cfg.val_fraction})")
        meta = {"vocab_size": tok.get_vocab_size(), "dtype": "uint16",
                "special_tokens": dict(zip(SPECIAL_TOKENS, range(4))),
                "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
                "corpus_bytes": scan["bytes"], "text_bytes": scan["text_bytes"], "documents": scan["documents"],
                "document_modes": scan["document_modes"], "longest_document_bytes": scan["longest_document_bytes"],
                "piece_chars": piece, "forced_cuts": counts.get("forced_cuts", 0),
                "bpe_sample_bytes": min(cfg.bpe_sample_bytes, scan["text_bytes"]),
                "text_columns": scan["text_columns"], "empty_rows": scan["empty_rows"],
                "invalid_utf8_bytes": scan["invalid_utf8_bytes"], **enc}
        write_json(work.meta, meta)
        write_json(work.metrics, {"scan_seconds": scan_seconds, "train_seconds": train_seconds,
                                          "train_mb_per_s": scan["bytes"] / 1e6 / train_seconds, **meta})
    return Path(cfg.out_dir)


def compression_table(stage_dir) -> list[dict]:
    """Rows for the notebook's table: how well the tokenizer compresses held-out text."""
    m = read_json(StageDir(stage_dir).meta)
    return [
        {"measure": "bytes per token (val)", "value": f"{m['val_bytes_per_token']:.3f}"},
        {"measure": "characters per token (val)", "value": f"{m['val_chars_per_token']:.3f}"},
        {"measure": "tokens per word (val)", "value": f"{m['val_tokens_per_word']:.3f}"},
        {"measure": "train tokens", "value": f"{m['train_tokens']:,}"},
        {"measure": "val tokens", "value": f"{m['val_tokens']:,}"},
        {"measure": "vocab size", "value": f"{m['vocab_size']:,}"},
    ]


def sample_tokenizations(tok, texts) -> list[dict]:
    """How some ML terms split into tokens: a quick look at what the BPE learned."""
    rows = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        rows.append({"text": text, "n_tokens": len(ids), "tokens": " | ".join(repr(tok.decode([i]))[1:-1] for i in ids)})
    return rows


def read_bin(path) -> np.memmap:
    """Memory-map a uint16 token file (train.bin/val.bin) without reading it."""
    return np.memmap(path, dtype=np.uint16, mode="r")


def decode_documents(ids: np.ndarray, tok) -> list[str]:
    """Split a token stream at <|bos|> and decode each document from there (a piece of a long document
    that fell on the other side may end it without its <|eos|>, or stand before the first <|bos|>)."""
    starts = np.flatnonzero(ids == BOS_ID)
    ends = list(starts[1:]) + [len(ids)]
    return [tok.decode(ids[s + 1:e - int(ids[e - 1] == EOS_ID)].tolist()) for s, e in zip(starts, ends)]


def document_ids(stage_dir):
    """Each document's ids in corpus order, put back together from train.bin and val.bin by doc_stats.npz
    (a long document's pieces may lie on both sides), <|bos|> and <|eos|> checked and left off: the check
    that encoding lost nothing. Reads the statistics whole: for tests and tools."""
    stage_dir = StageDir(stage_dir)
    d = np.load(stage_dir.doc_stats)
    streams = [read_bin(stage_dir.train_bin), read_bin(stage_dir.val_bin)]
    at, ids = [0, 0], []
    for val, first, last, n in zip(d["val"].tolist(), d["first"].tolist(), d["last"].tolist(), d["tokens"].tolist()):
        piece = streams[val][at[val]:at[val] + n]
        at[val] += n
        if first != (len(piece) > 0 and piece[0] == BOS_ID) or last != (len(piece) > 0 and piece[-1] == EOS_ID):
            raise ValueError(f"a piece's <|bos|>/<|eos|> do not match {stage_dir.doc_stats.name} at {at}")
        ids.append(piece[first:len(piece) - last])
        if last:
            yield np.concatenate(ids).tolist()
            ids = []
    if at != [len(s) for s in streams]:
        raise ValueError(f"{stage_dir.doc_stats.name} accounts for {at} tokens of {[len(s) for s in streams]}")
