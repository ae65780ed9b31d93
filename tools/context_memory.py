"""What a longer context costs a T4 in memory, estimated from a CPU measurement of one training micro-batch.

    python tools/context_memory.py [--contexts 384 512 1024] [--batch 2] [--target-batch 32]

The t4 profile's model (the seed's 27M GPT-2, vocab 24000), one micro-batch of `batch` windows at each
context, forward and backward through the training loss (model.LMLoss, the path train() takes), under CPU
autocast in bf16: 2 bytes per element where the T4's fp16 autocast stores 2, and fp32 where both keep fp32
(the loss upcasts the logits). Measured: the bytes of every tensor autograd saves for the backward
(saved_tensors_hooks, each storage counted once) and the largest gradient the backward holds besides them (the
logits' gradient), at two batch sizes: the difference is what a row of the batch costs, scaled to `target_batch`;
the rest does not grow with the batch (autocast's bf16 copies of the weights), and with it what else does not: fp32 weights, their gradients and the optimizers' state (Muon's momentum for the block
matrices, AdamW's two moments for the rest). The sum is compared with what a T4 leaves to tensors
(bench.T4_USABLE_GIB, the CUDA context already taken out); it is about what the allocator allocates at peak
(what it reserves is more by its cache). Prints one JSON line per context. SDPA on a T4 (sm_75) uses its memory-efficient kernel, as the CPU's flash kernel here: neither saves
the T x T attention matrix, so attention adds O(T) per head, not O(T^2), in both.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pocketgpt_utils as pg  # noqa: E402

from pocketgpt.bench import T4_USABLE_GIB  # noqa: E402
from pocketgpt.model import LMLoss, build_model, count_params  # noqa: E402

GiB = 1024 ** 3


def measure(context: int, batch: int) -> dict:
    cfg = pg.make_config(pg.PretrainConfig, "t4", n_positions=context, compile=False)
    model = build_model(24000, cfg)
    loss_fn = LMLoss(model)
    x = torch.randint(0, 24000, (batch, context))
    saved, seen = [0], {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights: counted as static

    def pack(t):
        key = t.untyped_storage().data_ptr()
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
        # two batch sizes: what grows with the batch (per row) and what does not (autocast's bf16 weight copies)
        one, m = measure(context, args.batch // 2), measure(context, args.batch)
        per_row = (m["saved"] - one["saved"]) / (args.batch - args.batch // 2) + m["logits_grad"] / args.batch
        fixed = m["static"] + m["saved"] - (m["saved"] - one["saved"]) / (args.batch - args.batch // 2) * args.batch
        peak = fixed + per_row * args.target_batch
        print(json.dumps({"context": context, "measured_batches": [args.batch // 2, args.batch],
                          "batch_size": args.target_batch,
                          "activations_per_row_mib": round(per_row / 2 ** 20, 1),
                          "fixed_gib": round(fixed / GiB, 2), "t4_peak_estimate_gib": round(peak / GiB, 1),
                          "largest_batch_that_fits_t4": int((T4_USABLE_GIB * GiB - fixed) // per_row)}), flush=True)


if __name__ == "__main__":
    main()
