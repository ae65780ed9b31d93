"""Stage 4: the exported folder loads with the seed's code, matches the model, and its GGUF runs in llama.cpp."""
import importlib.util
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.chat import fit_conversation, open_chat
from pocketgpt.common import BOS_ID, HERE, library_versions
from pocketgpt.dialogs import chat_prompt_ids, distinct_n, repeated_ngram_share
from pocketgpt.evaluate import QUALITY_ROWS
from pocketgpt.export import DEFAULT_PROMPTS, report_markdown
from pocketgpt.gguf import write_gguf
from pocketgpt.llama import (
    GGUF_TOLERANCES,
    TOKENIZER_PROBES,
    export_gguf_files,
    native_stderr_filtered,
    verify_gguf,
)
from pocketgpt.model import generate, generate_many

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (requirements-dev.txt)")


@pytest.fixture(scope="module")
def run(tokenizer_stage, demo_data, tmp_path_factory):
    """A whole tiny run: pretrain, SFT, export, in one run folder."""
    run = tmp_path_factory.mktemp("exportrun")
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    pg.run_pretrain_stage(pg.make_config(pg.PretrainConfig, "demo", run_dir=str(run), precision="fp32",
                                         tokenizer_dir=str(tokenizer_stage), eval_windows=16,
                                         **{**params, "max_steps": 60}))
    pg.run_sft_stage(pg.make_config(pg.SFTConfig, "demo", run_dir=str(run), precision="fp32", batch_size=16,
                                    dialogs_path=str(demo_data / "dialogs.csv"), epochs=1, learning_rate=1e-3))
    pg.run_export_stage(pg.make_config(pg.ExportConfig, "demo", run_dir=str(run), tokenizer_dir=str(tokenizer_stage),
                                       prompts=["What is a tensor?"]))
    return run


@pytest.fixture
def llama_runs(run):
    """llama.cpp runs here: 04 tried it in a child process first (a build for another CPU dies of SIGILL, which
    in this process would end pytest); where it could not, the reason it recorded is the skip's."""
    problems = [g["skipped"] for g in pg.read_json(run / "export" / "metrics.json")["gguf"] if "skipped" in g]
    if problems:
        pytest.skip(problems[0])


# DESIGN.md's code, with max_length capped at the tiny test model's context (the seed's model has 384)
SEED_CODE = r'''
import sys
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
path, prompt = sys.argv[1], "What does torch.nn.LayerNorm do?"
model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)
inputs = tokenizer.encode(f"<|bos|>Instruction: {prompt}\nResponse:", return_tensors="pt")
out = model.generate(inputs, max_length=min(384, model.config.n_positions), do_sample=True, top_p=0.9, temperature=0.8,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
print(repr(tokenizer.decode(out[0], skip_special_tokens=True)))
print(len(tokenizer), model.config.vocab_size, model.dtype)
'''


def test_export_folder_has_the_seeds_files(run):
    folder = run / "export" / "pocketGPT"
    for name in ["config.json", "pytorch_model.bin", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json", "generation_config.json", "README.md"]:
        assert (folder / name).is_file(), name
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 0)
    with zipfile.ZipFile(run / "export" / "pocketGPT.zip") as z:
        assert {f"pocketGPT/{n}" for n in ["config.json", "model.safetensors", "vocab.json"]} <= set(z.namelist())


def test_the_seeds_inference_code_runs_on_the_exported_folder(run):
    out = subprocess.run([sys.executable, "-c", SEED_CODE, str(run / "export" / "pocketGPT")], capture_output=True,
                         text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout.splitlines()
    assert eval(out[-2]).startswith("Instruction: What does torch.nn.LayerNorm do?\nResponse:")
    assert out[-1] == f"{TINY['vocab_size']} {TINY['vocab_size']} torch.float32"  # no token silently added


def test_exported_logits_equal_the_sft_model(run):
    exported = pg.load_model(run / "export" / "pocketGPT")
    sft = pg.load_model(run / "sft" / "model")
    ids = torch.tensor([[2, 5, 17, 99, 250, 3]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, sft(ids).logits)
    legacy = torch.load(run / "export" / "pocketGPT" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(legacy["transformer.wte.weight"], sft.transformer.wte.weight)
    verify = pg.read_json(run / "export" / "metrics.json")["verify"]
    assert verify["max_abs_logit_diff"] == 0 and verify["slow_tokenizer_matches_fast"]


def test_report_card_has_every_number(run):
    m = pg.read_json(run / "export" / "metrics.json")
    assert m["pretrain_val_loss"] > 0 and m["pretrain_perplexity"] == pytest.approx(2.718281828 ** m["pretrain_val_loss"], rel=1e-6)
    assert 0 < m["pretrain_bits_per_byte"] < 8
    assert m["sft_response_loss"] < m["pretrain_response_loss"]  # SFT taught the response format
    answers = pg.read_json(run / "export" / "answers.json")
    report = (run / "export" / "report.md").read_text()
    # each answer measure once, with the rows it stands on: the quality table's, never the few example answers'
    assert "answers ending with <|eos|> (sampled / greedy)" not in report and "greedy_eos_share" not in m
    assert report.count("answers that end with <\\|eos\\|>, greedy") == 1
    assert f"## Answer quality on {m['quality']['SFT']['rows']} held-out instructions" in report
    card = (run / "export" / "pocketGPT" / "README.md").read_text()
    assert f"(greedy, {m['quality']['SFT']['rows']} held-out instructions) | {m['quality']['SFT']['greedy_eos_share']:.0%}" in card
    assert all(isinstance(a["greedy_eos"], bool) for a in answers)  # the examples say, each, whether they ended
    # the context it was trained at, and that it was not grown (tests/test_context.py: one that was)
    assert f"| context | {TINY['n_positions']} tokens, trained at it from the start ({m['pretrain_tokens']:,} tokens) |" in report
    for text in ["pretrain val loss", "response loss before / after SFT", "What is a tensor?", "losses.png"]:
        assert text in report
    assert [a["instruction"] for a in answers][-1] == "What is a tensor?"
    assert (run / "export" / "losses.png").stat().st_size > 1000


def test_distinct_n_counts_repetition():
    assert distinct_n(["a b a b a b"]) == pytest.approx(2 / 5)
    assert distinct_n(["one two three"]) == 1.0


@needs_llama
def test_gguf_files_match_hugging_face_in_llama_cpp(run, llama_runs):
    rows = {g["type"]: g for g in pg.read_json(run / "export" / "metrics.json")["gguf"]}
    assert set(rows) == {"f16", "q8_0"}
    for ftype, row in rows.items():
        v = row["verify"]
        assert (run / "export" / row["file"]).is_file()
        assert v["tokenization_mismatches"] == 0 and v["tokenization_texts"] >= len(TOKENIZER_PROBES) + 10  # + val docs
        assert v["rel_diff"] < GGUF_TOLERANCES[ftype]["rel_tol"]
        assert v["top1_agreement"] >= 0.99
        assert row["tokens_per_s"] > 0
    assert rows["f16"]["verify"]["greedy_identical"]
    assert rows["q8_0"]["size_mb"] < rows["f16"]["size_mb"]


@needs_llama
def test_gguf_of_other_weights_is_rejected(run, llama_runs, tmp_path):
    folder = run / "export" / "pocketGPT"
    other = write_gguf(run / "pretrain" / "model", tmp_path / "other.gguf", "f32")  # not the SFT weights
    with pytest.raises(pg.PocketGPTError, match="logits differ"):
        verify_gguf(other, folder, ["<|bos|>Instruction: hi\nResponse:"], ["hello"], 8)


@needs_llama
def test_gguf_without_the_pre_tokenizer_type_tokenizes_differently(run, llama_runs, tmp_path, monkeypatch):
    import gguf
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_pre", lambda self, pre: None)
    bad = write_gguf(run / "export" / "pocketGPT", tmp_path / "nopre.gguf", "f32")
    with pytest.raises(pg.PocketGPTError, match="tokenization differs"):
        verify_gguf(bad, run / "export" / "pocketGPT", ["<|bos|>Instruction: hi\nResponse:"],
                       TOKENIZER_PROBES + ["it's   we'll\n\n  x  = 1", "don't  stop   now"], 8)


def test_unknown_gguf_type_is_refused(run, tmp_path):
    with pytest.raises(pg.PocketGPTError, match="ftype must be one of"):
        write_gguf(run / "export" / "pocketGPT", tmp_path / "x.gguf", "q4_k")


def test_02_03_and_04_measure_on_the_same_held_out_sample(run):
    """04's pretrain val loss is 02's final one (the same fixed windows), and its SFT response loss is
    03's final val loss (the same held-out rows): the report's numbers agree with the logs."""
    pre, sft, export = (pg.read_json(run / s / "metrics.json") for s in ["pretrain", "sft", "export"])
    assert export["pretrain_tokens_evaluated"] == pre["val_tokens_evaluated"] == 16 * TINY["n_positions"]
    assert export["pretrain_val_loss"] == pytest.approx(pre["final_val_loss"], abs=1e-4)
    assert export["heldout_rows"] == pg.read_json(run / "sft" / "data_report.json")["eval_rows"]
    assert export["sft_response_loss"] == pytest.approx(sft["final_val_loss"], abs=1e-4)
    assert f"{16 * TINY['n_positions']:,} tokens of the" in (run / "export" / "report.md").read_text()


def test_repetition_measures_count_what_a_reader_sees():
    assert repeated_ngram_share("the layer of the layer of the layer".split()) == pytest.approx(1 - 3 / 6)
    assert repeated_ngram_share("one two three four".split()) == 0.0


def test_batched_answers_equal_one_at_a_time(run):
    """04 answers hundreds of held-out prompts in left-padded batches: greedy, each answer must be the
    one a single generate() gives (prompts of one length here, so each gets the same room)."""
    model, tok = pg.load_model(run / "sft" / "model"), pg.load_tokenizer(run / "sft" / "model")
    prompts = [chat_prompt_ids(tok, p) for p in ["What is a tensor?", "What is a vector?", "What is a matrix?",
                                                    "Explain dropout.", "Explain softmax."]]
    batched = generate_many(model, prompts, greedy=True, batch_size=8)
    single = [generate(model, ids, 500, greedy=True) for ids in prompts]
    for ids, a, b in zip(prompts, batched, single):
        room = model.config.n_positions - max(len(p) for p in prompts)
        assert a == b[:room], ids


def test_answer_quality_numbers_are_those_of_the_saved_answers(run):
    from rouge_score import rouge_scorer

    quality = pg.read_json(run / "export" / "metrics.json")["quality"]
    answers = pg.read_json(run / "export" / "quality_answers.json")
    heldout = pg.read_json(run / "sft" / "heldout.json")
    assert set(quality) == {"pretrained", "SFT"} and quality["SFT"]["rows"] == min(len(heldout), QUALITY_ROWS)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for name in quality:
        a = answers[name]
        assert quality[name]["greedy_rougeL"] == pytest.approx(
            np.mean([scorer.score(x["reference"], x["greedy"])["rougeL"].fmeasure for x in a]))
        assert quality[name]["sampled_repeated_3gram_share"] == pytest.approx(
            np.mean([repeated_ngram_share(x["sampled"].split()) for x in a]))
        assert quality[name]["greedy_distinct2"] == pytest.approx(distinct_n([x["greedy"] for x in a]))
    assert quality["SFT"]["response_loss"] < quality["pretrained"]["response_loss"]
    report = (run / "export" / "report.md").read_text()
    assert f"## Answer quality on {quality['SFT']['rows']} held-out instructions" in report and "nan" not in report
    assert (run / "export" / "quality.png").stat().st_size > 1000


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tensor?"},
                {"role": "assistant", "content": "An array."}, {"role": "user", "content": "And dropout?"}]


@needs_llama
def test_llama_cpp_chat_formats_with_the_template_the_gguf_carries(run, llama_runs):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = pg.load_tokenizer(run / "export" / "pocketGPT")
    want = list(tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False))
    for row in pg.read_json(run / "export" / "metrics.json")["gguf"]:
        assert row["verify"]["chat_template"] and row["verify"]["chat_prompt_ids_equal"]  # 04's own check
        with native_stderr_filtered():
            llm = Llama(model_path=str(run / "export" / row["file"]), n_ctx=0, verbose=False)  # as a user opens it
        try:
            assert llm.chat_format == "chat_template.default"  # not a guessed or default format
            assert int(llm.metadata["gpt2.context_length"]) == TINY["n_positions"]
            rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|eos|>",
                                           bos_token="<|bos|>")(messages=CONVERSATION).prompt
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == want
            reply = llm.create_chat_completion(messages=CONVERSATION[:2], temperature=0.0, top_k=1, max_tokens=20)
            assert "<|eos|>" not in reply["choices"][0]["message"]["content"]
        finally:
            llm.close()
    assert want[:1] == [BOS_ID] and chat_prompt_ids(tok, "What is a tensor?") == list(
        tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, tokenize=True, return_dict=False))


@needs_llama
def test_a_gguf_without_the_chat_template_fails_the_check(run, llama_runs, tmp_path, monkeypatch):
    import gguf
    monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, t: None)
    bare = write_gguf(run / "export" / "pocketGPT", tmp_path / "bare.gguf", "f32")
    with pytest.raises(pg.PocketGPTError, match="llama.cpp's chat does not render pocketGPT's prompt"):
        verify_gguf(bare, run / "export" / "pocketGPT", ["<|bos|>Instruction: hi\nResponse:"], ["hello"], 8)


def greedy_answer(model, tok, messages, n):
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok.decode(generate(model, ids, n, greedy=True), skip_special_tokens=True).strip()


def test_the_chat_command_holds_a_conversation_through_stdin(run):
    folder = run / "export" / "pocketGPT"
    proc = subprocess.run([sys.executable, str(HERE / "pocketgpt_utils.py"), "chat", str(run / "export"), "--greedy",
                           "--max-new-tokens", "12"], input="What is a tensor?\n\nAnd dropout?\n", text=True,
                          capture_output=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    answers = [part.split("\nyou>")[0].strip() for part in proc.stdout.split("pocketGPT>")[1:]]
    model, tok = pg.load_model(folder), pg.load_tokenizer(folder)
    first = greedy_answer(model, tok, [{"role": "user", "content": "What is a tensor?"}], 12)
    second = greedy_answer(model, tok, [{"role": "user", "content": "What is a tensor?"},
                                        {"role": "assistant", "content": first},
                                        {"role": "user", "content": "And dropout?"}], 12)
    assert answers == [first, second]  # the second turn saw the first (an empty line was skipped)
    assert proc.stdout.rstrip().endswith("you>")  # EOF ended it


@needs_llama
def test_the_chat_command_answers_one_prompt_from_a_gguf_as_hugging_face_does(run, llama_runs):
    proc = subprocess.run([sys.executable, str(HERE / "pocketgpt_utils.py"), "chat",
                           str(run / "export" / "pocketGPT-f16.gguf"), "--greedy", "--max-new-tokens", "12",
                           "--prompt", "What is a tensor?"], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    folder = run / "export" / "pocketGPT"
    expected = greedy_answer(pg.load_model(folder), pg.load_tokenizer(folder), [{"role": "user", "content": "What is a tensor?"}], 12)
    assert proc.stdout.strip() == expected


def test_a_report_card_without_llama_cpp_says_what_was_skipped_never_nan(run, tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    report = pg.read_json(run / "export" / "metrics.json")
    report["gguf"] = export_gguf_files(run / "export" / "pocketGPT", tmp_path, ["q8_0"], DEFAULT_PROMPTS, ["hi"])
    text = report_markdown(report, pg.read_json(run / "export" / "answers.json"), library_versions())
    checks = json.dumps(pg.export_checks(report))
    for shown in (text, checks):
        assert not re.search(r"\bnan\b", shown, re.I)
        assert "not run against Hugging Face: llama-cpp-python is not installed (pip install llama-cpp-python" in shown


def test_a_long_chat_drops_its_oldest_turns_and_keeps_the_system_text(run):
    bot = open_chat(run / "export")
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(12):  # far more than a 64-token context holds
        messages += [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    messages.append({"role": "user", "content": "And the last one?"})
    fitted = fit_conversation(bot, messages, room=16)
    assert len(bot.prompt_ids(fitted)) <= bot.n_ctx - 16
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]  # the system text and the newest question stay
    assert fitted[1:] == messages[len(messages) - len(fitted) + 1:]  # what stays is the newest turns, whole
    assert fitted[1]["role"] == "user"


def test_a_llama_cpp_that_crashes_on_this_cpu_skips_the_gguf_run_checks_and_says_why(run, tmp_path, monkeypatch):
    """A llama.cpp that dies of SIGILL (built for instructions this CPU lacks) must not take down the process
    running 04 (a notebook kernel, the pipeline, pytest): tried in a child first, the GGUF is still written and
    the report card says why it was not run."""
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")  # as such a build dies
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))  # what the child imports first
    rows = export_gguf_files(run / "export" / "pocketGPT", tmp_path, ["f16"], DEFAULT_PROMPTS, ["hi"])
    assert (tmp_path / rows[0]["file"]).is_file() and "verify" not in rows[0]
    assert rows[0]["skipped"].startswith("not run: llama.cpp crashed on this CPU (SIGILL) running pocketGPT-f16.gguf")
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall' in rows[0]["skipped"]
    report = {**pg.read_json(run / "export" / "metrics.json"), "gguf": rows}
    assert ("GGUF f16", f"{rows[0]['size_mb']:.1f} MB, {rows[0]['skipped']}") in pg.report_rows(report)
    with pytest.raises(pg.PocketGPTError, match=r"llama.cpp crashed on this CPU \(SIGILL\).*Or chat with the export folder"):
        open_chat(tmp_path / rows[0]["file"])


def test_answer_ranking_counts_the_true_answer_first_and_a_model_that_cannot_tell_is_at_chance(run):
    """Answer ranking: the share of held-out answers that are likelier, per token, after their own question than
    after K-1 other questions. Known cases: the true pairing likeliest gives 1; all alike gives 1/K (ties share the
    first place); a model that predicts the tokens already in its context ranks answers that repeat their question
    first; a real model whose every next-token distribution is the same is at chance; and so is a model
    that reads only the previous token (a bigram model: it cannot see the question), however differently likely
    the answers themselves are -- ranking K answers for one question would score that model on the answers'
    own likelihood, not on whether it knows which answer belongs to which question."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from pocketgpt.dialogs import encode_dialogs
    from pocketgpt.evaluate import answer_ranking, first_place_share, mean_logprobs, wilson_interval

    scores = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.9, -4.0]])  # column 0: the true pairing
    assert first_place_share(scores) == 1.0 and first_place_share(np.zeros((5, 8))) == pytest.approx(1 / 8)
    assert first_place_share(np.array([[-2.0, -1.0], [-1.0, -1.0]])) == pytest.approx(0.25)
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)
    tok = pg.load_tokenizer(run / "sft" / "model")
    heldout = [(r["prompt"], r["response"]) for r in pg.read_json(run / "sft" / "heldout.json")]

    def cache_model(input_ids, attention_mask, use_cache):  # each position: the tokens it has seen so far
        seen = (F.one_hot(input_ids, len(tok)).float() * attention_mask[..., None]).cumsum(1)
        return SimpleNamespace(last_hidden_state=seen / seen.sum(-1, keepdim=True))

    copier = SimpleNamespace(transformer=cache_model, lm_head=lambda h: 20 * h, device=torch.device("cpu"),
                             config=SimpleNamespace(n_positions=128))
    echoes = [(question, f"{question} {question}") for question, _ in heldout]  # answers that repeat their question
    r = answer_ranking(copier, tok, echoes)
    assert r["ranking_top1"] > 0.9 and r["ranking_low"] > r["ranking_chance"] and r["ranking_answers"] == len(heldout), r
    flat = pg.load_model(run / "sft" / "model")
    with torch.no_grad():
        flat.transformer.ln_f.weight.zero_()
        flat.transformer.ln_f.bias.zero_()  # every position's logits 0: one distribution, whatever the text
    r = answer_ranking(flat, tok, heldout)
    assert r["ranking_top1"] == pytest.approx(1 / r["ranking_k"]) and r["ranking_answers"] > 10
    bigram = pg.load_model(run / "sft" / "model")
    with torch.no_grad():
        bigram.transformer.wpe.weight.zero_()  # no positions,
        for block in bigram.transformer.h:     # no attention: each position sees its own token only
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
    own = mean_logprobs(bigram, encode_dialogs(tok, heldout, bigram.config.n_positions, "truncate")[1])
    assert np.ptp(own) > 0.1  # the answers themselves are not alike to it
    r = answer_ranking(bigram, tok, heldout)
    assert r["ranking_top1"] == pytest.approx(1 / r["ranking_k"])
    trained = answer_ranking(pg.load_model(run / "sft" / "model"), tok, heldout)
    assert trained == answer_ranking(pg.load_model(run / "sft" / "model"), tok, heldout)  # the same candidates
    quality = pg.read_json(run / "export" / "metrics.json")["quality"]
    assert quality["SFT"]["ranking_k"] == 8 and 0 <= quality["SFT"]["ranking_low"] <= quality["SFT"]["ranking_top1"]
    assert "likeliest after its own question, of K (chance 1/K; 95% CI)" in (run / "export" / "report.md").read_text()
