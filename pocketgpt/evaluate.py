"""Evaluation: losses on the held-out samples 02 and 03 used, and how a model answers held-out instructions.

Owns: val loss, perplexity and bits per byte; the response loss; answer quality (ROUGE-L, eos share,
repetition, distinct-2, length) of greedy and sampled answers; ask() for the notebook.
Imports: common, config, stages, tokenizer, model, batches, step, plots, dialogs, dpo.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from transformers import TextStreamer

from .batches import DialogBatches, TokenWindows, pad_rows
from .common import BOS_ID, EOS_ID, IGNORE_ID, read_json, watched
from .config import SEED
from .dialogs import chat_prompt_ids, dialog_ids, distinct_n, encode_dialogs, eos_and_repeats
from .dpo import answer_logprob
from .model import LMLoss, generate, generate_many, load_model
from .plots import finish_figure, pyplot
from .stages import StageDir
from .step import evaluate
from .tokenizer import encode_text, load_tokenizer


def sample_continuations(model_dir, prompts, max_new_tokens: int = 40) -> list[dict]:
    """The pretrained model continuing a few prompts (a document starts with <|bos|>)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    rows = []
    for p in prompts:
        ids = generate(model, [BOS_ID, *encode_text(tok, [p])[0]], max_new_tokens)
        rows.append({"prompt": p, "continuation": tok.decode(ids, skip_special_tokens=True)})
    return rows


def eval_val_split(model, tokenizer_dir, n_windows: int, batch_size: int = 8) -> dict:
    """Loss, perplexity and bits per byte on the pretraining val split's fixed evaluation sample,
    the same windows 02 evaluates (bits per byte does not depend on the tokenizer, so models with
    different vocabularies compare)."""
    tok_dir = StageDir(tokenizer_dir)
    meta = read_json(tok_dir.meta)
    data = TokenWindows(tok_dir.val_bin, model.config.n_positions, batch_size, 0, meta["vocab_size"])
    batches = data.eval_batches(n_windows)
    loss = evaluate(LMLoss(model), batches, model.device)
    bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) / bytes_per_token,
            "tokens_evaluated": sum(y.numel() for _, y in batches), "val_split_tokens": meta["val_tokens"],
            "whole_split": n_windows >= data.n}


def eval_responses(model, tok, pairs, batch_size: int = 16) -> float:
    """Loss on response tokens of held-out dialogs (the SFT objective)."""
    _, rows, _ = encode_dialogs(tok, pairs, model.config.n_positions, "truncate")
    return evaluate(LMLoss(model, padded=True), DialogBatches(rows, batch_size, 0).eval_batches(10**9), model.device)


def answer_table(model, tok, prompts, max_length: int | None = None, seed: int = SEED) -> list[dict]:
    """Sampled (the seed's settings) and greedy answers to a few instructions, and whether each ended with
    <|eos|>: examples to read; the measures come from answer_quality, on the held-out sample. `max_length`:
    prompt and answer together, None: the model's context."""
    max_length = max_length or model.config.n_positions
    rows = []
    for p in prompts:
        ids = chat_prompt_ids(tok, p)
        row = {"instruction": p}
        for mode in ["sampled", "greedy"]:
            new = generate(model, ids, max_length - len(ids), greedy=mode == "greedy", seed=seed)
            row[mode] = tok.decode(new, skip_special_tokens=True).strip()
            row[f"{mode}_eos"] = bool(new) and new[-1] == EOS_ID
        rows.append(row)
    return rows


QUALITY_ROWS = 256  # held-out dialogs answered per model (all of them where there are fewer)


def answer_quality(model, tok, pairs, seed: int = SEED, name: str = "model") -> tuple[dict, list[dict]]:
    """How a model answers held-out instructions, against the reference answers: for greedy and sampled
    answers, ROUGE-L F1 (rouge-score; None where it is not installed), the share that end with <|eos|>,
    the share of repeated 3-grams inside an answer, distinct-2 across answers, the mean length in words."""
    try:  # on Kaggle it comes as a wheel in the code dataset, and needs nltk and absl from the image
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(["rougeL"])
    except ImportError:
        scorer = None
    prompts = [chat_prompt_ids(tok, p) for p, _ in pairs]
    numbers = {"rows": len(pairs), "reference_words": float(np.mean([len(r.split()) for _, r in pairs])),
               **answer_ranking(model, tok, pairs)}
    answers = [{"instruction": p, "reference": r} for p, r in pairs]
    for mode in ["greedy", "sampled"]:
        new = generate_many(model, prompts, greedy=mode == "greedy", seed=seed, desc=f"{name}: {mode} answers")
        texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]
        eos, repeats = eos_and_repeats(new, texts)
        numbers.update({
            f"{mode}_rougeL": float(np.mean([scorer.score(r, t)["rougeL"].fmeasure for (_, r), t in zip(pairs, texts)]))
            if scorer else None,
            f"{mode}_eos_share": eos,
            f"{mode}_repeated_3gram_share": repeats,
            f"{mode}_distinct2": distinct_n(texts),
            f"{mode}_words": float(np.mean([len(t.split()) for t in texts])),
        })
        for a, t in zip(answers, texts):
            a[mode] = t
    return numbers, answers


RANKING_CANDIDATES = 8  # K: each answer's own question among 7 others; chance is 1/8


def first_place_share(scores: np.ndarray, tol: float = 1e-5) -> float:
    """The share of rows whose column 0 (the true pairing) scores highest; a tie at the top (within `tol` nats
    per token: float32's rounding of a mean, not a preference) shares the first place, so a model that scores
    every candidate alike is at chance, 1/K, exactly."""
    tied = scores >= scores.max(axis=1, keepdims=True) - tol
    return float(np.mean(np.where(tied[:, 0], 1.0 / tied.sum(axis=1), 0.0)))


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share p measured on n items."""
    centre, spread = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - spread / (1 + z * z / n)), min(1.0, centre + spread / (1 + z * z / n))


def mean_logprobs(model, rows, batch_size: int = 32) -> np.ndarray:
    """Each (ids, labels) row's mean per-token log-likelihood of its targets (the labels not -100)."""
    out = np.full(len(rows), np.nan)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: little padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            x, y = pad_rows([rows[i] for i in part])
            x, y = x.to(model.device), y.to(model.device)
            mean = answer_logprob(model, x, y) / (y != IGNORE_ID).sum(1).clamp(min=1)
            out[part] = mean.float().cpu().numpy()
    return out


def answer_ranking(model, tok, pairs, k: int = RANKING_CANDIDATES, seed: int = 0) -> dict:
    """Does the model know which question each answer belongs to? For every held-out pair, the mean per-token
    log-likelihood of its reference answer after its own question against after k-1 other questions (seeded,
    so every model is asked the same), and the share where its own question ranks first, with a 95% interval.

    The answer is the same text in all k rows, so how likely it is on its own (its length, its common words)
    cancels and only what the question adds counts; where a long question leaves less room in the context, all
    k rows score the same leading tokens of the answer, the most the longest of the k questions leaves room for.
    Ranking k answers for one question instead measures mostly the answers' own likelihood: on the demo it put
    the own answer first for 25% of the questions with the SFT model and 18% with the pretrained one, against
    87% and 61% this way."""
    rng = np.random.default_rng(seed)
    questions = [q for q, _ in pairs]
    k = min(k, len(set(questions)))
    candidates = []
    for i, (question, _) in enumerate(pairs):
        others = [j for j, other in enumerate(questions) if other != question]
        candidates.append([i, *rng.choice(others, size=k - 1, replace=False).tolist()])
    encoded = dialog_ids(tok, [(questions[j], pairs[c[0]][1]) for c in candidates for j in c])
    rows = []
    for g in range(len(candidates)):
        group = encoded[g * k:(g + 1) * k]
        # answer tokens that fit
        room = min(model.config.n_positions + 1 - labels.count(IGNORE_ID) for _, labels in group)
        if room < 1:
            continue  # a question that leaves no room for the answer: this answer is left out
        for ids, labels in group:
            n = labels.count(IGNORE_ID) + room
            rows.append((ids[:n], labels[:n]))
    scores = mean_logprobs(model, rows).reshape(-1, k)
    share = first_place_share(scores)
    low, high = wilson_interval(share, len(scores))
    return {"ranking_top1": share, "ranking_low": low, "ranking_high": high, "ranking_k": k,
            "ranking_answers": len(scores), "ranking_chance": 1 / k}


QUALITY_MEASURES = [  # key, label, format
    ("response_loss", "response loss on all held-out rows (lower is better)", "{:.3f}"),
    ("ranking_top1", "answer likeliest after its own question, of K (chance 1/K; 95% CI)", "{:.1%}"),
    ("greedy_rougeL", "ROUGE-L F1 against the reference, greedy", "{:.3f}"),
    ("sampled_rougeL", "ROUGE-L F1 against the reference, sampled", "{:.3f}"),
    ("greedy_eos_share", "answers that end with <|eos|>, greedy", "{:.0%}"),
    ("sampled_eos_share", "answers that end with <|eos|>, sampled", "{:.0%}"),
    ("greedy_repeated_3gram_share", "repeated 3-grams inside an answer, greedy", "{:.1%}"),
    ("sampled_repeated_3gram_share", "repeated 3-grams inside an answer, sampled", "{:.1%}"),
    ("greedy_distinct2", "distinct-2 across answers, greedy", "{:.2f}"),
    ("sampled_distinct2", "distinct-2 across answers, sampled", "{:.2f}"),
    ("greedy_words", "words per answer, greedy", "{:.1f}"),
    ("sampled_words", "words per answer, sampled", "{:.1f}"),
]


def quality_table(quality: dict) -> list[dict]:
    """The models side by side, one row per measure (a skipped measure says how to enable it)."""
    rows = []
    for key, label, fmt in QUALITY_MEASURES:
        row = {"measure": label}
        for name, numbers in quality.items():
            value = numbers.get(key)
            row[name] = fmt.format(value) if value is not None else "skipped: pip install rouge-score"
            if key == "ranking_top1" and value is not None:
                row[name] += (f" ({numbers['ranking_low']:.1%}-{numbers['ranking_high']:.1%}; K={numbers['ranking_k']}, "
                              f"{numbers['ranking_answers']} answers)")
        rows.append(row)
    reference = next(iter(quality.values()))
    rows.append({"measure": "words per reference answer", **{n: f"{reference['reference_words']:.1f}" for n in quality}})
    return rows


def plot_quality(quality: dict, out_png=None, show: bool = True):
    """The answer measures of each model as grouped bars (all on a 0-1 scale)."""
    plt = pyplot()

    keys = [k for k, _, _ in QUALITY_MEASURES if k.endswith(("rougeL", "eos_share", "3gram_share", "distinct2"))
            and all(q.get(k) is not None for q in quality.values())]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(quality)
    for i, (name, numbers) in enumerate(quality.items()):
        ax.bar(np.arange(len(keys)) + i * width, [numbers[k] for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.replace("_share", "").replace("_", " ") for k in keys],
                  rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(f"answers to {next(iter(quality.values()))['rows']} held-out instructions")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return finish_figure(fig, out_png, show)


def ask(model, tok, prompt: str, max_length: int | None = None, stream: bool = False, greedy: bool = False) -> str:
    """Ask the model one instruction (prompt and answer up to `max_length` tokens, None: the model's context).
    With stream=True the answer prints as it is generated where someone watches, and whole once it is done
    in a headless run (a saved notebook would otherwise keep each token as a line of its own)."""
    max_length = max_length or model.config.n_positions
    ids = chat_prompt_ids(tok, prompt)
    live = stream and watched()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if live else None
    new = generate(model, ids, max_length - len(ids), greedy=greedy, streamer=streamer)
    answer = tok.decode(new, skip_special_tokens=True).strip()
    if stream and not live:
        print(answer, flush=True)
    return answer
