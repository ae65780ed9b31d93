"""What a seeded, step-limited run of the chain must reproduce to the bit, as one JSON: a restructuring of the code
must leave it unchanged (issue 32).

    python pocketgpt_utils.py pipeline --profile demo --run-dir runs/chain -p max_steps 300 -p max_hours 5.0 \\
        -p precision fp32 -p preference self -p compile False
    python tools/chain_fingerprint.py runs/chain > chain.json      # then diff two of them

Both runs need the same number of threads (OMP_NUM_THREADS): float sums in another order differ in the last bit.

It keeps every log.csv value but the clocks' (tokens/s, MFU, elapsed seconds), every metrics.json value but
times, dates and machine-dependent fields (the run folder's path written as <run>), and the sha256 of each safetensors, .bin (train.bin, val.bin, pytorch_model.bin) and .gguf file.
"""
import csv
import hashlib
import json
import sys
from pathlib import Path

CLOCK_COLUMNS = {"tokens_per_s", "mfu", "elapsed_s"}
CLOCK_KEYS = {"tokens_per_s", "mfu", "hours", "session_hours", "plan_step_s", "seconds", "wall_s", "peak_rss_gb",
              "started_at", "finished_at", "device", "versions", "encode_s", "train_s", "time_s"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def without_clocks(obj, run_dir: str):
    """The values a rerun must repeat: clocks dropped, the run folder's own path written as <run>."""
    if isinstance(obj, dict):
        return {k.replace(run_dir, "<run>"): without_clocks(v, run_dir) for k, v in obj.items()
                if k not in CLOCK_KEYS and not k.endswith(("_s", "_seconds", "_minutes", "_hours", "_at"))}
    if isinstance(obj, list):
        return [without_clocks(v, run_dir) for v in obj]
    return obj.replace(run_dir, "<run>") if isinstance(obj, str) else obj


def fingerprint(run_dir: Path) -> dict:
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        if ".partial" in rel or "notebooks" in rel.split("/")[0]:
            continue
        if path.name == "log.csv":
            with open(path, newline="") as f:
                out[rel] = [{k: v for k, v in row.items() if k not in CLOCK_COLUMNS} for row in csv.DictReader(f)]
        elif path.name == "metrics.json":
            out[rel] = without_clocks(json.loads(path.read_text()), str(run_dir.resolve()))
        elif path.suffix in (".safetensors", ".bin", ".gguf") and path.is_file():
            out[rel] = sha256(path)
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(Path(sys.argv[1])), indent=1, sort_keys=True))
