"""Reading a corpus in the formats it comes in: a benchmark, not a test.

1. The tokenizer stage (scan, BPE training, encoding) on the demo corpus as .txt, .jsonl and .parquet:
   seconds, MB/s of text, peak RSS, and whether train.bin comes out the same.
   Each stage runs --repeat times, the formats in turn; the table gives the median time and the
   largest peak RSS (the machine may be shared: the spread is printed too).
2. The streaming reader on generated JSON Lines corpora of 100 MB, 1 GiB (and any --gib sizes): the
   scan pass (every document read and counted) and a read + encode pass (documents through the demo
   tokenizer, ids written to a file as encode_corpus does) over the first --encode-mb of text; peak
   RSS must not grow with the corpus. Each generated file is deleted once measured.

Each measure runs in a fresh process, so its peak RSS (ru_maxrss) is its own; "base" is the RSS once the
module (torch, transformers) is imported, before any data is read.

    python tools/bench_formats.py [--gib 0.0931 1.0] [--encode-mb 100] [--repeat 3] [--work DIR]
"""
import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure_stage(corpus: Path, out: Path) -> dict:
    """The whole tokenizer stage (demo profile: vocab 4096) on one corpus file."""
    import pocketgpt_utils as pg
    base = peak_rss_mb()
    started = time.time()
    cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(out), corpus_path=str(corpus),
                         out_dir=str(out / "tokenizer"))
    stage = pg.build_tokenizer_stage(cfg)
    seconds = time.time() - started
    m = pg.read_json(stage / "metrics.json")
    return {"seconds": seconds, "file_mb": m["corpus_bytes"] / 1e6, "text_mb": m["text_bytes"] / 1e6,
            "train_seconds": m["train_seconds"], "encode_seconds": m["encode_seconds"],
            "base_rss_mb": base, "peak_rss_mb": peak_rss_mb(),
            "train_bin_sha256": hashlib.sha256((stage / "train.bin").read_bytes()).hexdigest()[:16]}


def measure_read(corpus: Path, tokenizer_dir: Path, encode_mb: float) -> dict:
    """The scan pass over the whole corpus, then read + encode over its first `encode_mb` MB of text."""
    import numpy as np

    import pocketgpt_utils as pg
    from pocketgpt.common import BOS_ID, EOS_ID
    from pocketgpt.corpus import iter_documents, scan_corpus
    from pocketgpt.tokenizer import encode_text
    base = peak_rss_mb()
    started = time.time()
    scan = scan_corpus([corpus])
    scan_seconds = time.time() - started
    scan_rss = peak_rss_mb()
    tok = pg.load_tokenizer(tokenizer_dir)
    started, n_text, n_tokens, batch = time.time(), 0, 0, []
    with tempfile.TemporaryFile() as out:
        def flush():
            nonlocal n_tokens
            for ids in encode_text(tok, batch):
                out.write(np.array([BOS_ID, *ids, EOS_ID], dtype=np.uint16).tobytes())
                n_tokens += len(ids) + 2
        for doc in iter_documents([corpus]):
            batch.append(doc)
            n_text += len(doc.encode())
            if len(batch) == 2000:
                flush()
                batch = []
                if n_text >= encode_mb * 1e6:
                    break
        if batch:
            flush()
    encode_seconds = time.time() - started
    return {"file_mb": scan["bytes"] / 1e6, "text_mb": scan["text_bytes"] / 1e6, "documents": scan["documents"],
            "scan_seconds": scan_seconds, "scan_rss_mb": scan_rss, "encode_text_mb": n_text / 1e6,
            "encode_tokens": n_tokens, "encode_seconds": encode_seconds, "base_rss_mb": base,
            "peak_rss_mb": peak_rss_mb()}


def in_fresh_process(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=False,
                         env={**__import__("os").environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_big_jsonl(path: Path, docs: list[str], n_bytes: int) -> None:
    """JSON Lines of the demo documents, copied over and over (each copy marked, so no two are equal)."""
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            for i, doc in enumerate(docs):
                line = json.dumps({"id": f"{copy}-{i}", "text": f"{doc}\n(copy {copy})"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= n_bytes:
                    break
            copy += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, nargs="+", default=[10**8 / 2**30, 1.0],
                   help="sizes of the generated JSON Lines corpora, in GiB (default: 100 MB and 1 GiB)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each tokenizer stage (median time)")
    p.add_argument("--encode-mb", type=float, default=100, help="MB of text read + encoded in part 2")
    p.add_argument("--work", help="folder for the corpora and runs (default: a new temporary folder)")
    sub = p.add_subparsers(dest="measure")
    s = sub.add_parser("stage")
    s.add_argument("corpus", type=Path)
    s.add_argument("out", type=Path)
    r = sub.add_parser("read")
    r.add_argument("corpus", type=Path)
    r.add_argument("tokenizer", type=Path)
    r.add_argument("encode_mb", type=float)
    args = p.parse_args(argv)
    if args.measure == "stage":  # a child: one measure, one JSON line
        print(json.dumps(measure_stage(args.corpus, args.out)))
        return 0
    if args.measure == "read":
        print(json.dumps(measure_read(args.corpus, args.tokenizer, args.encode_mb)))
        return 0

    import pandas as pd

    import pocketgpt_utils as pg
    from pocketgpt.corpus import iter_documents
    work = Path(args.work or tempfile.mkdtemp(prefix="pocketgpt-bench-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "demo"
    if not (data / "corpus.txt").exists():
        pg.make_demo_data(data)
    docs = list(iter_documents([data / "corpus.txt"]))
    pd.DataFrame({"text": docs}).to_parquet(data / "corpus.parquet")
    with open(data / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)

    runs = {name: [] for name in ["corpus.txt", "corpus.jsonl", "corpus.parquet"]}
    for _ in range(args.repeat):
        for name, rs in runs.items():
            shutil.rmtree(work / f"run-{name}", ignore_errors=True)
            rs.append(in_fresh_process("stage", data / name, work / f"run-{name}"))
            print(json.dumps({name: rs[-1]}), flush=True)
    stages = {}
    for name, rs in runs.items():
        median = {k: statistics.median(r[k] for r in rs) for k in ["seconds", "train_seconds", "encode_seconds"]}
        stages[name] = {**rs[0], **median, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                        "spread": [round(r["seconds"], 1) for r in rs],
                        "train_bin_sha256": "/".join(sorted({r["train_bin_sha256"] for r in rs}))}

    reads = {}
    try:
        for gib in args.gib:
            size = int(gib * 2**30)
            label = f"{size / 1e6:.0f} MB" if gib < 1 else f"{gib:g} GiB"
            big = work / f"big-{size}.jsonl"
            write_big_jsonl(big, docs, size)
            reads[label] = in_fresh_process("read", big, work / "run-corpus.txt" / "tokenizer", args.encode_mb)
            print(json.dumps({label: reads[label]}), flush=True)
            big.unlink()
    finally:
        for big in work.glob("big-*.jsonl"):
            big.unlink()

    print("\n| demo corpus | file MB | text MB | stage s (runs) | BPE s | encode s | MB/s (text, whole stage) "
          "| base RSS MB | peak RSS MB | train.bin sha256 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in stages.items():
        print(f"| {name} | {m['file_mb']:.1f} | {m['text_mb']:.1f} | {m['seconds']:.1f} ({', '.join(map(str, m['spread']))}) "
              f"| {m['train_seconds']:.1f} | {m['encode_seconds']:.1f} | {m['text_mb'] / m['seconds']:.2f} "
              f"| {m['base_rss_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['train_bin_sha256']} |")
    print("\n| generated JSONL | file MB | documents | scan s | scan MB/s (file) | RSS after scan MB "
          "| encoded MB of text | encode s | encode MB/s | base RSS MB | peak RSS MB | peak - base MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, m in reads.items():
        print(f"| {label} | {m['file_mb']:.0f} | {m['documents']:,} | {m['scan_seconds']:.1f} "
              f"| {m['file_mb'] / m['scan_seconds']:.1f} | {m['scan_rss_mb']:.0f} | {m['encode_text_mb']:.0f} "
              f"| {m['encode_seconds']:.1f} | {m['encode_text_mb'] / m['encode_seconds']:.2f} | {m['base_rss_mb']:.0f} "
              f"| {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - m['base_rss_mb']:.0f} |")
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
