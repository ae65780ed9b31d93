"""Push pocketGPT to Kaggle: the module dataset, the data dataset, then the four notebooks in order.

    python kaggle/push.py --username NAME --corpus corpus.txt --dialogs dialogs.csv
    python kaggle/push.py --username NAME --only 02 --resume    # one more pretraining session
    python kaggle/push.py --username NAME --only 03 04          # then the rest
    python kaggle/push.py --username NAME --dry-run             # print the commands, push nothing

It calls the `kaggle` CLI (pip install kaggle), which reads your API token itself; this script never
sees or stores credentials. The templates in kaggle/ are never edited: filled-in copies (username and
data slug substituted, each notebook copied beside its metadata with its parameters cell set for
Kaggle: `profile = "t4"`, corpus_path/dialogs_path as globs under /kaggle/input, and any -p NAME VALUE)
are written to --out, a temporary folder by default, and pushed from there.
See kaggle/README.md for the whole walk-through.
"""
import argparse
import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NOTEBOOKS = ["01_tokenizer", "02_pretrain", "03_sft", "04_eval_export"]  # push order
WHEELS = ["gguf==0.19.0", "rouge-score==0.1.2"]  # as in requirements.txt; pure Python, which Kaggle's image may lack
USERNAME, DATA_SLUG = "<username>", "<data-slug>"  # the placeholders in the templates

# -----------------------------------------------------------------------------
# filling the templates (pure functions: the tests call them)

def fill(text, username, data_slug):
    return text.replace(USERNAME, username).replace(DATA_SLUG, data_slug)

def load_template(name, username, data_slug):
    """The metadata in kaggle/<name>/, placeholders filled."""
    path = HERE / name / ("dataset-metadata.json" if name in ("code", "data") else "kernel-metadata.json")
    return json.loads(fill(path.read_text(), username, data_slug))

def literal(value):
    """A parameter value as Python source: strings in double quotes, numbers and None as typed."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)  # "11.5" -> 11.5, "None" -> None, "'x'" -> 'x'
        except (ValueError, SyntaxError):
            pass
    return json.dumps(value) if isinstance(value, str) else repr(value)

def set_params(notebook, params, add=("profile",)):
    """Rewrite `name = value` lines in the code cell tagged `parameters` (papermill's convention).

    A name the cell lacks is skipped (01 has no dialogs_path), except those in `add`, which are appended.
    A trailing comment on the line is kept. Returns the notebook.
    """
    cells = [c for c in notebook.get("cells", [])
             if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError("no code cell tagged 'parameters' in the notebook")
    cell = cells[0]
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    for name, value in params.items():
        line = re.compile(rf"^(\s*{re.escape(name)}\s*=\s*)(\"[^\"\n]*\"|'[^'\n]*'|[^#\n]*[^#\s])", re.MULTILINE)
        if line.search(source):
            source = line.sub(lambda m: m.group(1) + literal(value), source, count=1)
        elif name in add:
            source = source.rstrip("\n") + f"\n{name} = {literal(value)}\n"
    cell["source"] = source.splitlines(keepends=True)
    return notebook

def write_kernel_folder(name, out, username, data_slug, params=None, resume=False, notebooks_dir=None):
    """out/<name>/ with kernel-metadata.json and the notebook it names, `params` set; returns the metadata."""
    meta = load_template(name, username, data_slug)
    src = Path(notebooks_dir or REPO / "notebooks") / f"{name}.ipynb"
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    notebook = set_params(json.loads(src.read_text(encoding="utf-8")), params or {"profile": "t4"})
    (folder / src.name).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    meta["code_file"] = src.name  # the CLI resolves code_file relative to the metadata's folder
    if resume:  # attach this kernel's own last output: the checkpoint to continue from
        meta["kernel_sources"] = meta["kernel_sources"] + [meta["id"]]
    (folder / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta

def write_dataset_folder(name, out, username, data_slug, files=None):
    """out/<name>/ with dataset-metadata.json and `files` ({name in the dataset: source}) copied in."""
    meta = load_template(name, username, data_slug)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    for dest, src in (files or {}).items():
        if Path(src).is_dir():
            shutil.copytree(src, folder / dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, folder / dest)
    return meta

# -----------------------------------------------------------------------------
# talking to the kaggle CLI

def kaggle(*args, dry_run=False, check=True, quiet=False):
    """Run `kaggle ARGS`; its stdout, or None when it failed and check is off."""
    if not quiet:
        print("$ " + shlex.join(["kaggle", *args]), flush=True)
    if dry_run:
        return ""
    result = subprocess.run(["kaggle", *args], capture_output=True, text=True)
    if not quiet or result.returncode != 0:
        print(result.stdout + result.stderr, end="", flush=True)
    if check and result.returncode != 0:
        sys.exit(f"kaggle {args[0]} {args[1]} failed (exit {result.returncode})")
    return result.stdout if result.returncode == 0 else None

def wait_until(what, args, done, failed, poll):
    """Poll `kaggle ARGS` until its answer contains `done`; exit on `failed`. Prints each new status once."""
    last = None
    while True:
        status = (kaggle(*args, quiet=True) or "").strip()
        if status != last:
            print(f"# {what}: {status}", flush=True)
            last = status
        if done in status.lower():
            return
        if any(f in status.lower() for f in failed):
            sys.exit(f"{what} did not succeed: {status}")
        time.sleep(poll)

def push_dataset(folder, meta, dir_mode, dry_run, poll):
    """Create the dataset, or add a version when it exists; wait until kernels can attach it."""
    dataset_id = meta["id"]
    extra = ["-r", dir_mode] if dir_mode else []  # without -r, `datasets create` skips sub-folders
    if dry_run:
        print(f"# creates {dataset_id}, or adds a version if it exists:")
        kaggle("datasets", "create", "-p", str(folder), *extra, dry_run=True)
        return
    if kaggle("datasets", "status", dataset_id, check=False, quiet=True) is None:
        kaggle("datasets", "create", "-p", str(folder), *extra)
    else:
        kaggle("datasets", "version", "-p", str(folder), "-m", "pushed by kaggle/push.py", *extra)
    wait_until(dataset_id, ["datasets", "status", dataset_id], "ready", ["failed"], poll)

def pretrain_finished(kernel_id, out):
    """Did the last run of 02 reach max_steps? A run stopped by its time budget still writes a
    finished stage folder (so 03 could already use it), but its metrics.json says finished: false."""
    dest = Path(out) / "02_pretrain_output"
    kaggle("kernels", "output", kernel_id, "-p", str(dest), "--file-pattern", r"(manifest|metrics)\.json$", "-o")
    for manifest in dest.rglob("manifest.json"):
        m = json.loads(manifest.read_text())
        metrics = manifest.with_name("metrics.json")
        if m.get("stage") == "pretrain" and m.get("finished_at") and metrics.exists():
            return bool(json.loads(metrics.read_text()).get("finished"))
    return False

def data_name(stem, path):
    """corpus.txt, corpus.jsonl.gz, dialogs.parquet: the stem the notebooks look for, the file's extension."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    return stem + "".join(suffixes[-2:] if suffixes[-1:] in ([".gz"], [".bz2"], [".zst"]) else suffixes[-1:])

def folder_extension(folder):
    """The extension of a corpus folder's files (.txt, .jsonl.gz, .parquet, ...): its glob on Kaggle
    reads those and not, say, a README beside them. The most common one, when there are several."""
    names = [data_name("", f) for f in Path(folder).rglob("*") if f.is_file() and not f.name.startswith(".")]
    names = [n for n in names if n.split(".")[1] in ("txt", "jsonl", "json", "parquet", "csv", "arrow")]
    return max(sorted(set(names)), key=names.count) if names else ".txt"

def add_package_wheel(folder, dry_run, repo=REPO):
    """The package pocketgpt/ (and pocketgpt_utils.py) as one pure-Python wheel in the code dataset: a
    Kaggle dataset keeps no subfolders, and the notebooks put every attached wheel on sys.path."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), str(repo)]
    if dry_run:
        print(" ".join(cmd))
    elif subprocess.run(cmd, capture_output=True).returncode != 0:
        raise OSError(f"could not build the pocketgpt wheel: {' '.join(cmd)}")


def add_wheels(folder, dry_run):
    """Kaggle's image may lack `gguf` (04's GGUF files) and `rouge-score` (04's ROUGE-L), and its kernels
    have no internet: their pure-Python wheels travel in the code dataset, and the notebooks put them on
    sys.path (a wheel is a zip). `pip wheel` also builds rouge-score, which PyPI has as a source archive."""
    for wheel in WHEELS:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), wheel]
        if dry_run:
            print(" ".join(cmd))
        elif subprocess.run(cmd, capture_output=True).returncode != 0:
            print(f"# could not fetch {wheel}: 04 will skip what needs it on Kaggle and say so", flush=True)

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--username", required=True, help="your Kaggle username (the owner of every dataset and kernel)")
    p.add_argument("--data-slug", default="pocketgpt-data", help="slug of the dataset holding corpus.txt and dialogs.csv")
    p.add_argument("--corpus", help="upload this corpus file (or folder) in the data dataset")
    p.add_argument("--dialogs", help="upload this dialogs CSV in the data dataset")
    p.add_argument("--only", nargs="+", choices=["code", "data", "01", "02", "03", "04"],
                   help="push only these steps (default: code, data if --corpus/--dialogs, 01 02 03 04)")
    p.add_argument("--resume", action="store_true", help="02 attaches its own last output and continues from it")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter in the notebooks that have it (like papermill -p); repeatable")
    p.add_argument("--no-wait", action="store_true", help="push and return; do not wait for each run to end")
    p.add_argument("--download", default=".", help="where 04's export/pocketGPT.zip is downloaded")
    p.add_argument("--out", help="folder for the filled copies (default: a new temporary folder)")
    p.add_argument("--notebooks", help=argparse.SUPPRESS)  # the tests point this at tiny notebooks
    p.add_argument("--module", default=str(REPO / "pocketgpt_utils.py"), help=argparse.SUPPRESS)
    p.add_argument("--poll", type=float, default=60, help="seconds between status checks")
    p.add_argument("--dry-run", action="store_true", help="write the filled folders and print the commands only")
    args = p.parse_args(argv)
    user, slug, dry = args.username, args.data_slug, args.dry_run

    data_files = {}  # named as the notebooks look for them, with the file's own extension (they read by it)
    if args.corpus:
        data_files["corpus" if Path(args.corpus).is_dir() else data_name("corpus", args.corpus)] = args.corpus
    if args.dialogs:
        data_files[data_name("dialogs", args.dialogs)] = args.dialogs
    steps = args.only or (["code"] + (["data"] if data_files else []) + ["01", "02", "03", "04"])
    if "data" in steps and not data_files:
        sys.exit("pushing the data dataset needs --corpus and/or --dialogs")
    # the inputs are found by searching /kaggle/input: mount paths have changed before
    named = {stem: next((n for n in data_files if n.startswith(stem + ".")), default)
             for stem, default in [("corpus", "corpus.txt"), ("dialogs", "dialogs.csv")]}
    corpus = (f"/kaggle/input/**/corpus/**/*{folder_extension(args.corpus)}" if "corpus" in data_files
              else f"/kaggle/input/**/{named['corpus']}")
    params = {"profile": "t4", "corpus_path": corpus, "dialogs_path": f"/kaggle/input/**/{named['dialogs']}",
              **dict(args.param)}

    # write every filled folder first, so a missing file stops us before anything is pushed
    out = Path(args.out or tempfile.mkdtemp(prefix="pocketgpt-kaggle-"))
    print(f"# filled copies in {out}")
    metas = {}
    try:
        if "code" in steps:
            metas["code"] = write_dataset_folder("code", out, user, slug, {"pocketgpt_utils.py": args.module})
            add_package_wheel(out / "code", dry)
            add_wheels(out / "code", dry)
        if "data" in steps:
            metas["data"] = write_dataset_folder("data", out, user, slug, data_files)
        for name in NOTEBOOKS:
            if name[:2] in steps:
                resume = args.resume and name == "02_pretrain"
                metas[name] = write_kernel_folder(name, out, user, slug, params, resume, args.notebooks)
    except (OSError, ValueError) as e:
        sys.exit(f"nothing pushed: {e}")

    # then push, in order
    for name, meta in metas.items():
        if name in ("code", "data"):
            push_dataset(out / name, meta, "zip" if name == "data" else None, dry, args.poll)  # zip keeps a corpus folder
            continue
        kaggle("kernels", "push", "-p", str(out / name), dry_run=dry)
        if dry or args.no_wait:
            continue
        wait_until(meta["id"], ["kernels", "status", meta["id"]], "complete", ["error", "cancel"], args.poll)
        if name == "02_pretrain" and not pretrain_finished(meta["id"], out):
            sys.exit(f"02 stopped at its time budget with a checkpoint. Continue it with\n"
                     f"  python kaggle/push.py --username {user} --only 02 --resume\n"
                     f"and when it has finished: python kaggle/push.py --username {user} --only 03 04")
        if name == "04_eval_export":
            kaggle("kernels", "output", meta["id"], "-p", args.download, "--file-pattern", r"pocketGPT\.zip$", "-o")
            print(f"# pocketGPT.zip is in {Path(args.download) / 'export'}")

if __name__ == "__main__":
    main()
