"""Profiles and the stage configurations: every default is written here, once.

Each stage's dataclass holds its defaults, and they are the seed's real run (the `t4` profile); the
`demo` profile lists only what it changes. A notebook parameter left None takes the profile's value;
the notebooks' comments and the README's table are checked against these (tests/test_pipeline.py).
A configuration is read, never rewritten: what a run decides on the way (a step plan) lives in the
run's own state (train.RunState).
Imports: common, data (data_format; torch only to ask whether a GPU is here).
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import ClassVar

from .common import SPECIAL_TOKENS, PocketGPTError, default_run_dir
from .data import data_format

SEED = 1337  # the default seed of everything seeded: the stages, sampling answers, the chat
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "n_positions")  # what a checkpoint's weights must match to load

PROFILES = {
    "t4": {},  # the dataclass defaults: the seed's 27M GPT-2, batches that fill a 16 GB T4
    "demo": {  # a tiny model that trains in minutes on a laptop CPU
        "tokenizer": dict(vocab_size=4096),
        "pretrain": dict(n_layer=4, n_head=4, n_embd=128, n_positions=128, batch_size=16, grad_accum_steps=1,
                         learning_rate=2e-3, muon_lr=4e-3, min_lr=2e-4, warmup_steps=30, max_steps="auto", max_hours=0.1,
                         log_interval=50, eval_interval=200, checkpoint_minutes=5, eval_windows=256),
        "sft": dict(epochs=2, batch_size=32, learning_rate=5e-4, max_hours=0.06, log_interval=25,
                    eval_interval=100, checkpoint_minutes=5),
    },
}


def resolve_profile(profile: str | None) -> tuple[str, str]:
    """None means `t4` where there is a GPU and `demo` on a CPU; returns the name and why.

    A user who attaches a corpus and presses Run All on a T4 must get the 27M model, not the
    1.3M-parameter demo."""
    if profile is not None:
        if profile not in PROFILES:
            raise PocketGPTError(f"profile={profile!r} is unknown: use one of {sorted(PROFILES)}, "
                                 f"or None (t4 on a GPU, demo on a CPU).")
        return profile, "set by the profile parameter"
    import torch

    if torch.cuda.is_available():
        return "t4", f"profile=None and a GPU is here ({torch.cuda.get_device_name(0)})"
    return "demo", "profile=None and no GPU is here: the tiny demo model (set profile='t4' for the 27M one)"


def make_config(cls, profile: str | None, **given):
    """Build a stage's dataclass: explicit values, else the profile's, else the field default. A name the
    stage does not take is an error, with the names closest to it."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [f"{name}: did you mean {' or '.join(close)}?" for name in unknown
                 if (close := difflib.get_close_matches(name, known, n=3, cutoff=0.6))]
        raise PocketGPTError(f"{cls.__name__} takes no parameter {', '.join(unknown)}"
                             + (f" ({' '.join(hints)})" if hints else "") + f". Its parameters: {', '.join(known)}.")
    profile, _ = resolve_profile(profile)
    values = {**PROFILES[profile].get(cls.stage, {}), **{k: v for k, v in given.items() if v is not None}}
    return cls(**{**values, "profile": profile})


@dataclasses.dataclass
class StageConfig:
    """What every stage has: its profile, its run folder (runs/<profile> here, /kaggle/working on Kaggle),
    the seed, and its own folder in the run (out_dir, default <run_dir>/<stage>)."""
    stage: ClassVar[str] = ""
    profile: str = "t4"
    run_dir: str | None = None
    seed: int = SEED
    out_dir: str | None = None

    def __post_init__(self):
        self.run_dir = str(self.run_dir or default_run_dir(self.profile))
        self.out_dir = str(self.out_dir or Path(self.run_dir) / self.stage)


# How a .txt corpus is cut into documents (01's `documents`): the text between blank lines, each line, or
# the whole file; "auto": blank_lines where the file has a blank line between text, else lines.
DOCUMENTS = ("auto", "blank_lines", "lines", "whole_file")


@dataclasses.dataclass
class TokenizerConfig(StageConfig):
    stage: ClassVar[str] = "tokenizer"
    corpus_path: str | None = None        # file, folder or glob; None = the demo corpus in the run folder
    text_column: str | None = None        # JSONL/Parquet/CSV/Arrow: the column of documents; None: detected
    vocab_size: int = 24000
    val_fraction: float = 0.01
    on_invalid_utf8: str = "fail"         # "fail" or "replace" (with U+FFFD)
    documents: str = "auto"               # a .txt's documents: auto | blank_lines | lines | whole_file (DOCUMENTS)
    bpe_sample_bytes: int = 256_000_000   # the BPE learns from an even sample of at most this much text

    def __post_init__(self):
        super().__post_init__()
        if not 260 <= int(self.vocab_size) <= 65535:  # 256 bytes + 4 specials; uint16 .bin files
            raise PocketGPTError(f"vocab_size={self.vocab_size}: must be between 260 (256 byte tokens + "
                                 f"{len(SPECIAL_TOKENS)} special tokens) and 65535 (ids are stored as uint16).")
        if not 0 < float(self.val_fraction) < 0.5:
            raise PocketGPTError(f"val_fraction={self.val_fraction}: use a fraction between 0 and 0.5, e.g. 0.01.")
        if self.on_invalid_utf8 not in ("fail", "replace"):
            raise PocketGPTError(f"on_invalid_utf8={self.on_invalid_utf8!r}: use 'fail' or 'replace'.")
        if self.documents not in DOCUMENTS:
            raise PocketGPTError(f"documents={self.documents!r}: use one of {', '.join(DOCUMENTS)} (auto: blank_lines "
                                 f"where a .txt has a blank line between text, else lines).")
        if int(self.bpe_sample_bytes) < 1_000_000:
            raise PocketGPTError(f"bpe_sample_bytes={self.bpe_sample_bytes}: give at least 1000000 (1 MB) of text "
                                 f"for the BPE to learn from.")


@dataclasses.dataclass
class TrainConfig(StageConfig):
    """What the training loop reads: 02's and 03's configurations extend it (defaults: 02 on the t4 profile)."""
    resume_from: str | None = None        # a stage folder (or its .partial) holding ckpt.pt; "auto": this run's newest
    dropout: float = 0.0
    batch_size: int = 32                  # sequences per device per micro-step
    grad_accum_steps: int = 4
    optimizer: str = "muon"               # muon: Muon for the blocks' weight matrices, AdamW for the rest; or adamw
    learning_rate: float = 6e-4           # AdamW's peak (embeddings, biases, norms; every weight with adamw)
    muon_lr: float = 1.2e-3               # Muon's peak, scaled per matrix to AdamW's update size (match_rms_adamw)
    muon_split_qkv: bool = True           # Muon orthogonalizes GPT-2's fused Q|K|V as three blocks (measured better)
    newton_schulz: str = "auto"           # Muon's Newton-Schulz: auto (bf16 where native, else fp32) | bf16 | fp32
    min_lr: float = 6e-5                  # the end of the schedule (Muon's ends at the same fraction of its peak)
    schedule: str = "wsd"                 # wsd: warmup, constant, then a linear decay; cosine: warmup, then cosine
    decay_fraction: float = 0.2           # wsd: the share of max_steps spent decaying
    warmup_steps: int = 500
    max_steps: int | str = "auto"         # auto: as many steps as fit this session's max_hours, decay included
    max_hours: float = 11.25              # this session's budget: stop cleanly (checkpoint, eval, plots) before it
    log_interval: int = 500
    eval_interval: int = 1000
    checkpoint_minutes: float = 30
    precision: str = "auto"               # auto | fp32 | bf16 | fp16
    compile: str | bool = "auto"          # auto = on a GPU
    log_with: str | list | None = None    # accelerate's trackers to send every log row to: tensorboard, wandb, trackio, ...
    processes: int | None = None          # None: one per GPU here (one on a CPU); a number: that many (CPUs: over gloo)
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_training_params(self)


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    stage: ClassVar[str] = "pretrain"
    tokenizer_dir: str | None = None      # None: found by manifest (run folder, or /kaggle/input)
    init_from: str | None = None          # a finished pretrain folder whose model starts this run (fresh optimizer
                                          # and schedule; same tokenizer and shape; n_positions may grow)
    n_layer: int = 10
    n_head: int = 6
    n_embd: int = 384
    n_positions: int = 384
    eval_windows: int = 1024              # val windows in the fixed evaluation sample (all of val when it has fewer)
    max_epochs: float = 16                # max_steps="auto" plans no more passes over train.bin than this (README: why 16)

    def __post_init__(self):
        super().__post_init__()
        check_model_shape(self)
        if not self.max_epochs > 0:
            raise PocketGPTError(f"max_epochs={self.max_epochs} must be positive (a large number: no limit).")


def check_model_shape(cfg) -> None:
    for name in MODEL_SHAPE:
        if int(getattr(cfg, name)) < 1:
            raise PocketGPTError(f"{name}={getattr(cfg, name)} must be a positive integer.")
    if cfg.n_embd % cfg.n_head:
        divisors = [h for h in range(1, 17) if cfg.n_embd % h == 0]
        raise PocketGPTError(f"n_head={cfg.n_head} does not divide n_embd={cfg.n_embd}: "
                             f"use one of {divisors} (or change n_embd).")


def check_trackers(log_with) -> None:
    """accelerate drops a tracker whose package is missing with a log line; here it is an error."""
    from accelerate import utils as acc_utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in [log_with] if isinstance(log_with, str) else list(log_with):
        if name not in LOGGER_TYPE_TO_CLASS:
            raise PocketGPTError(f"log_with={log_with!r}: {name!r} is not one of accelerate's trackers "
                                 f"({', '.join(LOGGER_TYPE_TO_CLASS)}).")
        if not getattr(acc_utils, f"is_{name}_available", lambda: True)():
            raise PocketGPTError(f"log_with={log_with!r}: the {name} package is not installed (pip install {name}).")


def check_training_params(cfg) -> None:
    if cfg.log_with:
        check_trackers(cfg.log_with)
    if cfg.processes is not None and not (isinstance(cfg.processes, int) and cfg.processes >= 1):
        raise PocketGPTError(f"processes={cfg.processes!r}: use None (one per GPU here) or a positive number.")
    for name in ["batch_size", "grad_accum_steps", "log_interval", "eval_interval"]:
        if int(getattr(cfg, name)) < 1:
            raise PocketGPTError(f"{name}={getattr(cfg, name)} must be a positive integer.")
    if not 0 <= cfg.dropout < 1:
        raise PocketGPTError(f"dropout={cfg.dropout} must be in [0, 1).")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise PocketGPTError(f"precision={cfg.precision!r}: use 'auto', 'fp32', 'bf16' or 'fp16'.")
    if not 0 < cfg.max_hours:
        raise PocketGPTError(f"max_hours={cfg.max_hours} must be positive.")
    if cfg.newton_schulz not in ("auto", "bf16", "fp32"):
        raise PocketGPTError(f"newton_schulz={cfg.newton_schulz!r}: use 'auto', 'bf16' or 'fp32'.")
    if cfg.optimizer not in ("muon", "adamw"):
        raise PocketGPTError(f"optimizer={cfg.optimizer!r}: use 'muon' or 'adamw'.")
    if cfg.schedule not in ("wsd", "cosine"):
        raise PocketGPTError(f"schedule={cfg.schedule!r}: use 'wsd' (warmup, stable, decay) or 'cosine'.")
    if not 0 < cfg.decay_fraction <= 1:
        raise PocketGPTError(f"decay_fraction={cfg.decay_fraction} must be in (0, 1], e.g. 0.2.")
    if cfg.max_steps not in (None, "auto") and not (isinstance(cfg.max_steps, int) and cfg.max_steps > 0):
        raise PocketGPTError(f"max_steps={cfg.max_steps!r}: use a positive number of steps, or 'auto' to fill "
                             f"this session's max_hours.")


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    stage: ClassVar[str] = "sft"
    pretrain_dir: str | None = None       # None: found by manifest
    dialogs_path: str | None = None       # CSV, JSONL, Parquet (a file, folder or glob); None: the demo dialogs
    prompt_column: str | None = None      # None: detected (question/answer, instruction/response, ...)
    response_column: str | None = None
    epochs: float = 3
    batch_size: int = 64
    grad_accum_steps: int = 1
    optimizer: str = "adamw"              # finetuning keeps AdamW (not measured against Muon here)
    learning_rate: float = 1e-4
    min_lr: float | None = None           # None: learning_rate / 10
    schedule: str = "cosine"
    warmup_steps: int | None = None       # None: 3% of the steps
    max_steps: int | None = None          # None: epochs x batches per epoch (counted once the data is read)
    val_fraction: float = 0.05
    too_long: str = "truncate"            # rows longer than the context: "truncate" the answer or "drop"
    log_interval: int = 100
    eval_interval: int = 1000
    eval_rows: int = 2000                 # held-out rows in the fixed evaluation sample (all when there are fewer)
    weight_decay: float = 0.0
    dropout: float = 0.0                  # applied to the pretrained model's dropout layers during SFT
    preference: str | None = None         # a second phase, DPO: None (off); "self": the SFT model's own answers
                                          # as the rejected ones; or a file of prompt, chosen, rejected
    beta: float = 0.1                     # DPO: how far the tuned model may move from the SFT model (lower: farther)
    rpo_alpha: float = 1.0                # DPO: plus this much of the chosen answers' NLL (RPO; 0: plain DPO)
    preference_learning_rate: float = 1e-4  # with beta 0.1 and rpo_alpha 1: the best measured (README, Preference tuning)
    preference_epochs: float = 1
    preference_rows: int = 2000           # "self": pairs built from this many training prompts

    def __post_init__(self):
        self.min_lr = self.learning_rate / 10 if self.min_lr is None else self.min_lr
        super().__post_init__()
        if self.too_long not in ("truncate", "drop"):
            raise PocketGPTError(f"too_long={self.too_long!r}: use 'truncate' or 'drop'.")
        if not self.epochs > 0:
            raise PocketGPTError(f"epochs={self.epochs} must be positive.")
        if self.preference not in (None, "self") and not (Path(self.preference).is_file()
                                                          or data_format(self.preference) == "saved"):
            raise PocketGPTError(f"preference={self.preference!r}: use None, 'self' (pairs from the SFT model's own "
                                 f"answers) or the path of a file (CSV, JSONL, Parquet) with prompt, chosen and "
                                 f"rejected columns.")
        if not self.beta > 0:
            raise PocketGPTError(f"beta={self.beta} must be positive, e.g. 0.1.")


@dataclasses.dataclass
class ExportConfig(StageConfig):
    stage: ClassVar[str] = "export"
    tokenizer_dir: str | None = None
    pretrain_dir: str | None = None
    sft_dir: str | None = None
    prompts: list | None = None           # extra instructions to answer, after the fixed ones
    gguf_types: list | None = None        # None: ["f16", "q8_0"]; [] skips GGUF

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.gguf_types = ["f16", "q8_0"] if self.gguf_types is None else list(self.gguf_types)
