"""What a longer context costs a T4 in memory, estimated from a CPU measurement of one training micro-batch.

    python tools/context_memory.py [--contexts 384 512 1024] [--batch 2] [--target-batch 32]

The t4 profile's model (the seed's 27M GPT-2, vocab 24000), one micro-batch of `batch` windows at each
context, forward and backward through the training loss (model.LMLoss, the path train() takes), under CPU
autocast in bf16: 2 bytes per element where the T4's fp16 autocast stores 2, and fp32 where both keep fp32
(the loss upcasts the logits). Measured: the bytes of every tensor autograd saves for the backward
(saved_tensors_hooks, each storage counted once) and the largest gradient the backward holds besides them (the
logits' gradient); both grow linearly in the batch, so they are scaled to `target_batch`. Added: what does not
depend on the batch: fp32 weights, their gradients and the optimizers' state (Muon's momentum for the block
matrices, AdamW's two moments for the rest), and the CUDA context (~0.4 GiB on a T4). Prints one JSON line per
context. SDPA on a T4 (sm_75) uses its memory-efficient kernel, as the CPU's flash kernel here: neither saves
the T x T attention matrix, so attention adds O(T) per head, not O(T^2), in both.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg  # noqa: E402

from pocketgpt.model import LMLoss, build_model, count_params  # noqa: E402

GiB = 1024 ** 3
CUDA_CONTEXT = 0.4 * GiB  # what torch's CUDA context takes on a T4 before any tensor (nvidia-smi, typical)
T4_MEMORY = 15.0 * GiB  # what a T4 (16 GB) leaves to torch


def measure(context: int, batch: int) -> dict:
    cfg = pg.make_config(pg.PretrainConfig, "t4", n_positions=context, compile=False)
    model = build_model(24000, cfg)
    loss_fn = LMLoss(model)
    x = torch.randint(0, 24000, (batch, context))
    saved, seen = [0], set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(x, x)
    loss.backward()
    vocab, params = model.config.vocab_size, count_params(model)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n)
    static = 4 * params + 4 * params + 4 * matrices + 8 * (params - matrices)  # weights, grads, Muon, AdamW
    logits_grad = batch * context * vocab * (4 + 2)  # fp32 from the loss, then fp16 into the lm_head matmul
    return {"params": params, "static": static, "saved": saved[0], "logits_grad": logits_grad}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[384, 512, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--target-batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    for context in args.contexts:
        m = measure(context, args.batch)
        scale = args.target_batch / args.batch
        activations = (m["saved"] + m["logits_grad"]) * scale
        peak = CUDA_CONTEXT + m["static"] + activations
        per_row = (m["saved"] + m["logits_grad"]) / args.batch
        fits = int((T4_MEMORY - CUDA_CONTEXT - m["static"]) // per_row)
        print(json.dumps({"context": context, "measured_batch": args.batch, "batch_size": args.target_batch,
                          "saved_for_backward_gib": round(m["saved"] * scale / GiB, 2),
                          "logits_grad_gib": round(m["logits_grad"] * scale / GiB, 2),
                          "static_gib": round(m["static"] / GiB, 2), "t4_peak_estimate_gib": round(peak / GiB, 1),
                          "largest_batch_in_15_gib": fits}), flush=True)


if __name__ == "__main__":
    main()
