"""The model: Hugging Face's GPT2LMHeadModel, so every stage saves a standard folder, and what it does.

Owns: building the seed's GPT-2 (tied embeddings, SDPA, fused tanh GELU), its FLOPs per token, growing a trained
model's learned position embeddings to a longer context (grow_positions), the loss taken from the hidden states
on pre-shifted targets (LMLoss), loading a saved folder and generating from it (one prompt, or many in
left-padded batches) as the seed samples.
Imports: common, config.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from .common import BOS_ID, EOS_ID, IGNORE_ID, PAD_ID, PocketGPTError, progress, quiet_library_bars
from .config import SEED


def build_model(vocab_size: int, cfg):
    """A GPT-2 with tied embeddings and SDPA attention; the seed fixes the initial weights."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        attn_implementation="sdpa",
        # GPT-2's tanh GELU as one fused kernel; the default "gelu_new" is the same formula in six
        # elementwise ops, which cost ~15% of a CPU training step
        activation_function="gelu_pytorch_tanh")
    config.n_ctx = cfg.n_positions  # llama.cpp's own converter reads n_ctx; costs nothing
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


GROW_POSITIONS = "interpolate"  # how init_from grows a context: lower loss than "copy" at every position bucket
                                # (tools/context_grow.py; README: A longer context)


def grow_positions(wpe: torch.Tensor, n_positions: int, how: str = GROW_POSITIONS) -> torch.Tensor:
    """A trained model's learned position embeddings (n_old x n_embd) for a longer context (n_positions rows).

    copy: the trained rows stay where they are and the new positions repeat them (position n_old + i gets
    row i), so everything the model learned for the first n_old positions holds unchanged.
    interpolate: the trained table stretched over the new length (linear, ends kept), as position
    interpolation does for rotary models: every position moves, the shape of the table stays."""
    n_old = wpe.shape[0]
    if n_positions < n_old:
        raise ValueError(f"grow_positions: {n_positions} is shorter than the {n_old} trained positions")
    if how == "copy":
        return wpe[torch.arange(n_positions) % n_old].clone()
    if how == "interpolate":
        return F.interpolate(wpe.T[None].float(), size=n_positions, mode="linear",
                             align_corners=True)[0].T.to(wpe.dtype).contiguous()
    raise ValueError(f"grow_positions: how={how!r}, use 'copy' or 'interpolate'")


def count_params(model) -> int:
    """Unique parameters (the tied lm_head is the embedding, counted once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention (PaLM appendix B)."""
    c = model.config
    n = count_params(model) - c.n_positions * c.n_embd  # position embeddings do no matmuls
    return 6 * n + 12 * c.n_layer * c.n_embd * c.n_positions


class LMLoss(nn.Module):
    """Next-token cross-entropy on pre-shifted targets, straight from the hidden states.

    The stock `labels=` path shifts and copies the logits and upcasts them to fp32 before the
    loss; here the targets are already shifted (y = x moved by one) and cross_entropy reads
    the logits as they are, which is what makes the HF model as fast as a plain one.
    Targets of -100 (padding, SFT prompts) are ignored. `padded` batches (SFT: rows padded on the
    right with <pad>) pass their mask: the causal mask already keeps every real token from seeing
    the padding after it, so the loss is the same, and transformers has no padding to warn about.
    Pretraining windows hold no padding and pass none (the fast causal-only attention path).
    """

    stat_names = ()  # what else each step reports besides the loss (DPOLoss: reward accuracy and margin)

    def __init__(self, model, padded: bool = False):
        super().__init__()
        self.model, self.padded = model, padded

    @staticmethod
    def units(y) -> int:
        """What the loss is averaged over: target tokens."""
        return int((y != IGNORE_ID).sum())

    def forward(self, x, y, reduction: str = "mean"):
        mask = (x != PAD_ID).long() if self.padded else None
        h = self.model.transformer(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state  # no KV cache
        logits = self.model.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=IGNORE_ID,
                               reduction=reduction)


SAMPLING = dict(do_sample=True, top_p=0.9, temperature=0.8)  # the seed's sampling
ANSWER_TOKENS = 64  # new tokens of an answer shown to read, where the caller does not say


@quiet_library_bars()
def load_model(folder):
    """A saved model folder, its weights from model.safetensors (plain data, never a pickle: a pytorch_model.bin
    beside it is not read), with an error that names the folder when it is not one."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PocketGPTError(f"{folder} holds no config.json: point at a model folder a pocketGPT stage wrote.")
    if not (folder / "model.safetensors").is_file():
        raise PocketGPTError(f"{folder} holds no model.safetensors, so it was not loaded: pocketGPT reads a model's "
                             f"weights from safetensors only (a pytorch_model.bin is a pickle, which can run code "
                             f"when read). Point at a model folder a pocketGPT stage wrote, or save this model with "
                             f"save_pretrained, which writes model.safetensors.")
    model = GPT2LMHeadModel.from_pretrained(str(folder), use_safetensors=True)
    return model.eval()


def generate(model, prompt_ids: list[int], max_new_tokens: int = ANSWER_TOKENS, greedy: bool = False,
             seed: int = SEED, streamer=None) -> list[int]:
    """New token ids after the prompt (stopping at <|eos|>), sampled as the seed does or greedy.

    The model has n_positions positions; a prompt that leaves no room for an answer keeps its
    last tokens (room for a quarter of the context, or max_new_tokens if less), with a warning."""
    torch.manual_seed(seed)
    n_positions = model.config.n_positions
    if len(prompt_ids) >= n_positions:
        keep = n_positions - max(1, min(max_new_tokens, n_positions // 4))
        warnings.warn(f"the prompt has {len(prompt_ids)} tokens and the model's context is {n_positions}: "
                      f"only its last {keep} tokens are used", stacklevel=2)
        prompt_ids = prompt_ids[-keep:]
    room = n_positions - len(prompt_ids)
    x = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():  # one unpadded row: the mask is all ones (said, so transformers does not warn)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max(1, min(max_new_tokens, room)),
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID, streamer=streamer,
                             **({"do_sample": False} if greedy else SAMPLING))
    return out[0, len(prompt_ids):].tolist()


def generate_many(model, prompts_ids, greedy: bool, seed: int = SEED, batch_size: int = 32,
                  desc: str | None = None) -> list[list[int]]:
    """New ids for many prompts at once, each cut after its <|eos|>: left-padded batches of prompts of
    similar length (GPT-2 takes its positions from the attention mask in generate()), each answer
    allowed the context that is left. Sampled as the seed samples, or greedy."""
    torch.manual_seed(seed)
    n_positions, device = model.config.n_positions, model.device
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    out = [[] for _ in prompts_ids]
    bar = progress(total=len(order), desc=desc, unit="answer", disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts_ids[i]) for i in idx)
        x = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(idx):
            x[row, width - len(prompts_ids[i]):] = torch.tensor(prompts_ids[i])
            mask[row, width - len(prompts_ids[i]):] = 1
        with torch.no_grad():
            y = model.generate(x.to(device), attention_mask=mask.to(device), max_new_tokens=max(1, n_positions - width),
                               eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                               **({"do_sample": False} if greedy else SAMPLING))
        for row, i in enumerate(idx):
            new = y[row, width:].tolist()
            out[i] = new[:new.index(EOS_ID) + 1] if EOS_ID in new else new
        bar.update(len(idx))
    bar.close()
    return out
