"""The command line (`python pocketgpt_utils.py ...`): pipeline, stage, bench, chat, demo-data.

The heavy modules (torch, transformers) are imported once the arguments are read and work starts, so
--help and a mistyped argument answer at once.
Imports: common, files, config and demo (no torch) at the top; the module that does the work, when it starts.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .common import STAGES, PocketGPTError, is_main_process, launcher_mismatch
from .config import PROFILES, SEED
from .demo import DEMO_BYTES, DEMO_DIALOGS
from .files import report_launch_event

STAGE_RUNNERS = {  # stage -> (its config, the module and function that run it)
    "tokenizer": ("TokenizerConfig", "tokenizer", "build_tokenizer_stage"),
    "pretrain": ("PretrainConfig", "pretrain", "run_pretrain_stage"),
    "sft": ("SFTConfig", "sft", "run_sft_stage"),
    "export": ("ExportConfig", "export", "run_export_stage"),
}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocketgpt_utils.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="run notebooks 01-04 with papermill")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: t4 on a GPU, demo on a CPU")
    p.add_argument("--run-dir", help="the run folder (default runs/<profile>)")
    p.add_argument("--corpus", help="your corpus: a file, folder or glob of .txt, .jsonl/.json, .parquet, .csv, .arrow "
                                    "(also .gz, .bz2, .zst) or a save_to_disk folder; `demo` or none: the demo corpus")
    p.add_argument("--dialogs", help="your dialogs: CSV, JSONL or Parquet (a file, folder or glob) as question/answer "
                                     "columns, Alpaca, chat messages or ShareGPT; `demo` or none: the demo dialogs")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), help="run only these stages")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter, e.g. -p max_steps 100")
    d = sub.add_parser("demo-data", help="write the demo corpus.txt and dialogs.csv")
    d.add_argument("--out", required=True)
    d.add_argument("--max-bytes", type=int, default=DEMO_BYTES)
    d.add_argument("--max-dialogs", type=int, default=DEMO_DIALOGS)
    st = sub.add_parser("stage", help="run one stage without a notebook (e.g. under torchrun or accelerate launch)")
    st.add_argument("name", choices=list(STAGES))
    st.add_argument("--profile", choices=sorted(PROFILES), help="default: t4 on a GPU, demo on a CPU")
    st.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    st.add_argument("--config", help="the whole configuration as JSON (what a notebook's launch hands its workers)")
    c = sub.add_parser("chat", help="talk to an exported model (its folder or a .gguf) in the terminal")
    c.add_argument("path", help="04's export folder, its pocketGPT/ folder, or a pocketGPT-*.gguf")
    c.add_argument("--prompt", help="answer this one instruction and exit (for scripts)")
    c.add_argument("--system", help="a system text put before the first instruction")
    c.add_argument("--greedy", action="store_true", help="always the likeliest token (default: the seed's sampling)")
    c.add_argument("--max-new-tokens", type=int, help="longest answer (default: half the context)")
    c.add_argument("--seed", type=int, default=SEED)
    b = sub.add_parser("bench", help="time the training step (tokens/s, MFU) on this device")
    b.add_argument("--profile", default="t4", choices=sorted(PROFILES))
    b.add_argument("--reference", action="store_true", help="also time a plain PyTorch GPT of the same shape")
    b.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="steps to time (their median is reported)")
    b.add_argument("--warmup", type=int, default=argparse.SUPPRESS, help="steps run before the timed ones")
    b.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "pipeline":
            pipeline_command(args)
        elif args.command == "stage":
            stage_command(args)
        elif args.command == "bench":
            bench_command(args)
        elif args.command == "chat":
            from .chat import chat
            return chat(args.path, args.prompt, args.system, args.greedy, args.max_new_tokens, args.seed)
        elif args.command == "demo-data":
            from .demo import make_demo_data
            print(json.dumps(make_demo_data(args.out, args.max_bytes, args.max_dialogs)))
    except PocketGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def pipeline_command(args) -> None:
    import logging  # papermill logs each cell's output: the progress of a headless run

    from .pipeline import parse_value, run_pipeline

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    noise = ("Executing Cell", "Ending Cell", "Input Notebook", "Output Notebook", "Working directory",
             "Executing notebook", "<IPython.core.display.",  # a figure's text stand-in
             "Alternative text is missing")  # nbconvert's note on our figures, once per page

    def keep(record) -> bool:  # a cell's output ends with its own newline: no blank line after each
        record.msg, record.args = record.getMessage().rstrip("\n"), ()
        return not record.msg.startswith(noise) and bool(record.msg.strip())

    logging.getLogger().handlers[0].addFilter(keep)
    params = {k: parse_value(v) for k, v in args.param}
    run_dir = run_pipeline(args.profile, args.run_dir, args.corpus, args.dialogs, params, args.stages)
    print(f"done: {run_dir}")


def stage_command(args) -> None:
    from . import config
    from .pipeline import parse_value

    cls, module, function = STAGE_RUNNERS[args.name]
    if args.config:  # handed over whole by launch(): every field as the notebook resolved it
        cfg = getattr(config, cls)(**json.loads(open(args.config, encoding="utf-8").read())["config"])
    else:
        cfg = config.make_config(getattr(config, cls), args.profile, **{k: parse_value(v) for k, v in args.param})
    note = launcher_mismatch()
    if note and is_main_process():
        print(f"note: {note}", flush=True)
    out = getattr(importlib.import_module(f".{module}", __package__), function)(cfg)
    if not report_launch_event("done", out=str(out)) and is_main_process():  # launch() says it in its own words
        print(f"done: {out}")


def bench_command(args) -> None:
    import torch

    from .bench import bench
    from .config import PretrainConfig, make_config
    from .pipeline import parse_value

    params = {k: parse_value(v) for k, v in args.param}
    try:
        given = {k: v for k, v in vars(args).items() if k in ("steps", "warmup")}  # else bench()'s defaults
        print(json.dumps(bench(args.profile, params, args.reference, **given)))
    except torch.cuda.OutOfMemoryError:
        size = params.get("batch_size", make_config(PretrainConfig, args.profile, run_dir="unused").batch_size)
        raise PocketGPTError(f"bench: out of GPU memory at batch_size={size}: try -p batch_size "
                             f"{max(1, int(size) // 2)}.") from None
