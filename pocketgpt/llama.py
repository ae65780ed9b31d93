"""A GGUF in llama.cpp: run, checked against the Hugging Face folder it came from, timed; the export's GGUF files.

Owns: opening a GGUF with llama-cpp-python (its native log filtered), llama.cpp's and HF's logits and greedy
continuations, the checks (logits, greedy text, tokenization, llama.cpp's own chat) and their tolerances,
generation speed, the tokenizer probes, the child-process probe that keeps a llama.cpp built for another CPU
from taking this process down, and export_gguf_files (04's GGUF step: each file written, then checked).
Imports: common, tokenizer, dialogs, gguf (and `llama_cpp` where a function needs it).
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from .common import BOS_ID, TOKEN_ROLES, PocketGPTError, child_env, read_json
from .dialogs import CHAT_TEMPLATE, chat_prompt, chat_prompt_ids
from .gguf import gguf_ftype, write_gguf
from .tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# llama.cpp and Hugging Face side by side

LLAMA_GREEDY = dict(temperature=0.0, top_k=1)  # create_chat_completion's greedy: always the likeliest token
CHECK_TOKENS = 64  # tokens each greedy continuation of a check runs to (or to <|eos|>)

# llama.cpp rounds the context up to a multiple of 256 and then warns that it exceeds the model's
# (n_ctx_seq (256) > n_ctx_train (128)); pocketGPT never feeds it more than n_positions tokens.
LLAMA_HARMLESS = ("possible training context overflow",)


@contextmanager
def native_stderr_filtered(harmless=LLAMA_HARMLESS):
    """llama.cpp logs through llama-cpp-python's callback (to sys.stderr) and, for some messages,
    writes to file descriptor 2 itself: capture both around a call and pass on every line but the
    ones known to be harmless."""
    import contextlib
    import tempfile
    sys.stderr.flush()
    saved, python_side = os.dup(2), io.StringIO()
    with tempfile.TemporaryFile() as native_side:
        os.dup2(native_side.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            native_side.seek(0)
            lines = (native_side.read().decode("utf-8", "replace") + python_side.getvalue()).splitlines()
            kept = [line for line in lines if line.strip() and not any(h in line for h in harmless)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def load_llama(gguf_path, n_ctx, n_threads=None, logits_all=True):
    """Open a GGUF with llama-cpp-python (by default keeping the logits of every position, to compare)."""
    from llama_cpp import Llama
    with native_stderr_filtered():
        return Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=n_threads or torch.get_num_threads(), seed=0)


def llama_logits(llm, ids):
    """Next-token logits at every position of ids, from llama.cpp, as a [len(ids), vocab] array."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n_generate, eos_id=None):
    """Greedy continuation of ids by llama.cpp's own sampler (temp=0), stopping at eos like HF."""
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if tok == eos_id or len(out) == n_generate:
            break
    return out


def hf_greedy(model, ids, n_generate, eos_id, pad_id):
    """Greedy continuation of ids by HF generate, the reference for llama_greedy."""
    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=n_generate, eos_token_id=eos_id, pad_token_id=pad_id)
    return y[0, len(ids):].tolist()


def hf_logits(model, ids):
    """Next-token logits at every position of ids from the HF model, as a [len(ids), vocab] array."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def is_near_tie(ref_row, a, b, tol):
    """True if HF scores tokens a and b within tol: rounding of that size may pick either one."""
    return abs(float(ref_row[a]) - float(ref_row[b])) <= tol


CHECK_CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                      {"role": "user", "content": "What does a tokenizer do?"},
                      {"role": "assistant", "content": "It splits text into tokens."},
                      {"role": "user", "content": "What is dropout?"}]


@functools.lru_cache(maxsize=4)
def llama_chat_formatter(template: str):
    """llama-cpp-python's renderer for a GGUF's chat template, as its Llama builds it (compiled once)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template, eos_token=TOKEN_ROLES["eos_token"], bos_token=TOKEN_ROLES["bos_token"])


def llama_chat_ids(llm, messages) -> list[int] | None:
    """The ids llama.cpp's chat feeds the model for a conversation: the GGUF's own template rendered
    (up to the answer's "Response:"), special tokens parsed; None when the GGUF carries no template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    text = llama_chat_formatter(template)(messages=messages).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def gguf_chat_check(llm, hf_dir, model, tokenizer, n_generate: int, tie_tol: float) -> dict:
    """llama.cpp's own chat path on the GGUF, against the HF folder: the template llama-cpp-python
    picks from the file's metadata renders a conversation (system text, two user turns) to the ids
    `apply_chat_template` gives; `create_chat_completion` (greedy) answers what llama.cpp's greedy
    continuation of those ids is; and that continuation is HF's, or parts from it only at a near-tie
    (as verify_gguf allows its own greedy texts: f16 rounding may pick either of two tokens that close)."""
    hf_tok = load_tokenizer(hf_dir)
    want = list(hf_tok.apply_chat_template(CHECK_CONVERSATION, add_generation_prompt=True, tokenize=True,
                                           return_dict=False, tokenizer_kwargs={"verbose": False}))  # may pass the context
    template = llm.metadata.get("tokenizer.chat_template")
    out = {"template_used": llm.chat_format == "chat_template.default" and template == CHAT_TEMPLATE,
           "prompt_ids_equal": llama_chat_ids(llm, CHECK_CONVERSATION) == want, "answer_equal": None}
    n = min(n_generate, model.config.n_positions - len(want) - 1)
    if n > 0:  # room for an answer in the context
        ref = hf_greedy(model, want, n, tokenizer.eos_token_id, tokenizer.pad_token_id)
        got = llama_greedy(llm, want, n, tokenizer.eos_token_id)
        reply = llm.create_chat_completion(messages=CHECK_CONVERSATION, **LLAMA_GREEDY,
                                           max_tokens=n, seed=0)["choices"][0]
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        out.update(answer_equal=k is None,
                   answer_near_tie=k is not None and is_near_tie(hf_logits(model, want + ref[:k])[-1], ref[k], got[k],
                                                                 tie_tol),
                   chat_is_greedy=reply["message"]["content"].strip() == tokenizer.decode(got, skip_special_tokens=True).strip(),
                   finish_reason=reply["finish_reason"], hf_ended_with_eos=ref[-1:] == [tokenizer.eos_token_id])
    return out


# -----------------------------------------------------------------------------
# The checks of a GGUF against its Hugging Face folder, and its speed

# How closely each file type must follow the Hugging Face model (see verify_gguf).
# rel_tol bounds max|logit diff| as a fraction of the logit range; min_top1 is the share of
# positions whose next token must agree (near-ties excepted); greedy: must the generated text
# be identical. q8_0 rounds every weight to 8 bits: its logits drift by ~1% of their range and
# its greedy text may take another branch at a close call, so it gets a looser bound, 99% top-1
# agreement and no greedy requirement (its greedy figures are still reported).
GGUF_TOLERANCES = {
    "f32":  dict(rel_tol=1e-3, min_top1=1.0, greedy=True),
    "f16":  dict(rel_tol=1e-2, min_top1=1.0, greedy=True),
    "q8_0": dict(rel_tol=5e-2, min_top1=0.99, greedy=False),
}


def logit_figures(model, llm, prompt_ids) -> dict:
    """Next-token logits at every position of every prompt (the same ids go to both engines): their
    largest difference against the logit range, and where the top-1 token differs beyond a near-tie
    (two tokens whose HF logits differ by less than 2*max|diff|: the measured rounding error can swap
    them, so a swap there says nothing about the export being wrong)."""
    ref = np.concatenate([hf_logits(model, ids) for ids in prompt_ids])
    got = np.concatenate([llama_logits(llm, ids) for ids in prompt_ids])
    max_diff = float(np.abs(ref - got).max())
    logit_range = float(ref.max() - ref.min())
    ref_top, got_top = ref.argmax(-1), got.argmax(-1)
    differ = np.nonzero(ref_top != got_top)[0]
    real_differ = [i for i in differ if not is_near_tie(ref[i], ref_top[i], got_top[i], 2 * max_diff)]
    return dict(max_abs_diff=max_diff, logit_range=logit_range, rel_diff=max_diff / logit_range,
                positions=len(ref), top1_agreement=1 - len(differ) / len(ref), top1_differ_beyond_ties=len(real_differ))


def greedy_figures(model, tokenizer, llm, prompt_ids, n_generate: int, tie_tol: float) -> dict:
    """Greedy generation after each prompt by both engines: identical, or the first difference is a near-tie
    (greedy_ok); how many tokens agree before they part."""
    identical, ok, same, total = True, True, 0, 0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids in prompt_ids:
        ref_gen = hf_greedy(model, ids, n_generate, eos, pad)
        got_gen = llama_greedy(llm, ids, n_generate, eos)  # both end at eos or n_generate
        k = next((i for i, (a, b) in enumerate(zip(ref_gen, got_gen)) if a != b), None)
        total += len(ref_gen)
        same += len(ref_gen) if k is None else k
        if k is not None:
            identical = False
            context = hf_logits(model, ids + ref_gen[:k])[-1]  # HF's view where they split
            ok &= is_near_tie(context, ref_gen[k], got_gen[k], tie_tol)
    return dict(greedy_identical=identical, greedy_same_tokens=same, greedy_tokens=total, greedy_ok=ok)


def gguf_failures(figures: dict, tol: dict, chat: dict, mismatches: list, n_generate: int) -> list[str]:
    """What verify_gguf found wrong, one sentence a check, with its figures; [] when the GGUF passes."""
    failures, f = [], figures
    if f["rel_diff"] > tol["rel_tol"]:
        failures.append(f"logits differ: max|diff| {f['max_abs_diff']:.4g} is {f['rel_diff']:.3%} "
                        f"of the logit range {f['logit_range']:.4g} (allowed {tol['rel_tol']:.3%})")
    if 1 - f["top1_differ_beyond_ties"] / f["positions"] < tol["min_top1"]:
        failures.append(f"top-1 token differs at {f['top1_differ_beyond_ties']} of {f['positions']} positions "
                        f"beyond near-ties (allowed {1 - tol['min_top1']:.0%})")
    if tol["greedy"] and not f["greedy_ok"]:
        failures.append(f"greedy generation of {n_generate} tokens differs from HF")
    if mismatches:
        failures.append(f"tokenization differs from HF on {len(mismatches)} of "
                        f"{f['tokenization_texts']} texts, e.g. {mismatches[:3]!r}")
    if not (chat["template_used"] and chat["prompt_ids_equal"]):
        failures.append(f"llama.cpp's chat does not render pocketGPT's prompt: {chat}")
    if chat.get("chat_is_greedy") is False:
        failures.append(f"create_chat_completion does not answer with llama.cpp's own greedy continuation: {chat}")
    if tol["greedy"] and chat["answer_equal"] is False and not chat["answer_near_tie"]:
        failures.append(f"llama.cpp's greedy chat answer parts from HF's beyond a near-tie: {chat}")
    return failures


def verify_gguf(gguf_path, hf_dir, prompts, tokenization_texts, n_generate=CHECK_TOKENS):
    """Check that a GGUF behaves like the HF model it came from; return the figures or raise.

    Four checks, all against the HF folder as the reference:
      - logits: next-token logits at every position of each prompt. max|diff| must stay under
        GGUF_TOLERANCES[ftype] (a fraction of the logit range) and the top-1 token must agree
        wherever HF's choice is not a near-tie (f32/f16: everywhere, q8_0: on 99%) (logit_figures);
      - greedy generation: n_generate tokens after each prompt must be identical (f32/f16),
        unless the first difference is a near-tie (greedy_figures);
      - tokenization: llama.cpp's tokenizer must give HF's ids on every text, special tokens
        included (a missing pre-tokenizer type or a wrong token list shows up here first);
      - llama.cpp's own chat (gguf_chat_check).
    Raises PocketGPTError naming the file and every check that failed, with the figures.
    """
    ftype = gguf_ftype(gguf_path)
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    n_ctx = model.config.n_positions
    llm = load_llama(gguf_path, n_ctx=n_ctx)
    try:
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        if max(len(ids) for ids in prompt_ids) + n_generate > n_ctx:
            raise PocketGPTError(f"a prompt + {n_generate} generated tokens exceeds n_positions={n_ctx}")
        logits = logit_figures(model, llm, prompt_ids)
        tie_tol = 2 * logits["max_abs_diff"]
        greedy = greedy_figures(model, tokenizer, llm, prompt_ids, n_generate, tie_tol)
        # tokenization: what a llama.cpp user gets from the raw text, bos handling included
        mismatches = [t for t in tokenization_texts
                      if tokenizer.encode(t, verbose=False) != llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)]
        chat = gguf_chat_check(llm, hf_dir, model, tokenizer, n_generate, tie_tol)
    finally:
        llm.close()
    greedy_ok = greedy.pop("greedy_ok")
    figures = dict(
        ftype=ftype, **logits, **greedy,
        tokenization_texts=len(tokenization_texts), tokenization_mismatches=len(mismatches),
        chat_template=chat["template_used"], chat_prompt_ids_equal=chat["prompt_ids_equal"],
        chat_answer_equal=chat["answer_equal"], chat_answer_near_tie=chat.get("answer_near_tie"),
    )
    failures = gguf_failures({**figures, "greedy_ok": greedy_ok}, GGUF_TOLERANCES[ftype], chat, mismatches, n_generate)
    if failures:
        raise PocketGPTError(f"{gguf_path} does not match {hf_dir}:\n  " + "\n  ".join(failures)
                             + f"\nfigures: {figures}")
    return figures


def generation_speed(gguf_path, hf_dir, prompt, n_generate=128):
    """Greedy generation speed in tokens/s: HF generate on PyTorch vs llama.cpp on the GGUF.

    Both produce exactly n_generate new tokens (eos ignored) from the same prompt with the
    same number of CPU threads; the time includes reading the prompt, as a user would wait it.
    """
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    ids = tokenizer.encode(prompt)
    n_generate = min(n_generate, model.config.n_positions - len(ids))
    x = torch.tensor([ids])

    def hf_run(n):
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)

    hf_run(4)  # warm-up: the first call pays one-off setup costs
    t0 = time.perf_counter()
    hf_run(n_generate)
    hf_s = time.perf_counter() - t0

    llm = load_llama(gguf_path, n_ctx=model.config.n_positions)
    try:
        llama_greedy(llm, ids, 4)  # warm-up
        t0 = time.perf_counter()
        llama_greedy(llm, ids, n_generate)
        llama_s = time.perf_counter() - t0
    finally:
        llm.close()
    return dict(n_generate=n_generate, threads=torch.get_num_threads(),
                hf_tokens_per_s=n_generate / hf_s, llama_cpp_tokens_per_s=n_generate / llama_s)


TOKENIZER_PROBES = [  # strings that stress a tokenizer: unicode, emoji, odd whitespace, code, specials
    "héllo wörld", "naïve café", "日本語のテキスト", "Привет мир", "مرحبا", "🙂🚀👍🏽", "👨‍👩‍👧", "a  b   c",
    "\n\n\n", "\t\tindented", "  leading", "trailing   ", "def f(x):\n    return x**2  # square",
    "it's we'll they've I'M", "3.14159 1e-5 0x1F 1,000,000", "<|bos|>", "<|eos|>", "<pad>", "<unk>",
    "<|bos|>Instruction: hi\nResponse:", "\u00a0nbsp\u2009thin", "e\u0301 combining", "\r\nwindows",
    "ÀÉÎÕÜ ß ﬁ", "$$\\alpha$$", "https://example.com/a?b=c", "'s's 's", "ALLCAPS and MiXeD"]


def fuzz_strings(docs, n: int = 200, seed: int = 0) -> list[str]:
    """The probes, then random mixes of probes and snippets of real documents: the places where a
    tokenizer port differs (pre-tokenizer regex, whitespace runs, specials glued to text)."""
    rng = random.Random(seed)
    texts = list(TOKENIZER_PROBES)
    while len(texts) < n:
        parts = [rng.choice(TOKENIZER_PROBES) for _ in range(rng.randint(1, 4))]
        if docs:
            doc = rng.choice(docs)
            start = rng.randrange(max(1, len(doc) - 80))
            parts.insert(rng.randrange(len(parts) + 1), doc[start:start + rng.randint(5, 80)])
        texts.append(rng.choice(["", " ", "  ", "\n"]).join(parts))
    return texts


# -----------------------------------------------------------------------------
# Whether llama.cpp runs here, and the export's GGUF files

LLAMA_SKIPPED = ("not run against Hugging Face: llama-cpp-python is not installed "
                 "(pip install llama-cpp-python; it compiles llama.cpp, a few minutes)")


def llama_smoke_test(gguf_path) -> None:
    """Open a GGUF with llama.cpp and run it on a few tokens, as verify_gguf and chat do; llama_cpp_problem
    runs it in a child process, which may die of it."""
    llm = load_llama(gguf_path, n_ctx=16, n_threads=1, logits_all=False)
    try:
        llm.eval([BOS_ID, 4, 5, 6])
    finally:
        llm.close()


def llama_cpp_problem(gguf_path) -> str | None:
    """None when llama.cpp runs this GGUF here; else why it cannot, for the report card and the tests.

    llama.cpp built for another CPU (a native build on a machine that advertises AVX-512 or AMX it cannot
    run) dies of SIGILL, which would take the notebook kernel, the pipeline or pytest with it: the first
    use is tried in a child process, which sees the modules this process sees."""
    if importlib.util.find_spec("llama_cpp") is None:
        return LLAMA_SKIPPED
    stat = Path(gguf_path).stat()
    return _llama_cpp_problem(str(gguf_path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _llama_cpp_problem(gguf_path: str, size: int, mtime: int) -> str | None:
    proc = subprocess.run([sys.executable, "-c", "import sys; from pocketgpt.llama import llama_smoke_test; "
                           "llama_smoke_test(sys.argv[1])", gguf_path], capture_output=True, text=True, timeout=600,
                          env=child_env())
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return (f"not run: llama.cpp crashed on this CPU ({name}) running {Path(gguf_path).name}: its build uses "
                f"instructions this CPU does not execute. Build it for any CPU: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" "
                f"pip install --force-reinstall --no-cache-dir llama-cpp-python")
    error = (proc.stderr.strip().splitlines() or ["no message"])[-1]
    return f"not run: llama.cpp failed on {Path(gguf_path).name} ({error})"


def export_gguf_files(folder, out_dir, types, prompts, texts) -> list[dict]:
    """pocketGPT-{type}.gguf beside the folder; each verified against HF and timed when
    llama-cpp-python is importable (it compiles llama.cpp on install: CI has it, Kaggle need not)."""
    if not types:
        return []
    if importlib.util.find_spec("gguf") is None:
        skipped = "not written: the `gguf` package is not installed (pip install gguf; on Kaggle attach its wheel)"
        print(f"GGUF {skipped}.")
        return [{"type": ftype, "file": None, "skipped": skipped} for ftype in types]
    folder, out_dir = Path(folder), Path(out_dir)
    n_ctx = read_json(folder / "config.json")["n_positions"]
    n_generate = min(CHECK_TOKENS, n_ctx - max(len(chat_prompt_ids(load_tokenizer(folder), p)) for p in prompts) - 1)
    chat, probes = [chat_prompt(p) for p in prompts], texts + fuzz_strings(texts)
    rows = []
    for ftype in types:
        path = write_gguf(folder, out_dir / f"pocketGPT-{ftype}.gguf", ftype)
        row = {"type": ftype, "file": path.name, "size_mb": path.stat().st_size / 1e6}
        problem = llama_cpp_problem(path)
        if problem is None:
            print(f"GGUF {ftype}: {row['size_mb']:.1f} MB, checking it against Hugging Face in llama.cpp", flush=True)
            row["verify"] = verify_gguf(path, folder, chat, probes, n_generate)
            speed = generation_speed(path, folder, chat[0])
            row["tokens_per_s"], row["hf_tokens_per_s"] = speed["llama_cpp_tokens_per_s"], speed["hf_tokens_per_s"]
        else:
            row["skipped"] = problem
            if problem != LLAMA_SKIPPED:
                print(f"GGUF {ftype}: {problem}", flush=True)
        rows.append(row)
    return rows
