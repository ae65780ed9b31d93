"""Stage 01 on corpora of every shape and size, against the raw `tokenizers` library: a benchmark, not a test.

It builds its corpora from the demo corpus (`make_demo_data`), each document marked with its copy number so
no two are equal, in the shapes files come in:
  blank_lines  documents separated by blank lines (the demo's shape)
  crlf         the same with Windows line endings
  lines        one document a line, no blank line (a WikiText-style dump)
  no_newline   every document on one line, a space between (`" ".join(texts)`)
  jsonl_row    one JSON Lines row holding the whole text
For each (shape, size) it runs, each in a fresh process so its peak RSS (ru_maxrss) is its own:
  stage  `build_tokenizer_stage` (the t4 profile: vocab 24000) end to end: scan, BPE on its sample, encode
  raw    the library alone on the same text: blocks of whole lines read from the file, cut as the shape says
         (blank lines, lines), `train_from_iterator` with the same trainer on an even sample of the same
         size, then `encode_batch_fast` of everything to uint16 ids written to a file
and prints one JSON line each, then a table: wall time, MB/s of each phase, peak RSS, stage/raw speed.

    python tools/bench_corpus.py [--sizes 20 200] [--shapes blank_lines lines ...] [--raw] [--work DIR]
    python tools/bench_corpus.py sample --mb 2 5 10 20 40     # compression (val bytes/token) against
                                                             # the BPE's sample size (bpe_sample_bytes)
    python tools/bench_corpus.py stage CORPUS OUT [-p NAME VALUE ...]   # one stage run: a JSON line
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ["blank_lines", "crlf", "lines", "no_newline", "jsonl_row"]


def peak_rss_mb() -> float:
    """This process's peak RSS: Linux's VmHWM, the high-water mark of this program's memory. ru_maxrss would
    also hold the RSS of the parent at the fork before exec (a test runner's hundreds of MB); elsewhere
    ru_maxrss is what there is."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# --- corpora ----------------------------------------------------------------------------------------------

def write_shape(path: Path, docs: list[str], shape: str, n_bytes: int) -> Path:
    """About n_bytes of the documents, copied over and over (each copy marked), in the given shape."""
    def texts():
        written, copy = 0, 0
        while True:
            for doc in docs:
                text = f"{doc}\n(copy {copy})"
                written += len(text.encode()) + 2
                yield text
                if written >= n_bytes:
                    return
            copy += 1
    with open(path, "w", encoding="utf-8", newline="") as f:
        if shape == "jsonl_row":
            f.write('{"text": ')
            f.write(json.dumps("\n\n".join(texts()), ensure_ascii=False))
            f.write("}\n")
        else:
            sep, end = {"blank_lines": ("\n\n", "\n"), "crlf": ("\r\n\r\n", "\r\n"), "lines": ("\n", "\n"),
                        "no_newline": (" ", "")}[shape]
            first = True
            for text in texts():
                if shape in ("lines", "no_newline"):
                    text = " ".join(text.split("\n"))
                elif shape == "crlf":
                    text = text.replace("\n", "\r\n")
                f.write(("" if first else sep) + text)
                first = False
            f.write(end)
    return path


def corpus_path(work: Path, docs, shape: str, mb: float) -> Path:
    suffix = ".jsonl" if shape == "jsonl_row" else ".txt"
    path = work / f"{shape}-{mb:g}MB{suffix}"
    if not path.exists():
        write_shape(path, docs, shape, int(mb * 1e6))
    return path


# --- the measures, each in its own process --------------------------------------------------------------

def measure_stage(corpus: Path, out: Path, params: dict) -> dict:
    """The whole tokenizer stage on one corpus (t4 profile unless params say otherwise)."""
    import pocketgpt_utils as pg
    base = peak_rss_mb()
    started = time.time()
    cfg = pg.make_config(pg.TokenizerConfig, params.pop("profile", "t4"), run_dir=str(out), corpus_path=str(corpus),
                         out_dir=str(out / "tokenizer"), **params)
    stage = pg.build_tokenizer_stage(cfg)
    seconds = time.time() - started
    m = pg.read_json(stage / "metrics.json")
    return {"what": "stage", "seconds": seconds, "file_mb": m["corpus_bytes"] / 1e6, "text_mb": m["text_bytes"] / 1e6,
            "documents": m["documents"], "modes": sorted(set(m.get("document_modes", {}).values())),
            "scan_seconds": m.get("scan_seconds", float("nan")), "train_seconds": m["train_seconds"],
            "encode_seconds": m["encode_seconds"], "sample_mb": m.get("bpe_sample_bytes", m["text_bytes"]) / 1e6,
            "val_share": m["val_tokens"] / (m["train_tokens"] + m["val_tokens"]),
            "tokens": m["train_tokens"] + m["val_tokens"],
            "val_bytes_per_token": m["val_bytes_per_token"], "base_rss_mb": base, "peak_rss_mb": peak_rss_mb()}


def raw_blocks(corpus: Path, shape: str):
    """The text as a user of the library alone would feed it: 1 MB blocks of whole lines, cut into documents
    at blank lines (blank_lines, crlf), at newlines (lines), or not at all (no_newline, jsonl_row's text)."""
    if shape == "jsonl_row":
        with open(corpus, encoding="utf-8") as f:
            text = json.loads(f.read())["text"]
        for i in range(0, len(text), 1 << 20):
            yield [text[i:i + (1 << 20)]]
        return
    with open(corpus, encoding="utf-8", newline="") as f:
        while block := f.read(1 << 20) + (f.readline() if shape != "no_newline" else ""):  # one line: 1 MB blocks
            if shape in ("blank_lines", "crlf"):
                yield [d for d in block.replace("\r\n", "\n").split("\n\n") if d.strip()]
            elif shape == "lines":
                yield [d for d in block.split("\n") if d.strip()]
            else:
                yield [block]


def measure_raw(corpus: Path, shape: str, sample_bytes: int, vocab_size: int = 24000) -> dict:
    """train_from_iterator (the stage's trainer) on an even sample of sample_bytes, then encode_batch_fast of
    every block to uint16 ids appended to a file."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pocketgpt.common import SPECIAL_TOKENS
    base = peak_rss_mb()
    size = corpus.stat().st_size
    share = sample_bytes / size
    started = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def sample():
        seen, taken = 0, 0
        for docs in raw_blocks(corpus, shape):
            n = sum(len(d) for d in docs)
            seen += n
            if taken < share * seen:
                taken += n
                yield docs
    tok.train_from_iterator(sample(), trainer=trainer)
    train_seconds = time.time() - started
    started, n_tokens = time.time(), 0
    with tempfile.TemporaryFile() as out:
        for docs in raw_blocks(corpus, shape):
            ids = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
            flat = np.fromiter((i for d in ids for i in d), dtype=np.uint16)
            out.write(flat.tobytes())
            n_tokens += len(flat)
    encode_seconds = time.time() - started
    return {"what": "raw", "train_seconds": train_seconds, "encode_seconds": encode_seconds,
            "seconds": train_seconds + encode_seconds, "file_mb": size / 1e6, "tokens": n_tokens,
            "base_rss_mb": base, "peak_rss_mb": peak_rss_mb()}


def measure_sample(corpus: Path, val: Path, mb: float, vocab_size: int) -> dict:
    """Compression of held-out text (bytes per token) by a BPE trained on an even sample of `mb` MB."""
    from pocketgpt.corpus import iter_fragments, iter_pieces
    from pocketgpt.tokenizer import even_sample, fast_encoder, train_tokenizer, wrap_tokenizer
    size = corpus.stat().st_size
    started = time.time()
    tok = train_tokenizer(even_sample(iter_pieces(iter_fragments([corpus]), 1 << 16), size, int(mb * 1e6)), vocab_size)
    seconds = time.time() - started
    text = val.read_text(encoding="utf-8")
    n = sum(len(ids) for ids in fast_encoder(wrap_tokenizer(tok))([text]))
    return {"what": "sample", "sample_mb": min(mb, size / 1e6), "train_seconds": seconds,
            "val_bytes_per_token": len(text.encode()) / n, "peak_rss_mb": peak_rss_mb()}


def write_dialogs_csv(path: Path, pairs: list[tuple], rows: int, sep: str = ",", encoding: str = "utf-8") -> Path:
    """`rows` instruction/response rows made of the demo pairs (each marked with its copy, the answer twice:
    about the seed's 45 MB for 139k rows), as a spreadsheet saves them."""
    import csv
    with open(path, "w", encoding=encoding, newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["instruction", "response"])
        for i in range(rows):
            q, a = pairs[i % len(pairs)]
            w.writerow([f"{q} (variant {i // len(pairs)})", f"{a} {a}"])
    return path


def measure_dialogs(path: Path, tokenizer_dir: Path | None) -> dict:
    """read_dialogs (03's and the preference phase's reader) on a dialog file, then (with a tokenizer) the
    encoding 03 does next: the peak RSS of each step."""
    from pocketgpt.dialogs import encode_dialogs, read_dialogs
    base = peak_rss_mb()
    started = time.time()
    pairs, report = read_dialogs([path])
    out = {"what": "dialogs", "rows": report["rows_read"], "read_seconds": time.time() - started,
           "read_as": report.get("read_as", {}).get(str(path)), "base_rss_mb": base, "read_rss_mb": peak_rss_mb()}
    if tokenizer_dir:
        import pocketgpt_utils as pg
        started = time.time()
        kept, rows, _ = encode_dialogs(pg.load_tokenizer(tokenizer_dir), pairs, 384, "truncate")
        out.update(encode_seconds=time.time() - started, tokens=sum(len(r[0]) for r in rows))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def in_fresh_process(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=False,
                         env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.exit(f"{args[:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_docs(work: Path, max_bytes: int = 6_000_000) -> list[str]:
    import pocketgpt_utils as pg
    from pocketgpt.corpus import iter_documents
    data = work / "demo"
    if not (data / "corpus.txt").exists():
        pg.make_demo_data(data, max_bytes=max_bytes)
    return list(iter_documents([data / "corpus.txt"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[20, 200], help="corpus sizes in MB")
    p.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    p.add_argument("--raw", action="store_true", help="also the raw library on each corpus, and the ratio")
    p.add_argument("--work", help="folder for the corpora and runs (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    sub = p.add_subparsers(dest="measure")
    s = sub.add_parser("stage")
    s.add_argument("corpus", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    r = sub.add_parser("raw")
    r.add_argument("corpus", type=Path)
    r.add_argument("shape")
    r.add_argument("sample_bytes", type=int)
    d = sub.add_parser("dialogs", help="read (and encode) a 139k-row dialog CSV: peak RSS")
    d.add_argument("--rows", type=int, default=139_000)
    d.add_argument("--tokenizer", type=Path, help="a tokenizer stage folder: also encode, as 03 does")
    d.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    m = sub.add_parser("sample")
    m.add_argument("--mb", type=float, nargs="+", default=[2, 5, 10, 20, 40])
    m.add_argument("--vocab", type=int, default=24000)
    m.add_argument("--corpus-mb", type=float, default=40, help="unique demo text to build (at most what exists)")
    m.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # corpus val mb: a child's measure
    args = p.parse_args(argv)
    if args.measure == "stage":
        params = {}
        for name, value in args.p:
            try:
                params[name] = json.loads(value)
            except ValueError:
                params[name] = value
        try:
            print(json.dumps(measure_stage(args.corpus, args.out, params)))
        except Exception as e:  # the peak memory of a run that failed is a figure too (the old code's, say)
            print(json.dumps({"what": "stage", "error": f"{type(e).__name__}: {e}", "peak_rss_mb": peak_rss_mb()}))
        return 0
    if args.measure == "raw":
        print(json.dumps(measure_raw(args.corpus, args.shape, args.sample_bytes)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="pocketgpt-bench-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.measure == "dialogs":
        if args.one:
            print(json.dumps(measure_dialogs(Path(args.one[0]), args.tokenizer)))
            return 0
        import pandas as pd
        demo_docs(work)
        pairs = list(pd.read_csv(work / "demo" / "dialogs.csv", keep_default_na=False).itertuples(index=False))
        print("| dialog file | MB | rows | read as | read s | peak RSS after reading MB | + encode s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for sep, encoding in [(",", "utf-8"), (";", "utf-8"), ("\t", "utf-16")]:
            path = write_dialogs_csv(work / "dialogs.csv", pairs, args.rows, sep, encoding)
            extra = ["--tokenizer", args.tokenizer] if args.tokenizer else []
            r = in_fresh_process("dialogs", *extra, "--one", path)
            print(f"| {sep!r} {encoding} | {path.stat().st_size / 1e6:.1f} | {r['rows']:,} | {r['read_as']} "
                  f"| {r['read_seconds']:.1f} | {r['read_rss_mb']:.0f} | {r.get('encode_seconds', float('nan')):.1f} "
                  f"| {r['peak_rss_mb']:.0f} |", flush=True)
            path.unlink()
        return 0
    if args.measure == "sample":
        if args.one:
            print(json.dumps(measure_sample(Path(args.one[0]), Path(args.one[1]), float(args.one[2]), args.vocab)))
            return 0
        docs = demo_docs(work, int(args.corpus_mb * 1e6))
        held = docs[::100]  # every 100th document is held out, the rest is the corpus sampled from
        (work / "val.txt").write_text("\n\n".join(held), encoding="utf-8")
        (work / "train.txt").write_text("\n\n".join(d for i, d in enumerate(docs) if i % 100), encoding="utf-8")
        print(f"corpus {(work / 'train.txt').stat().st_size / 1e6:.1f} MB of unique text, "
              f"held out {(work / 'val.txt').stat().st_size / 1e6:.2f} MB, vocab {args.vocab}")
        print("| BPE sample MB | train s | val bytes/token | peak RSS MB |\n|---|---|---|---|")
        for mb in args.mb:
            r = in_fresh_process("sample", "--vocab", args.vocab, "--one", work / "train.txt", work / "val.txt", mb)
            print(f"| {r['sample_mb']:.1f} | {r['train_seconds']:.1f} | {r['val_bytes_per_token']:.4f} "
                  f"| {r['peak_rss_mb']:.0f} |", flush=True)
        return 0

    docs = demo_docs(work)
    rows = []
    for mb in args.sizes:
        for shape in args.shapes:
            corpus = corpus_path(work, docs, shape, mb)
            shutil.rmtree(work / "run", ignore_errors=True)
            st = in_fresh_process("stage", corpus, work / "run")
            print(json.dumps({"shape": shape, "mb": mb, **st}), flush=True)
            raw = None
            if args.raw:
                raw = in_fresh_process("raw", corpus, shape, int(st["sample_mb"] * 1e6))
                print(json.dumps({"shape": shape, "mb": mb, **raw}), flush=True)
            rows.append((shape, mb, st, raw))
            if not args.keep:
                corpus.unlink()
    shutil.rmtree(work / "run", ignore_errors=True)
    print("\n| corpus | documents (found as) | stage wall s | scan MB/s | BPE sample MB, MB/s | encode MB/s "
          "| peak RSS GB | val share | raw wall s (BPE s, encode MB/s) | raw peak RSS GB | stage speed / raw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, mb, st, raw in rows:
        f = st["file_mb"]
        line = (f"| {shape}, {f:.0f} MB | {st['documents']:,} ({', '.join(st['modes']) or 'rows'}) | {st['seconds']:.1f} "
                f"| {f / st['scan_seconds']:.0f} | {st['sample_mb']:.0f}, {st['sample_mb'] / st['train_seconds']:.1f} "
                f"| {f / st['encode_seconds']:.2f} | {st['peak_rss_mb'] / 1024:.2f} | {st['val_share']:.2%} ")
        if raw:
            line += (f"| {raw['seconds']:.1f} ({raw['train_seconds']:.1f}, {f / raw['encode_seconds']:.2f}) "
                     f"| {raw['peak_rss_mb'] / 1024:.2f} | {raw['seconds'] / st['seconds']:.2f}x |")
        else:
            line += "| | | |"
        print(line)
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
