"""Optimizers and the learning-rate schedule: Muon for the blocks' matrices, AdamW for the rest; WSD or cosine.

Imports: device (the precision of Newton-Schulz).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .device import newton_schulz_precision


def lr_at(step: int, cfg, max_steps: int | None = None, warmup_steps: int | None = None) -> float:
    """AdamW's learning rate for `step` (Muon's is the same fraction of its own peak).

    A linear warmup, then wsd: constant, and a linear decay over the last decay_fraction of max_steps;
    or cosine: a cosine decay. Both reach min_lr on the last step, and both are pure functions of the
    step, so a resumed run continues the same curve. Before max_steps="auto" is planned (the first
    steps) the rate is the warmup's or the peak. `max_steps` and `warmup_steps`: the run's plan, where it
    is not cfg's (max_steps="auto" planned, SFT's epochs counted); None: cfg's.
    """
    max_steps = cfg.max_steps if max_steps is None else max_steps
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if not isinstance(max_steps, int):
        return cfg.learning_rate
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        progress = (step + 1 - (max_steps - decay_steps)) / decay_steps
        return cfg.learning_rate + min(1.0, max(0.0, progress)) * (cfg.min_lr - cfg.learning_rate)
    progress = min(1.0, (step + 1 - warmup) / max(1, max_steps - warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz: g's nearest semi-orthogonal matrix, roughly (U S' V^T with S' ~ 1), in `dtype`.

    The quintic iteration and coefficients of torch.optim.Muon (Keller Jordan's), in public ops. bf16 as
    torch's, where the device computes it natively; fp32 elsewhere (device.newton_schulz_dtype): a T4 only
    emulates bf16, and fp16 is known to be unstable for this iteration."""
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz in bf16, RMS matched to AdamW's:
    0.2 * sqrt(max(rows, cols)), decoupled weight decay), plus one thing it cannot do: GPT-2 fuses
    Q, K and V in one matrix (in x 3*in), and Muon here orthogonalizes it as three square blocks.
    Measured on the demo model, three seeds: 0.6-0.8% lower val loss than the fused matrix (README,
    "Training recipe"). Without a fused matrix it equals torch.optim.Muon to the bit (a test holds
    it so), and it needs no torch >= 2.9. Rows or columns, the update is the same up to transpose:
    HF's Conv1D (in x out) layout needs no special case."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 split_qkv: bool = True, newton_schulz: str = "bf16"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      split_qkv=split_qkv, newton_schulz=newton_schulz))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                long = int(p.size(1) >= p.size(0))
                # a checkpoint from before the choice ran bf16; a resumed run keeps the precision it started with
                dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[group.get("newton_schulz", "bf16")]
                if group["split_qkv"] and p.size(long) == 3 * p.size(1 - long):  # Q|K|V side by side
                    update = torch.cat([orthogonalize(b, dtype=dtype) for b in update.chunk(3, dim=long)], dim=long)
                    scale = 0.2 * p.size(1 - long) ** 0.5  # each block is square
                else:
                    update, scale = orthogonalize(update, dtype=dtype), 0.2 * max(p.shape) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def make_optimizers(model, cfg, device) -> list:
    """The optimizers of one training step, each param group with its `peak_lr` for the schedule.

    optimizer="muon": Muon for every 2-D weight that is not an embedding (the blocks' attention and
    MLP matrices; the tied lm_head is the token embedding), AdamW for the embeddings, biases and
    norms, as modded-nanogpt and nanochat split them. optimizer="adamw": AdamW for all, weight
    decay on matrices only. Fused kernels for AdamW on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = [p for p in params if cfg.optimizer == "muon" and p.dim() == 2 and id(p) not in embeddings]
    rest = [p for p in params if id(p) not in {id(h) for h in hidden}]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, split_qkv=cfg.muon_split_qkv,
                newton_schulz=newton_schulz_precision(cfg.newton_schulz, device)) if hidden else None
    optimizers = [adamw] + ([muon] if muon else [])
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers, step: int, cfg, max_steps: int | None = None, warmup_steps: int | None = None) -> float:
    """Every group at the schedule's fraction of its own peak; returns AdamW's rate (the one logged)."""
    lr = lr_at(step, cfg, max_steps, warmup_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr / cfg.learning_rate
    return lr
