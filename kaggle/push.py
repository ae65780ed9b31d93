"""Push pocketGPT to Kaggle: the module dataset, the data dataset, then the four notebooks in order.

    python kaggle/push.py --username NAME --corpus corpus.txt --dialogs dialogs.csv
    python kaggle/push.py --username NAME --only 02 --resume    # one more pretraining session
    python kaggle/push.py --username NAME --only 03 04          # then the rest
    python kaggle/push.py --username NAME --dry-run             # print the commands, push nothing

It calls the `kaggle` CLI (pip install kaggle), which reads your API token itself; this script never
sees or stores credentials. The templates in kaggle/ are never edited: filled-in copies (username and
data slug substituted, each notebook copied beside its metadata with `profile = "t4"` in its
parameters cell) are written to --out, a temporary folder by default, and pushed from there.
See kaggle/README.md for the whole walk-through.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NOTEBOOKS = ["01_tokenizer", "02_pretrain", "03_sft", "04_eval_export"]  # push order
USERNAME, DATA_SLUG = "<username>", "<data-slug>"  # the placeholders in the templates

# -----------------------------------------------------------------------------
# filling the templates (pure functions: the tests call them)

def fill(text, username, data_slug):
    return text.replace(USERNAME, username).replace(DATA_SLUG, data_slug)

def load_template(name, username, data_slug):
    """The metadata in kaggle/<name>/, placeholders filled."""
    path = HERE / name / ("dataset-metadata.json" if name in ("code", "data") else "kernel-metadata.json")
    return json.loads(fill(path.read_text(), username, data_slug))

def set_profile(notebook, profile):
    """Set `profile = ...` in the code cell tagged `parameters` (papermill's convention); returns the notebook."""
    cells = [c for c in notebook.get("cells", [])
             if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError("no code cell tagged 'parameters' in the notebook")
    cell = cells[0]
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    line = re.compile(r"^(\s*profile\s*=\s*)(\"[^\"]*\"|'[^']*'|None)", re.MULTILINE)
    if line.search(source):
        source = line.sub(lambda m: m.group(1) + json.dumps(profile), source, count=1)  # keeps a trailing comment
    else:
        source = source.rstrip("\n") + f"\nprofile = {json.dumps(profile)}\n"
    cell["source"] = source.splitlines(keepends=True)
    return notebook

def write_kernel_folder(name, out, username, data_slug, profile="t4", resume=False, notebooks_dir=None):
    """out/<name>/ with kernel-metadata.json and the notebook it names; returns the metadata."""
    meta = load_template(name, username, data_slug)
    src = Path(notebooks_dir or REPO / "notebooks") / f"{name}.ipynb"
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    notebook = set_profile(json.loads(src.read_text(encoding="utf-8")), profile)
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

def kaggle(*args, dry_run=False, check=True):
    print("$ kaggle " + " ".join(args), flush=True)
    if dry_run:
        return ""
    result = subprocess.run(["kaggle", *args], capture_output=True, text=True)
    print(result.stdout + result.stderr, end="", flush=True)
    if check and result.returncode != 0:
        sys.exit(f"kaggle {args[0]} {args[1]} failed (exit {result.returncode})")
    return result.stdout if result.returncode == 0 else None

def push_dataset(folder, meta, dir_mode, dry_run, poll):
    dataset_id = meta["id"]
    extra = ["-r", dir_mode] if dir_mode else []  # without -r, `datasets create` skips sub-folders
    if dry_run:
        print(f"# creates {dataset_id}, or adds a version if it exists:")
        kaggle("datasets", "create", "-p", str(folder), *extra, dry_run=True)
        return
    if kaggle("datasets", "status", dataset_id, check=False) is None:
        kaggle("datasets", "create", "-p", str(folder), *extra)
    else:
        kaggle("datasets", "version", "-p", str(folder), "-m", "pushed by kaggle/push.py", *extra)
    while "ready" not in (kaggle("datasets", "status", dataset_id) or "").lower():  # a kernel can attach it then
        time.sleep(poll)

def wait_for_kernel(kernel_id, poll):
    """Poll until the kernel's run ends; exit if it failed."""
    while True:
        status = (kaggle("kernels", "status", kernel_id) or "").lower()
        if "complete" in status:
            return
        if "error" in status or "cancel" in status:
            sys.exit(f"{kernel_id} did not complete: see its log at https://www.kaggle.com/code/{kernel_id}")
        time.sleep(poll)

def pretrain_finished(kernel_id, out):
    """Did the last run of 02 write a finished pretrain/ stage (its manifest.json)?"""
    dest = Path(out) / "02_pretrain_output"
    kaggle("kernels", "output", kernel_id, "-p", str(dest), "--file-pattern", r"manifest\.json$", "-o")
    for manifest in dest.rglob("manifest.json"):
        if json.loads(manifest.read_text()).get("stage") == "pretrain":
            return True
    return False

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
    p.add_argument("--profile", default="t4", help="the profile written into each notebook's parameters cell")
    p.add_argument("--no-wait", action="store_true", help="push and return; do not wait for each run to end")
    p.add_argument("--download", default=".", help="where 04's export/pocketGPT.zip is downloaded")
    p.add_argument("--out", help="folder for the filled copies (default: a new temporary folder)")
    p.add_argument("--notebooks", help=argparse.SUPPRESS)  # the tests point this at tiny notebooks
    p.add_argument("--module", default=str(REPO / "pocketgpt_utils.py"), help=argparse.SUPPRESS)
    p.add_argument("--poll", type=float, default=60, help="seconds between status checks")
    p.add_argument("--dry-run", action="store_true", help="write the filled folders and print the commands only")
    args = p.parse_args(argv)

    data_files = {}  # the names the notebooks look for
    if args.corpus:
        data_files["corpus" if Path(args.corpus).is_dir() else "corpus.txt"] = args.corpus
    if args.dialogs:
        data_files["dialogs.csv"] = args.dialogs
    steps = args.only or (["code"] + (["data"] if data_files else []) + ["01", "02", "03", "04"])
    out = Path(args.out or tempfile.mkdtemp(prefix="pocketgpt-kaggle-"))
    print(f"# filled copies in {out}")
    user, slug, dry = args.username, args.data_slug, args.dry_run

    if "code" in steps:
        meta = write_dataset_folder("code", out, user, slug, {"pocketgpt_utils.py": args.module})
        push_dataset(out / "code", meta, None, dry, args.poll)
    if "data" in steps:
        if not data_files:
            sys.exit("--only data needs --corpus and/or --dialogs")
        meta = write_dataset_folder("data", out, user, slug, data_files)
        push_dataset(out / "data", meta, "zip", dry, args.poll)  # zip: a corpus folder keeps its files

    for name in NOTEBOOKS:
        if name[:2] not in steps:
            continue
        resume = args.resume and name == "02_pretrain"
        meta = write_kernel_folder(name, out, user, slug, args.profile, resume, args.notebooks)
        kaggle("kernels", "push", "-p", str(out / name), dry_run=dry)
        if dry or args.no_wait:
            continue
        wait_for_kernel(meta["id"], args.poll)
        if name == "02_pretrain" and not pretrain_finished(meta["id"], out):
            sys.exit(f"02 stopped at its time budget with a checkpoint. Continue it with\n"
                     f"  python kaggle/push.py --username {user} --only 02 --resume\n"
                     f"and when it has finished: python kaggle/push.py --username {user} --only 03 04")
        if name == "04_eval_export":
            kaggle("kernels", "output", meta["id"], "-p", args.download, "--file-pattern", r"pocketGPT\.zip$", "-o")
            print(f"# pocketGPT.zip is under {Path(args.download) / 'export'}")

if __name__ == "__main__":
    main()
