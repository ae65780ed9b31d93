"""Preference tuning (DPO), 03's optional second phase: its loss, its pairs and the phase through train().

It sits before sft in the import order because 03 (sft.run_sft_stage) runs it after its SFT phase.
Imports: common, files, data, stages, model, batches, checkpoint, train, dialogs.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib

import torch
import torch.nn.functional as F
from torch import nn

from .batches import PairBatches, eval_sample
from .checkpoint import load_checkpoint
from .common import IGNORE_ID, PAD_ID, PocketGPTError, is_main_process, read_json, world_size
from .data import split_of
from .dialogs import (
    CHAT_ROLES,
    cell_text,
    chat_prompt_ids,
    conversation_texts,
    dialog_key,
    encode_dialogs,
    eos_and_repeats,
    message_parts,
    table_rows,
)
from .files import write_json
from .model import generate_many
from .stages import PREFERENCE, Phase
from .train import TrainOptions, TrainResult, train


def answer_logprob(model, x, y):
    """Each row's summed log-probability of its target tokens (those not -100: the answer and <|eos|>)."""
    h = model.transformer(input_ids=x, attention_mask=(x != PAD_ID).long(), use_cache=False).last_hidden_state
    logits = model.lm_head(h)
    nll = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=IGNORE_ID, reduction="none")
    return -nll.view(y.shape).sum(1)


class DPOLoss(nn.Module):
    """Direct Preference Optimization (Rafailov et al. 2023), the offline form of RLHF.

    The policy learns to prefer the chosen answer to the rejected one, measured against a frozen
    reference (the SFT model) so it cannot drift far from it:
        loss = -log sigmoid(beta * [(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))])
    A batch stacks the chosen rows, then the rejected rows of the same prompts; only answer tokens
    count (targets are -100 on the prompt and the padding), as in SFT. Each step also reports the
    share of pairs the implicit reward ranks right and the mean reward margin. `rpo_alpha` adds that
    much of the chosen answers' per-token NLL (RPO, as TRL's rpo_alpha): DPO alone can lower the
    likelihood of both answers, and answers grow long.
    """
    stat_names = ("reward_accuracy", "reward_margin")

    def __init__(self, model, reference, beta: float, rpo_alpha: float = 0.0):
        super().__init__()
        self.model, self.reference = model, reference.requires_grad_(False).eval()
        self.beta, self.rpo_alpha = beta, rpo_alpha

    @staticmethod
    def units(y) -> int:
        """What the loss is averaged over: pairs."""
        return y.size(0) // 2

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # the reference is a fixed function: never dropout
        return self

    def forward(self, x, y, reduction: str = "mean"):
        policy = answer_logprob(self.model, x, y)
        with torch.no_grad():
            reference = answer_logprob(self.reference, x, y)
        n = x.size(0) // 2
        chosen, rejected = self.beta * (policy[:n] - reference[:n]), self.beta * (policy[n:] - reference[n:])
        losses = -F.logsigmoid(chosen - rejected)
        if self.rpo_alpha:
            losses = losses - self.rpo_alpha * policy[:n] / (y[:n] != IGNORE_ID).sum(1).clamp(min=1)
        stats = torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean()]).detach()
        return (losses.mean() if reduction == "mean" else losses.sum()), stats


PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def preference_answer(value, where: str, column: str) -> tuple[list[str] | None, str]:
    """A chosen or rejected cell: text, or messages ending with the assistant's answer; returns the
    conversation before the answer (None when the cell holds the answer alone) and the answer."""
    if not isinstance(value, (list, tuple)):
        return None, cell_text(value, where, column)
    parts = [message_parts(m) for m in value]
    if all(role is not None and CHAT_ROLES.get(str(role).strip().lower()) == "assistant" for role, _ in parts):
        return None, cell_text(parts[-1][1], where, column)  # the answer alone, as a message
    texts = conversation_texts(value, where, column)
    if len(texts) % 2:
        raise PocketGPTError(f"{where}: the {column!r} conversation does not end with an assistant message (the answer).")
    return texts[:-1], texts[-1]


def read_preference_pairs(path) -> list[dict]:
    """prompt, chosen, rejected rows (columns in any case, any dialog format), each cell non-empty.

    A cell is text or a list of messages: a prompt conversation (its turns go before the answers, as in
    SFT), an answer as an assistant message. Without a prompt column, chosen and rejected are whole
    conversations that differ only in their last (assistant) message."""
    columns, rows = table_rows(path, "prompt, chosen and rejected rows")
    lower = {c.strip().lower(): c for c in columns}
    missing = [c for c in PAIR_COLUMNS if c not in lower and (c != "prompt" or {"chosen", "rejected"} - set(lower))]
    if missing:
        raise PocketGPTError(f"{path}: no {', '.join(missing)} column; the columns are {list(columns)}. A preference "
                             f"file needs prompt, chosen and rejected (the layout of the public preference datasets).")
    pairs = []
    for where, row in rows:
        cells = {c: row[lower[c]] for c in PAIR_COLUMNS if c in lower}
        empty = next((c for c, v in cells.items() if v is None or not (v.strip() if isinstance(v, str) else len(v))), None)
        if empty:
            raise PocketGPTError(f"{where}: the {empty!r} cell is empty. Fill it or remove the row.")
        (before, chosen), (before_rejected, rejected) = (preference_answer(cells[c], where, lower[c])
                                                         for c in ("chosen", "rejected"))
        if "prompt" in cells:
            prompt = (conversation_texts(cells["prompt"], where, lower["prompt"])
                      if isinstance(cells["prompt"], (list, tuple)) else [cell_text(cells["prompt"], where, "prompt")])
        elif before and before == before_rejected:
            prompt = before
        else:
            raise PocketGPTError(f"{where}: there is no prompt column, so chosen and rejected must be conversations "
                                 f"that differ only in their last (assistant) message.")
        if len(prompt) % 2 == 0:
            raise PocketGPTError(f"{where}: the prompt conversation does not end with a user message.")
        empty = next((c for c, text in [("prompt", prompt[-1]), ("chosen", chosen), ("rejected", rejected)] if not text), None)
        if empty:
            raise PocketGPTError(f"{where}: the {empty!r} text is empty. Fill it or remove the row.")
        pairs.append({"prompt": prompt[0] if len(prompt) == 1 else tuple(prompt), "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise PocketGPTError(f"{path} has a header but no preference pairs.")
    return pairs


def self_preference_pairs(model, tok, dialogs, n: int, seed: int) -> tuple[list[dict], int]:
    """Pairs that need no extra data: for a seeded sample of the SFT training prompts, the reference
    answer is chosen and the SFT model's own sampled answer (as the seed samples) is rejected. Pairs
    whose two answers are near-identical (90% of their words in order) teach nothing and are skipped."""
    picked = [dialogs[i] for i in eval_sample(len(dialogs), n)]
    prompt_ids = [chat_prompt_ids(tok, p) for p, _ in picked]
    pairs, skipped = [], 0
    for (prompt, reference), ids, answer in zip(picked, prompt_ids, generate_many(model, prompt_ids, False, seed,
                                                                                  desc="DPO: the SFT model answers")):
        text = tok.decode(answer, skip_special_tokens=True).strip()
        if difflib.SequenceMatcher(None, text.split(), reference.split()).ratio() >= 0.9:
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": reference, "rejected": text, "rejected_ids": answer})
    return pairs, skipped


def encode_preference_pairs(tok, pairs, context: int) -> list:
    """((chosen ids, labels), (rejected ids, labels)) per pair, as SFT encodes rows (long answers cut).
    A sampled rejected answer keeps its own ids: with <|eos|> where the model ended, without where it
    ran out of context. A pair whose instruction alone does not fit the context is None (SFT drops
    such rows too), so the rows stay in step with the pairs."""
    at = []
    for side in ("chosen", "rejected"):
        index = []
        rows = encode_dialogs(tok, [(p["prompt"], p[side]) for p in pairs], context, "truncate", kept_index=index)[1]
        at.append(dict(zip(index, rows)))
    rows = []
    for i, pair in enumerate(pairs):
        c, r = at[0].get(i), at[1].get(i)
        if c is not None and r is not None and "rejected_ids" in pair:
            prompt = chat_prompt_ids(tok, pair["prompt"])
            r = (prompt + pair["rejected_ids"], [IGNORE_ID] * len(prompt) + pair["rejected_ids"])
        rows.append((c, r) if c is not None and r is not None else None)
    return rows


def run_preference_phase(cfg, sft_model, tok, dialogs, phase: Phase) -> TrainResult:
    """DPO after SFT, in phase.folder (the stage's preference/: pairs.json, log.csv, ckpt.pt), through the same loop,
    resumed from phase.resumed (the preference/ of the run resumed from) when it has a checkpoint; returns the tuned
    model and the phase's numbers (train's, with the pairs' and the held-out checks').

    The SFT model is the frozen reference; a copy of it is trained (the copy's parameters carry no
    hooks of the SFT phase's DDP wrapper). The pairs are saved, so a resumed phase trains on the same ones."""
    folder = phase.folder
    if is_main_process():
        folder.path.mkdir(exist_ok=True)
    saved = phase.resumed.pairs if phase.resumed else None
    if saved is not None and saved.is_file():
        pairs, skipped = read_json(saved), None
    elif cfg.preference == "self":
        pairs, skipped = self_preference_pairs(sft_model, tok, dialogs, cfg.preference_rows, cfg.seed)
    else:
        pairs, skipped = read_preference_pairs(cfg.preference), 0
    write_json(folder.pairs, pairs)
    rows = encode_preference_pairs(tok, pairs, sft_model.config.n_positions)
    split = [split_of(dialog_key(p["prompt"], p["chosen"]), cfg.seed, cfg.val_fraction) for p in pairs]
    train_rows = [r for r, s in zip(rows, split) if s == "train" and r is not None]
    val_rows = [r for r, s in zip(rows, split) if s == "val" and r is not None]
    if not val_rows:  # too few pairs for the split to hold any out: hold out a few, never measure on training pairs
        k = max(1, min(cfg.batch_size, len(train_rows) // 20))
        train_rows, val_rows = train_rows[:-k], train_rows[-k:]
    if len(train_rows) < world_size():
        raise PocketGPTError(f"preference={cfg.preference!r}: only {sum(r is not None for r in rows)} usable pairs"
                             + (f" ({skipped} were near-identical)" if skipped else "") + ": too few to train on.")
    train_data = PairBatches(train_rows, cfg.batch_size, cfg.seed, world=world_size())
    steps = max(1, round(cfg.preference_epochs * -(-len(train_data) // cfg.grad_accum_steps)))
    if is_main_process():
        print(f"preference phase (DPO, beta {cfg.beta}" + (f", rpo_alpha {cfg.rpo_alpha}" if cfg.rpo_alpha else "")
              + f"): {len(train_rows):,} training and {len(val_rows):,} held-out pairs"
              + (f" ({skipped} near-identical ones skipped)" if skipped else "") + f", {steps} steps", flush=True)
    # the phase's own recipe (a new config beside 03's, which stays as it was given)
    dcfg = dataclasses.replace(cfg, optimizer="adamw", schedule="cosine", learning_rate=cfg.preference_learning_rate,
                               min_lr=cfg.preference_learning_rate / 10, weight_decay=0.0)
    policy = copy.deepcopy(sft_model).train()
    resume = load_checkpoint(phase.resume_dir()) if phase.resume_dir() else None
    val_batches = PairBatches(val_rows, cfg.batch_size, cfg.seed).eval_batches(len(val_rows))
    loss = DPOLoss(policy, sft_model, cfg.beta, cfg.rpo_alpha)
    trained = train(policy, train_data, val_batches, dcfg,
                    TrainOptions(folder, stage=PREFERENCE, budget=phase.budget, resume=resume, loss_module=loss,
                                 max_steps=steps, warmup_steps=max(1, steps // 10), stop_at_step=phase.stop_at_step))
    result = trained.metrics
    result.update(pairs=len(pairs), train_pairs=len(train_rows), val_pairs=len(val_rows),
                  skipped_near_identical=skipped, beta=cfg.beta, rpo_alpha=cfg.rpo_alpha,
                  learning_rate=cfg.preference_learning_rate, source=cfg.preference,
                  **heldout_pair_stats(loss, val_batches), **answers_against_reference(policy, sft_model, tok, val_rows))
    result["warning"] = memorised_warning(result, cfg)
    if result["warning"] and is_main_process():
        print(f"warning: {result['warning']}", flush=True)
    return trained


def memorised_warning(stats: dict, cfg) -> str | None:
    """What to say when the phase ranks (nearly) all its held-out pairs right while its answers got worse than
    the SFT model's (fewer end with <|eos|>, or more repeat themselves): it learned the pairs, not better
    answers (seen on other data: eos 65% -> 5%, repeated 3-grams 72% -> 97%, held-out DPO loss 0.005)."""
    degraded = stats["heldout_eos_share_change"] <= -0.1 or stats["heldout_repeated_3gram_change"] >= 0.1
    if stats["heldout_reward_accuracy"] < 0.95 or not degraded:
        return None
    return (f"the preference phase ranks {stats['heldout_reward_accuracy']:.0%} of its held-out pairs right while its "
            f"greedy answers to their prompts got worse than the SFT model's (ending with <|eos|>: "
            f"{stats['heldout_eos_share_change']:+.0%}, repeated 3-grams: {stats['heldout_repeated_3gram_change']:+.0%}): "
            f"it learned its pairs, not better answers. Lower preference_learning_rate (now "
            f"{cfg.preference_learning_rate}) or raise rpo_alpha (now {cfg.rpo_alpha}).")


def answers_against_reference(policy, reference, tok, rows, n: int = 32) -> dict:
    """Greedy answers of the tuned model and of the SFT model to (up to n of) the held-out pairs' prompts: the
    change in the share that end with <|eos|> and in the share of repeated 3-grams (positive: more)."""
    prompts = [ids[:labels.count(IGNORE_ID)] for (ids, labels), _ in rows[:n]]
    measures = []
    for model in (policy, reference):
        new = generate_many(model, prompts, greedy=True)
        measures.append(eos_and_repeats(new, [tok.decode(ids, skip_special_tokens=True) for ids in new]))
    (eos, repeats), (ref_eos, ref_repeats) = measures
    return {"heldout_eos_share_change": eos - ref_eos, "heldout_repeated_3gram_change": repeats - ref_repeats}


def heldout_pair_stats(loss: "DPOLoss", batches) -> dict:
    """On the held-out pairs: the share the tuned model ranks right (its implicit reward), and how far the chosen
    answers' per-token log-likelihood moved from the SFT model's (negative: the phase pushed them down)."""
    device = next(loss.model.parameters()).device
    right = moved = pairs = tokens = 0
    was_training = loss.model.training
    loss.model.eval()
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            n = x.size(0) // 2
            policy, reference = answer_logprob(loss.model, x, y), answer_logprob(loss.reference, x, y)
            chosen, rejected = policy[:n] - reference[:n], policy[n:] - reference[n:]
            right += int((chosen > rejected).sum())
            moved, tokens, pairs = moved + float(chosen.sum()), tokens + int((y[:n] != IGNORE_ID).sum()), pairs + n
    loss.model.train(was_training)
    return {"heldout_reward_accuracy": right / max(pairs, 1), "heldout_chosen_logprob_change": moved / max(tokens, 1)}
