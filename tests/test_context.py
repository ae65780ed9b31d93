"""A longer context from a trained model (init_from): grown, trained, killed and resumed, refused where it must
be, and exported: the seed's code and llama.cpp run it at its new length."""
import dataclasses
import importlib.util
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY
from test_real_path import kill_after_a_checkpoint, pretrain_params, run_stage

import pocketgpt_utils as pg
from pocketgpt.common import EOS_ID, PocketGPTError
from pocketgpt.dialogs import CHAT_TEMPLATE
from pocketgpt.evaluate import answer_table, ask
from pocketgpt.export import write_export_folder
from pocketgpt.gguf import write_gguf
from pocketgpt.llama import hf_logits, llama_cpp_problem, llama_logits, load_llama
from pocketgpt.model import build_model, grow_positions
from pocketgpt.pipeline import check_parameters
from pocketgpt.seed_check import seed_inference
from pocketgpt.stages import input_fingerprint
from pocketgpt.tokenizer import decode_documents, load_tokenizer, read_bin
from pocketgpt.train import read_log, save_hf_folder

SHORT, LONG = TINY["n_positions"], 2 * TINY["n_positions"]
STEPS = 300  # of the grown run: long enough to be killed after a checkpoint


@pytest.fixture(scope="module")
def short(tokenizer_stage, tmp_path_factory):
    """A finished short-context run (TINY: 64 positions)."""
    run = tmp_path_factory.mktemp("short")
    run_stage("pretrain", 1, pretrain_params(tokenizer_stage, run, max_steps=40))
    return run / "pretrain"


def grown_params(tokenizer_stage, short, run, **kw) -> dict:
    return pretrain_params(tokenizer_stage, run, init_from=short, n_positions=LONG, batch_size=2, max_steps=STEPS,
                           log_interval=25, eval_interval=100, **kw)


@pytest.fixture(scope="module")
def grown(tokenizer_stage, short, tmp_path_factory):
    """The short run grown to 128 positions with init_from, trained there uninterrupted, on 2 processes (each
    loads the weights; the same global batch of 2 windows as one process with batch_size 2)."""
    run = tmp_path_factory.mktemp("grown")
    proc = run_stage("pretrain", 2, {**grown_params(tokenizer_stage, short, run), "batch_size": 1})
    assert f"init_from {short}: {LONG} tokens, grown from {SHORT} (positions: interpolate) after " in proc.stdout
    return run / "pretrain"


def test_growing_copies_the_trained_rows_or_stretches_them():
    wpe = torch.randn(4, 3)
    copied = grow_positions(wpe, 10, "copy")
    assert torch.equal(copied[:4], wpe) and torch.equal(copied[4:8], wpe) and torch.equal(copied[8:], wpe[:2])
    stretched = grow_positions(wpe, 7, "interpolate")  # 4 rows over 7: every other row is a trained one
    assert torch.allclose(stretched[::2], wpe) and torch.allclose(stretched[1], (wpe[0] + wpe[1]) / 2)


def test_a_grown_run_starts_from_the_short_model_with_a_fresh_schedule_and_says_so(short, grown):
    m, before = pg.read_json(grown / "metrics.json"), pg.read_json(short / "metrics.json")
    assert m["context"] == {**m["context"], "n_positions": LONG, "grown_from": SHORT, "positions": "interpolate",
                            "init_from": str(short), "tokens_before": before["tokens"],
                            "tokens_at_context": m["tokens"]}
    assert m["steps"] == STEPS and m["tokens"] == STEPS * 2 * LONG  # its own steps and schedule, not the short run's
    assert m["processes"] == 2
    rows = read_log(grown / "log.csv")
    # step 25 of its own: past its own warmup, at the peak (a resumed short run would be at step 65, decayed)
    assert rows[0]["step"] == 25 and float(rows[0]["lr"]) == pytest.approx(
        pg.PROFILES["demo"]["pretrain"]["learning_rate"], rel=1e-6)
    # its first rows already have the short model's loss level (a model from scratch starts near ln(512) = 6.2)
    assert rows[0]["train_loss"] < before["final_train_loss"] + 0.3
    assert pg.read_json(grown / "manifest.json")["inputs"]["init_from"]["path"] == str(short)
    short_model, long_model = pg.load_model(short / "model"), pg.load_model(grown / "model")
    assert long_model.config.n_positions == LONG and long_model.config.pocketgpt_init["n_positions"] == SHORT
    assert not torch.equal(short_model.transformer.h[0].mlp.c_fc.weight, long_model.transformer.h[0].mlp.c_fc.weight)


def test_init_from_at_the_same_context_continues_the_model_on_a_fresh_schedule(tokenizer_stage, short, tmp_path):
    """nanoGPT's init_from: more training (on more text) from a finished model, its context unchanged."""
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(tmp_path), tokenizer_dir=str(tokenizer_stage),
                         init_from=str(short), precision="fp32", eval_windows=16,
                         **{**{k: v for k, v in TINY.items() if k != "vocab_size"}, "max_steps": 5, "log_interval": 1})
    m, before = pg.read_json(pg.run_pretrain_stage(cfg) / "metrics.json"), pg.read_json(short / "metrics.json")
    assert m["context"]["grown_from"] is None and m["context"]["positions"] is None
    assert m["context"]["tokens_at_context"] == before["tokens"] + m["tokens"]
    assert m["context"]["line"].startswith(f"{SHORT} tokens, continued from {short} (its {before['tokens']:,} tokens")
    first = read_log(tmp_path / "pretrain" / "log.csv")[0]
    assert first["step"] == 1 and first["train_loss"] < before["final_train_loss"] + 0.3  # the short model's level


def test_a_grown_run_killed_9_resumes_auto_and_ends_as_the_uninterrupted_one(tokenizer_stage, short, grown, tmp_path):
    params = grown_params(tokenizer_stage, short, tmp_path, checkpoint_minutes=0.01)
    # the grown run trains about 2.6 s on a quiet machine, its first checkpoint at 0.6 s: a kill up to 2.5 s later
    # came after its end once (the last checkpoint, at STEPS); up to 0.6 s later it lands mid-run
    crash = kill_after_a_checkpoint(params, tmp_path / "pretrain.partial", random.Random(), within=0.6)
    assert 0 < crash["step"] < STEPS
    proc = run_stage("pretrain", 1, {**params, "resume_from": "auto"})
    assert f"resuming {tmp_path / 'pretrain.partial'} at step {crash['step']} " in proc.stdout
    assert "init_from" not in proc.stdout.split("resuming")[1]  # the weights came from the checkpoint
    a, b = pg.read_json(grown / "metrics.json"), pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert b["steps"] == STEPS and b["final_val_loss"] == pytest.approx(a["final_val_loss"], abs=2e-3)
    assert b["context"]["grown_from"] == SHORT and b["context"]["init_from"] == str(short)
    ra = {r["step"]: r["train_loss"] for r in read_log(grown / "log.csv")}
    rb = {r["step"]: r["train_loss"] for r in read_log(tmp_path / "pretrain" / "log.csv")}
    assert set(ra) <= set(rb) and all(rb[s] == pytest.approx(ra[s], abs=2e-3) for s in ra)


def test_init_from_with_another_tokenizer_is_refused_naming_both_folders(demo_data, short, tmp_path):
    other = pg.build_tokenizer_stage(pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path),
                                                    corpus_path=str(demo_data / "corpus.txt"), vocab_size=300))
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(tmp_path), tokenizer_dir=str(other),
                         init_from=str(short), **{k: TINY[k] for k in ["n_layer", "n_head", "n_embd", "n_positions"]})
    with pytest.raises(PocketGPTError) as e:
        pg.run_pretrain_stage(cfg)
    theirs = pg.read_json(short / "manifest.json")["inputs"]["tokenizer"]["path"]
    assert f"the model in {short} was trained with the tokenizer {theirs}, and this run's tokenizer is {other}" in str(e.value)
    assert not (tmp_path / "pretrain").exists() and not (tmp_path / "pretrain.partial").exists()
    # 01 run again on the same corpus: another folder and fingerprint, the same vocabulary and merges: accepted
    again = pg.build_tokenizer_stage(pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path / "again"),
                                                    corpus_path=str(demo_data / "corpus.txt"), val_fraction=0.05,
                                                    vocab_size=TINY["vocab_size"]))
    assert pg.read_json(short / "manifest.json")["inputs"]["tokenizer"]["fingerprint"] != input_fingerprint(again)
    pg.describe_pretrain(dataclasses.replace(cfg, tokenizer_dir=str(again)))


@pytest.mark.parametrize("change, said", [
    (dict(n_positions=SHORT // 2), f"that model's context is n_positions={SHORT} and these parameters say "
                                   f"n_positions={SHORT // 2}. A context does not shrink"),
    (dict(n_embd=64), "that model has n_embd=32, and this run has n_embd=64. A model starts another run in its own "
                      "shape (only n_positions may grow): set n_embd=32."),
])
def test_init_from_a_smaller_context_or_another_shape_is_refused_with_its_reason(tokenizer_stage, short, tmp_path,
                                                                                 change, said):
    shape = {**{k: TINY[k] for k in ["n_layer", "n_head", "n_embd", "n_positions"]}, **change}
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(tmp_path), tokenizer_dir=str(tokenizer_stage),
                         init_from=str(short), **shape)
    for call in [pg.describe_pretrain, pg.run_pretrain_stage]:  # the notebook's first look says it already
        with pytest.raises(PocketGPTError, match="init_from=") as e:
            call(cfg)
        assert said in str(e.value)


SEED_LONG = '''
import sys
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
path, prompt = sys.argv[1], sys.argv[2]
model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)
inputs = tokenizer.encode(f"<|bos|>Instruction: {prompt}\\nResponse:", return_tensors="pt")
out = model.generate(inputs, max_length=model.config.n_positions, do_sample=True, top_p=0.9, temperature=0.8,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
print(inputs.shape[1], out.shape[1])
'''


def test_a_grown_model_exported_runs_at_its_new_length_in_the_seeds_code_and_llama_cpp(grown, tokenizer_stage,
                                                                                       tmp_path):
    model, tok = pg.load_model(grown / "model"), load_tokenizer(grown / "model")
    tok.chat_template = CHAT_TEMPLATE  # as 03 gives it
    folder = tmp_path / "pocketGPT"
    write_export_folder(model, tok, folder, "card")
    docs = decode_documents(np.asarray(read_bin(tokenizer_stage / "train.bin"))[:200_000], tok)
    long_text = next(d for d in docs if len(tok.encode(d)) > SHORT + 20)
    prompt = tok.decode(tok.encode(long_text)[:SHORT + 10])  # longer than the short model's whole context
    out = subprocess.run([sys.executable, "-c", SEED_LONG, str(folder), prompt], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout.split()
    assert int(out[0]) > SHORT and int(out[1]) <= LONG
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (requirements-dev.txt)")
    gguf = write_gguf(folder, tmp_path / "pocketGPT-f16.gguf", "f16")  # what 04 writes (its full check: test_export)
    problem = llama_cpp_problem(gguf)
    if problem:
        pytest.skip(problem)
    llm = load_llama(gguf, n_ctx=0)  # the context the file carries, as a user opens it
    try:
        assert int(llm.metadata["gpt2.context_length"]) == LONG  # (llama.cpp pads its own n_ctx to 256)
        ids = tok.encode(long_text)[:LONG - 1]
        ref, got = hf_logits(model, ids), llama_logits(llm, ids)
        past = slice(SHORT, len(ids))  # the positions the short model never had
        assert (ref[past].argmax(-1) == got[past].argmax(-1)).mean() >= 0.98
        assert np.abs(ref[past] - got[past]).max() < 0.05 * (ref.max() - ref.min())
    finally:
        llm.close()


def never_ending_model(tmp_path, tokenizer_stage, n_positions: int):
    """A model of `n_positions` whose every next token is anything but <|eos|> (its last norm gives one
    fixed hidden state, and <|eos|>'s embedding points away from it): answers run as long as they may."""
    cfg = pg.make_config(pg.PretrainConfig, "demo", **{k: TINY[k] for k in ["n_layer", "n_head", "n_embd"]},
                         n_positions=n_positions)
    model = build_model(TINY["vocab_size"], cfg)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_()
        model.transformer.wte.weight[EOS_ID] = -100 * model.transformer.ln_f.bias
    save_hf_folder(model, load_tokenizer(tokenizer_stage), tmp_path / "model")
    return pg.load_model(tmp_path / "model"), load_tokenizer(tmp_path / "model")


def test_answers_and_the_seeds_snippet_use_a_context_longer_than_384(tokenizer_stage, tmp_path):
    """384 was the seed model's context, not a limit: a 512-position model answers to 512 tokens."""
    model, tok = never_ending_model(tmp_path, tokenizer_stage, 512)
    full, capped = ask(model, tok, "What is a tensor?", greedy=True), ask(model, tok, "What is a tensor?", 384, greedy=True)
    assert len(full) > len(capped) and full.startswith(capped)  # the answer went on past 384 tokens
    assert answer_table(model, tok, ["What is a tensor?"])[0]["greedy"] == full
    assert seed_inference(str(tmp_path / "model"), "What is a tensor?")["generated_to"] == 512


def test_the_pipeline_makes_init_from_a_path_from_where_it_was_typed(tmp_path, monkeypatch):
    """The notebooks run in notebooks/: `pipeline -p init_from runs/demo/pretrain` means the user's runs/."""
    monkeypatch.chdir(tmp_path)
    assert check_parameters({"init_from": "runs/demo/pretrain"})["init_from"] == str(tmp_path / "runs/demo/pretrain")
