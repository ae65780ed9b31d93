"""The benchmark: tokens/s (and MFU on a GPU) of the training step, against a plain PyTorch GPT of the same shape.

Imports: common, config, device, model, optim, step.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from .common import HERE
from .config import PretrainConfig, TokenizerConfig, make_config
from .device import choose_precision, device_name, peak_flops, resolve_compile
from .model import LMLoss, build_model, count_params, flops_per_token
from .optim import make_optimizers
from .step import StepParts, train_step


class PlainGPT(nn.Module):
    """The reference for `bench --reference`: a GPT-2 of the same shape in plain PyTorch
    (fused QKV nn.Linear, SDPA, F.cross_entropy on pre-shifted targets), as in nanoGPT."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, n_positions):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd), proj=nn.Linear(n_embd, n_embd),
            ln2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, 4 * n_embd), out=nn.Linear(4 * n_embd, n_embd),
        )) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, x, y):
        B, T = x.shape
        h = self.wte(x) + self.wpe(torch.arange(T, device=x.device))
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(h)).split(h.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b.proj(a.transpose(1, 2).reshape(B, T, -1))
            h = h + b.out(F.gelu(b.fc(b.ln2(h)), approximate="tanh"))
        logits = F.linear(self.ln_f(h), self.wte.weight)  # tied embeddings
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def step_timer(loss_module, cfg, vocab_size: int, precision: str, compiled: bool):
    """A function that runs one full optimizer step (forward, backward, clip, AdamW/Muon) on random
    tokens and returns its seconds; the first calls pay for warm-up (and compilation)."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    loss_module.to(acc.device).train()
    optimizers = make_optimizers(loss_module, cfg, acc.device)
    scaler = torch.amp.GradScaler(acc.device.type, enabled=precision == "fp16")
    fn = torch.compile(loss_module) if compiled else loss_module
    g = torch.Generator().manual_seed(0)
    batches = [(lambda r: (r[:, :-1].contiguous(), r[:, 1:].contiguous()))(
        torch.randint(0, vocab_size, (cfg.batch_size, cfg.n_positions + 1), generator=g))
        for _ in range(cfg.grad_accum_steps)]
    parts = StepParts(acc, fn, optimizers, scaler, precision, cfg.grad_clip)
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)

    def one_step() -> float:
        sync()
        started = time.perf_counter()
        train_step(parts, batches)
        sync()
        return time.perf_counter() - started
    return one_step


T4_USABLE_GIB = 14.0  # a T4's 16 GB shows as 14.7 GiB to CUDA, less the context and kernels (~0.5 GiB)


def t4_memory(device, cfg) -> dict:
    """The peak GPU memory of the training step since the last reset, and whether that micro-batch
    fits a T4: what the allocator reserved (allocated plus its cache) against T4_USABLE_GIB."""
    if device.type != "cuda":
        return {"peak_memory_gib": None, "peak_reserved_gib": None, "fits_t4": None,
                "t4_memory": "not measured: no GPU here"}
    allocated, reserved = (f(device) / 2 ** 30 for f in (torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved))
    fits = reserved <= T4_USABLE_GIB
    return {"peak_memory_gib": round(allocated, 2), "peak_reserved_gib": round(reserved, 2), "fits_t4": fits,
            "t4_memory": f"batch_size={cfg.batch_size} x {cfg.n_positions} tokens: {reserved:.1f} GiB reserved at peak "
                         f"({allocated:.1f} GiB allocated) of the {T4_USABLE_GIB:.0f} GiB a 16 GB T4 leaves: "
                         + ("fits" if fits else f"does not fit: lower batch_size (now {cfg.batch_size}) and raise "
                                                f"grad_accum_steps by the same factor")}


def bench(profile: str, params: dict | None = None, reference: bool = False, steps: int = 10,
          warmup: int = 3) -> dict:
    """The `bench` command: one JSON-able dict of the training step's speed on this device.

    With `reference`, the two models take turns step by step and each reports its median step, so
    a noisy machine (other processes, turbo clocks) slows both alike instead of skewing the ratio.
    Ours warms up first and alone, so the peak GPU memory it reports (and whether that micro-batch
    fits a T4's 16 GB) is the step's own; the reference joins after it.
    """
    params = dict(params or {})
    vocab_size = int(params.pop("vocab_size", make_config(TokenizerConfig, profile, run_dir="unused").vocab_size))
    cfg = make_config(PretrainConfig, profile, run_dir=str(HERE / "runs" / "bench"), **params)
    precision, compiled = choose_precision(cfg.precision), resolve_compile(cfg.compile, cfg.max_hours)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(vocab_size, cfg)
    flops, peak = flops_per_token(model), peak_flops(device, precision)
    timers = {"ours": step_timer(LMLoss(model), cfg, vocab_size, precision, compiled)}
    first_step_s = timers["ours"]()  # the first step compiles and allocates the optimizer's state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, warmup - 1)):  # ours warms up alone: its peak memory is its own, not the reference's too
        timers["ours"]()
    memory = t4_memory(device, cfg)
    if reference:
        torch.manual_seed(cfg.seed)
        plain = PlainGPT(vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions)
        timers["reference"] = step_timer(plain, cfg, vocab_size, precision, compiled)
        for _ in range(warmup):
            timers["reference"]()
    seconds = {k: [] for k in timers}
    for _ in range(steps):
        for name, timer in timers.items():
            seconds[name].append(timer())
    tokens = cfg.batch_size * cfg.grad_accum_steps * cfg.n_positions
    tps = {k: tokens / float(np.median(v)) for k, v in seconds.items()}
    out = {"profile": profile, "params": count_params(model), "tokens_per_s": round(tps["ours"]),
           "mfu": round(flops * tps["ours"] / peak, 4) if peak else None, "device": device_name(device),
           "precision": precision, "compiled": compiled, "batch": [cfg.batch_size, cfg.n_positions],
           "optimizer": cfg.optimizer,
           "grad_accum_steps": cfg.grad_accum_steps, "steps": steps, "step_s": round(float(np.median(seconds["ours"])), 4),
           "first_step_s": round(first_step_s, 2),  # compiling (with compile on) and the first allocations
           "torch": torch.__version__, **memory}
    if reference:
        out["reference"] = {"params": sum(p.numel() for p in plain.parameters()), "tokens_per_s": round(tps["reference"]),
                            "mfu": round(flops * tps["reference"] / peak, 4) if peak else None}
        out["ratio"] = round(tps["ours"] / tps["reference"], 3)
    return out
