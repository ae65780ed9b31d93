"""Stage 1: a byte-level BPE trained with `tokenizers`, wrapped as GPT2TokenizerFast; the corpus as ids.

Owns: training, saving and loading the tokenizer; encoding user text (special-token strings stay text);
train.bin / val.bin (uint16, each document <|bos|> ... <|eos|>); build_tokenizer_stage, the whole of 01.
Imports: common, config, data.
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
    UNK_ID,
    PocketGPTError,
    attached_input,
    files_summary,
    on_kaggle,
    progress,
    quiet_library_bars,
    read_json,
    space_for,
    stage_output,
    write_file,
    write_json,
)
from .config import TokenizerConfig
from .data import CORPUS_FORMATS, corpus_files, demo_data, iter_documents, scan_corpus, split_of


def train_tokenizer(documents, vocab_size: int, n_documents: int | None = None):
    """Train a byte-level BPE on an iterator of documents (streamed in batches, never all in memory).

    ByteLevel with add_prefix_space=False and a ByteLevel decoder round-trips any text exactly;
    the 256 byte symbols are in the initial alphabet, so no text ever needs <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def batches(size=1000):
        batch = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    tok.train_from_iterator(batches(), trainer=trainer, length=n_documents)
    return tok


def wrap_tokenizer(tok, model_max_length: int = 1024):
    """The transformers face of the tokenizer: GPT2TokenizerFast with the four special tokens set."""
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                             pad_token="<pad>", unk_token="<unk>", add_prefix_space=False,
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


def encode_corpus(files, tok, out_dir, seed: int, val_fraction: float, total_bytes: int,
                  batch_docs: int = 2000, text_column: str | None = None) -> dict:
    """Encode every document as <|bos|> ... <|eos|> into uint16 train.bin / val.bin.

    Batches go through the Rust tokenizer's parallel batch encoding (special-token strings in the
    text stay text: see encode_text); the ids are appended to the files as they come, so memory
    stays flat for any corpus size. Per-document lengths are kept
    (doc_stats.npz) for the length plots; val-split byte and word counts give the compression.
    """
    out_dir = Path(out_dir)
    outs = {}  # split -> its open .bin file, appended to as batches are encoded (inside the stage's .partial)
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "words": 0, "chars": 0} for s in ("train", "val")}
    lengths = {"split": [], "bytes": [], "tokens": []}
    started = time.time()

    def flush(batch):
        for doc, enc in zip(batch, encode_text(tok, batch)):
            ids = np.array([BOS_ID, *enc, EOS_ID], dtype=np.uint16)
            s = split_of(doc, seed, val_fraction)
            outs[s].write(ids.tobytes())
            st, nb = stats[s], len(doc.encode("utf-8"))
            st["docs"] += 1; st["tokens"] += len(ids); st["bytes"] += nb
            st["words"] += len(doc.split()); st["chars"] += len(doc)
            lengths["split"].append(s == "val"); lengths["bytes"].append(nb); lengths["tokens"].append(len(ids))

    # ids are 2 bytes and a token is about 4 bytes of text: about half the corpus's size on disk
    with space_for(out_dir / "train.bin", needed=total_bytes // 2), open(out_dir / "train.bin", "wb") as outs["train"], \
            open(out_dir / "val.bin", "wb") as outs["val"], \
            progress(total=total_bytes, unit="B", unit_scale=True, desc="encode") as bar:
        batch = []
        for doc in iter_documents(files, progress=bar, text_column=text_column):
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch); batch = []
        if batch:
            flush(batch)
    seconds = time.time() - started
    if stats["val"]["docs"] == 0 or stats["train"]["docs"] == 0:
        empty = "val" if stats["val"]["docs"] == 0 else "train"
        raise PocketGPTError(f"The {empty} split is empty ({stats['train']['docs'] + stats['val']['docs']} "
                             f"documents, val_fraction={val_fraction}). Use a larger corpus or adjust val_fraction.")
    def save_stats(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **{k: np.array(v) for k, v in lengths.items()})
    write_file(out_dir / "doc_stats.npz", save_stats)
    v = stats["val"]
    return {
        "train_tokens": stats["train"]["tokens"], "val_tokens": v["tokens"],
        "train_documents": stats["train"]["docs"], "val_documents": v["docs"],
        "val_bytes_per_token": v["bytes"] / (v["tokens"] - 2 * v["docs"]),
        "val_chars_per_token": v["chars"] / (v["tokens"] - 2 * v["docs"]),
        "val_tokens_per_word": (v["tokens"] - 2 * v["docs"]) / max(v["words"], 1),
        "val_bytes": v["bytes"],
        "encode_seconds": seconds, "encode_mb_per_s": total_bytes / 1e6 / max(seconds, 1e-9),
    }


@quiet_library_bars()
def build_tokenizer_stage(cfg: TokenizerConfig) -> Path:
    """Stage 1, whole: scan, train the BPE, save it, encode the splits, write meta and manifest."""
    if cfg.corpus_path is None and on_kaggle():  # the attached corpus.txt (.jsonl, .parquet, ...), wherever it is mounted
        cfg.corpus_path = str(attached_input("corpus", "corpus_path", CORPUS_FORMATS))
    elif cfg.corpus_path is None:
        cfg.corpus_path = str(demo_data(cfg.run_dir) / "corpus.txt")
    files = corpus_files(cfg.corpus_path)
    print(f"corpus_path={cfg.corpus_path}: {files_summary(files)}")
    scan = scan_corpus(files, cfg.on_invalid_utf8, cfg.text_column)
    columns = sorted(set(scan["text_columns"].values()))
    print(f"corpus: {len(files)} file(s), {scan['bytes'] / 1e6:.1f} MB, {scan['documents']:,} documents"
          + (f" from the column {', '.join(columns)} of {scan['rows']:,} rows" if columns else "")
          + (f" ({scan['empty_rows']:,} rows without text skipped)" if scan["empty_rows"] else "")
          + (f", {scan['invalid_utf8_bytes']} invalid UTF-8 bytes replaced" if scan["invalid_utf8_bytes"] else ""))
    inputs = {f"corpus:{f.name}" if len(files) > 1 else "corpus": f for f in files}
    with stage_output(cfg.out_dir, "tokenizer", dataclasses.asdict(cfg), inputs) as work:
        started = time.time()
        with progress(total=scan["bytes"], unit="B", unit_scale=True, desc="train BPE") as bar:  # counting pairs
            tok = train_tokenizer(iter_documents(files, progress=bar, text_column=cfg.text_column), cfg.vocab_size,
                                  scan["documents"])
        train_seconds = time.time() - started
        print(f"trained a {tok.get_vocab_size():,}-token BPE in {train_seconds:.1f}s")
        hf_tok = wrap_tokenizer(tok)
        save_tokenizer(hf_tok, work)
        enc = encode_corpus(files, hf_tok, work, cfg.seed, cfg.val_fraction, scan["bytes"], text_column=cfg.text_column)
        meta = {"vocab_size": tok.get_vocab_size(), "dtype": "uint16",
                "special_tokens": dict(zip(SPECIAL_TOKENS, range(4))),
                "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
                "corpus_bytes": scan["bytes"], "text_bytes": scan["text_bytes"], "documents": scan["documents"],
                "text_columns": scan["text_columns"], "empty_rows": scan["empty_rows"],
                "invalid_utf8_bytes": scan["invalid_utf8_bytes"], **enc}
        write_json(work / "meta.json", meta)
        write_json(work / "metrics.json", {"train_seconds": train_seconds, "train_mb_per_s":
                                          scan["bytes"] / 1e6 / train_seconds, **meta})
    return Path(cfg.out_dir)


def compression_table(stage_dir) -> list[dict]:
    """Rows for the notebook's table: how well the tokenizer compresses held-out text."""
    m = read_json(Path(stage_dir) / "meta.json")
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
    """Split a token stream at <|bos|> and decode each document (a check that nothing was lost)."""
    starts = np.flatnonzero(ids == BOS_ID)
    ends = list(starts[1:]) + [len(ids)]
    return [tok.decode(ids[s + 1:e - 1].tolist()) for s, e in zip(starts, ends)]
