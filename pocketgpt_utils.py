"""
pocketGPT: the notebooks' one import (`import pocketgpt_utils as pg`) and the command line.

The code lives in the package pocketgpt/, one module per step, in pipeline order; each imports only
the ones above it:

    common     errors, special tokens, where a run lives, which process writes, progress, numbers for people
    files      the one write door: atomic, rank 0 only, a full disk said once
    data       a file's format, size and fingerprint; the files a parameter names; tables (strict CSV)
    config     profiles and the stage configurations: every default, once
    corpus     a corpus as documents in every format and shape; long ones in pieces; the scan before 01
    demo       the demo corpus and dialogs, from the installed ML libraries' docstrings
    stages     a stage folder: its file names, finding it, resuming it, its phases and status line
    tokenizer  01: the byte-level BPE, train.bin / val.bin
    device     the precision for this device, peak FLOPS
    model      GPT2LMHeadModel, its loss, loading and generating; growing its position table
    optim      Muon, AdamW, the WSD / cosine schedule
    batches    pretraining windows, SFT rows, DPO pairs; the fixed evaluation samples
    checkpoint a run's resumable state and the checkpoint file: read as data only, restored, random streams
    step       one optimizer step, one evaluation; the first step fitted to the device (compile, micro-batch)
    budget     this session's clock (max_hours) and the open log window
    train      the loop every stage trains with, ending in its own last pass
    launch     a stage on every GPU from a notebook: torchrun as the kernel's child, never a fork
    plots      the figures
    dialogs    the seed's chat template, the four dialog layouts, their ids
    pretrain   02, whole; init_from (a finished run's model starts a new run, its context may grow)
    dpo        03's optional preference phase
    sft        03, whole
    evaluate   losses on the held-out samples, answer quality
    gguf       GGUF files for llama.cpp, written from a Hugging Face folder
    llama      a GGUF in llama.cpp: checked against Hugging Face, timed; 04's GGUF files
    seed_check the seed's inference code on an exported folder, in a fresh process
    export     04, whole: the report card and the pocketGPT folder
    chat       a conversation with an export folder or a GGUF, in the terminal
    bench      tokens/s and MFU of the training step, against a plain PyTorch GPT
    pipeline   notebooks 01 -> 04 under papermill
    cli        the commands below

Run the whole suite headless (papermill runs notebooks/01..04, each stage's folder feeds the next):
    python pocketgpt_utils.py pipeline --profile demo
Make the demo corpus and dialogs:
    python pocketgpt_utils.py demo-data --out DIR
Time a training step on this device:
    python pocketgpt_utils.py bench --profile t4 --reference
Talk to an exported model:
    python pocketgpt_utils.py chat runs/demo/export
"""
import importlib
import sys

# the names the notebooks and users call, by the module that holds each; anything else is the package's own
NAMES = {
    "common": ["PocketGPTError", "read_json"],
    "config": ["PROFILES", "resolve_profile", "make_config", "TokenizerConfig", "PretrainConfig", "SFTConfig",
               "ExportConfig"],
    "demo": ["make_demo_data"],
    "stages": ["StageDir", "find_stage", "stage_status"],
    "tokenizer": ["build_tokenizer_stage", "compression_table", "load_tokenizer", "sample_tokenizations"],
    "model": ["load_model"],
    "pretrain": ["describe_pretrain", "run_pretrain_stage"],
    "launch": ["launch"],
    "sft": ["run_sft_stage", "data_report_rows", "compare_answers"],
    "evaluate": ["sample_continuations", "quality_table", "plot_quality", "ask"],
    "export": ["run_export_stage", "report_rows", "export_checks", "show_report"],
    "plots": ["plot_length_distributions", "plot_losses", "table", "metrics_rows"],
    "chat": ["chat"],
    "bench": ["bench"],
    "pipeline": ["run_pipeline"],
    "cli": ["main"],
}
MODULE_OF = {name: module for module, names in NAMES.items() for name in names}


def __getattr__(name):
    """`pg.make_config` imports pocketgpt.config when first asked for: the command line's --help and its
    checks answer without importing torch, and a notebook loads each module when it first uses it."""
    if name not in MODULE_OF:
        raise AttributeError(f"pocketgpt_utils has no {name!r}: it offers {', '.join(sorted(MODULE_OF))} "
                             f"(the rest is in the package pocketgpt/)")
    return getattr(importlib.import_module(f"pocketgpt.{MODULE_OF[name]}"), name)


def __dir__():
    return sorted([*MODULE_OF, "NAMES", "MODULE_OF"])


if __name__ == "__main__":
    from pocketgpt.cli import main

    sys.exit(main())
