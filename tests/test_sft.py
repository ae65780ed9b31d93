"""Stage 3: dialogs are read, cleaned and formatted as the seed does; only the response is learned."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.batches import DialogBatches, PairBatches, eval_sample
from pocketgpt.common import BOS_ID, EOS_ID, PAD_ID
from pocketgpt.dialogs import (
    CHAT_TEMPLATE,
    chat_prompt_ids,
    detect_columns,
    encode_dialog,
    encode_dialogs,
    read_dialogs,
)
from pocketgpt.dpo import DPOLoss, encode_preference_pairs, read_preference_pairs
from pocketgpt.evaluate import eval_responses
from pocketgpt.model import LMLoss
from pocketgpt.train import read_log


@pytest.fixture(scope="module")
def pretrain_stage(tokenizer_stage, tmp_path_factory):
    run = tmp_path_factory.mktemp("sftrun")
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir=str(run), tokenizer_dir=str(tokenizer_stage),
                         precision="fp32", **params)
    return pg.run_pretrain_stage(cfg)


@pytest.fixture(scope="module")
def tok(pretrain_stage):
    t = pg.load_tokenizer(pretrain_stage / "model")
    t.chat_template = CHAT_TEMPLATE
    return t


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sft_cfg(pretrain_stage, tmp_path, dialogs, **kw):
    kw = {"batch_size": 8, "log_interval": 5, "eval_interval": 10, "precision": "fp32", "epochs": 1, **kw}
    return pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), pretrain_dir=str(pretrain_stage),
                          dialogs_path=str(dialogs), out_dir=str(tmp_path / "sft"), **kw)


def test_template_ids_match_the_chat_template_and_the_seed_prompt(tok):
    prompt, answer = "What does torch.nn.LayerNorm do?", "Applies layer normalization."
    ids, labels = encode_dialog(tok, prompt, answer)
    assert tok.decode(ids) == f"<|bos|>Instruction: {prompt}\nResponse: {answer}<|eos|>"
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=True, return_dict=False)
    assert list(chat) == ids
    gen = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    seed_prompt = tok.encode(f"<|bos|>Instruction: {prompt}\nResponse:")
    assert list(gen) == seed_prompt == ids[:len(seed_prompt)]  # generation prompt ends exactly at "Response:"
    n_prompt = labels.count(-100)
    assert n_prompt == len(seed_prompt) and labels[n_prompt:] == ids[n_prompt:] and labels[-1] == EOS_ID


def test_masked_prompt_tokens_get_no_gradient_and_response_tokens_do(pretrain_stage, tok):
    model = pg.load_model(pretrain_stage / "model").train()
    ids, labels = encode_dialog(tok, "Explain dropout.", "It zeroes random activations.")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([labels[1:]])
    emb = model.transformer.wte(x).detach().requires_grad_(True)
    h = model.transformer(inputs_embeds=emb).last_hidden_state
    logits = model.lm_head(h)
    loss = torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=-100)
    # the output at a masked position must not contribute: perturbing only its logits changes nothing
    grads = torch.autograd.grad(loss, logits, retain_graph=True)[0][0]
    masked = (y[0] == -100).nonzero().flatten()
    kept = (y[0] != -100).nonzero().flatten()
    assert grads[masked].abs().max() == 0
    assert (grads[kept].abs().sum(-1) > 0).all()
    assert LMLoss(model)(x, y).item() == pytest.approx(loss.item(), rel=1e-5)


def test_columns_are_detected_in_any_case_or_named(tmp_path):
    assert detect_columns(["ID", "Question", "ANSWER"]) == ("Question", "ANSWER")
    assert detect_columns(["prompt", "completion"]) == ("prompt", "completion")
    assert detect_columns(["a", "b"], "a", "b") == ("a", "b")
    with pytest.raises(pg.PocketGPTError, match=r"no prompt/response columns found among \['text', 'label'\].*prompt_column"):
        detect_columns(["text", "label"], file="d.csv")
    with pytest.raises(pg.PocketGPTError, match="response_column='answer' is not a column"):
        detect_columns(["q", "a"], "q", "answer", file="d.csv")


def test_cleaning_counts_empty_duplicate_and_long_rows(tmp_path, tok):
    f = write_csv(tmp_path / "d.csv", ["Instruction", "Response"], [
        ["  What is a tensor? ", " An array.  "], ["What is a tensor?", "An array."],  # duplicate once stripped
        ["", "orphan answer"], ["no answer", "   "], ["nan", "x"], ["Long?", "word " * 400],
    ])
    pairs, report = read_dialogs([f])
    assert pairs[0] == ("What is a tensor?", "An array.")
    assert (report["rows_read"], report["dropped_empty"], report["dropped_duplicates"]) == (6, 3, 1)
    kept, rows, counts = encode_dialogs(tok, pairs, 64, "truncate")
    assert counts == {"truncated": 1, "dropped_too_long": 0, "history_cut": 0}
    long_ids, long_labels = rows[1]
    assert len(long_ids) == 65 and long_ids[-1] == EOS_ID and long_labels[-1] == EOS_ID
    assert encode_dialogs(tok, pairs, 64, "drop")[2] == {"truncated": 0, "dropped_too_long": 1, "history_cut": 0}


def test_length_grouped_batches_are_mostly_real_tokens(tmp_path, tok, demo_data):
    pairs, _ = read_dialogs([demo_data / "dialogs.csv"])
    _, rows, _ = encode_dialogs(tok, pairs, 64, "truncate")
    batches = DialogBatches(rows, 16, seed=0)
    assert batches.real_token_fraction() >= 0.9
    x, y = batches.next_batch()
    assert x.shape == y.shape and (y[x == PAD_ID] == -100).all()
    seen = [i for b in batches.batches() for i in b]
    assert sorted(seen) == list(range(len(rows)))  # every row once per epoch


def test_sft_learns_and_writes_a_chat_ready_folder(pretrain_stage, tmp_path, demo_data):
    out = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, demo_data / "dialogs.csv", epochs=1, learning_rate=1e-3))
    metrics = pg.read_json(out / "metrics.json")
    rows = read_log(out / "log.csv")
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert vals[-1] < vals[0] and metrics["finished"]
    assert metrics["data_real_token_fraction"] >= 0.9
    for name in ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "vocab.json", "merges.txt"]:
        assert (out / "model" / name).is_file(), name
    tok = pg.load_tokenizer(out / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert tok.decode(ids) == "<|bos|>Instruction: hi\nResponse:"
    assert (out / "loss.png").exists() and pg.read_json(out / "manifest.json")["stage"] == "sft"


def test_sft_trains_on_multi_turn_chats_from_jsonl(pretrain_stage, tmp_path, demo_data, tok):
    """Chat rows (messages, three turns, a system text in some) train like CSV rows; every assistant turn is an
    example whose prompt is the conversation before it, cut from the left to the context (64 tokens here)."""
    pairs, _ = read_dialogs([demo_data / "dialogs.csv"])
    pairs = pairs[:120] + [(f"Q{i}?", f"A{i}.") for i in range(180)]  # long turns, then short ones
    chats = []
    for i in range(0, 300, 3):
        messages = [{"role": "system", "content": "Answer from the documentation."}] if i % 2 else []
        for p, r in pairs[i:i + 3]:
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        chats.append({"messages": messages})
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, path, max_steps=4, log_interval=2, eval_interval=4))
    report = pg.read_json(out / "data_report.json")
    assert report["rows_by_layout"] == {"messages": 100} and report["examples"] == 300
    assert report["history_cut"] > 0 and pg.read_json(out / "metrics.json")["finished"]
    heldout = pg.read_json(out / "heldout.json")
    assert any(isinstance(r["prompt"], list) for r in heldout)  # later turns keep their conversation
    assert eval_responses(pg.load_model(out / "model"), tok, [(r["prompt"], r["response"]) for r in heldout]) > 0
    assert "rows in the messages layout" in {row[""] for row in pg.data_report_rows(out)}


def test_sft_resume_continues_the_same_run(pretrain_stage, tmp_path, demo_data):
    kw = dict(max_steps=12, log_interval=2, eval_interval=4)
    full = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "a", demo_data / "dialogs.csv", **kw))
    part = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "b", demo_data / "dialogs.csv", **kw), stop_at_step=5)
    resumed = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "b", demo_data / "dialogs.csv",
                                       resume_from=str(part), **kw))
    a = {r["step"]: r["train_loss"] for r in read_log(full / "log.csv") if r["train_loss"] is not None}
    b = {r["step"]: r["train_loss"] for r in read_log(resumed / "log.csv") if r["train_loss"] is not None and r["step"] != 5}
    assert b and all(b[s] == pytest.approx(a[s], abs=2e-4) for s in b)


# --- bad input ------------------------------------------------------------------------------------

def test_missing_dialogs_file_is_named(pretrain_stage, tmp_path):
    with pytest.raises(pg.PocketGPTError, match="dialogs_path=.*missing.csv: no such file, folder or glob match"):
        pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, tmp_path / "missing.csv"))


def test_empty_dialogs_file_is_named(pretrain_stage, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(pg.PocketGPTError, match="empty.csv is empty"):
        pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, tmp_path / "empty.csv"))


def test_non_utf8_dialogs_file_is_named(pretrain_stage, tmp_path):
    (tmp_path / "latin1.csv").write_bytes("question,answer\ncafé?,oui\n".encode("latin-1"))
    with pytest.raises(pg.PocketGPTError, match="latin1.csv is not UTF-8"):
        pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, tmp_path / "latin1.csv"))


def test_csv_without_the_answer_column_is_rejected_with_its_columns(pretrain_stage, tmp_path):
    f = write_csv(tmp_path / "d.csv", ["question", "context"], [["q", "c"]])
    with pytest.raises(pg.PocketGPTError, match=r"d.csv: no prompt/response columns found among \['question', 'context'\]"):
        pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, f))


def test_an_answer_that_quotes_special_tokens_is_learned_as_text(tok):
    ids, labels = encode_dialog(tok, "How does <|bos|> start a document?", "Append <|eos|> and pad with <pad>.")
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID and PAD_ID not in ids  # the answer does not end early
    assert labels.count(EOS_ID) == 1 and labels[-1] == EOS_ID
    assert tok.decode(ids, skip_special_tokens=True) == ("Instruction: How does <|bos|> start a document?\n"
                                                         "Response: Append <|eos|> and pad with <pad>.")
    assert chat_prompt_ids(tok, "What is <pad>?").count(PAD_ID) == 0


def test_the_evaluation_sample_is_spread_over_the_rows_not_the_shortest(tok, demo_data):
    pairs, _ = read_dialogs([demo_data / "dialogs.csv"])
    _, rows, _ = encode_dialogs(tok, pairs, 512, "truncate")  # no row cut: lengths vary
    k = len(rows) // 5
    x = torch.cat([x.flatten() for x, _ in DialogBatches(rows, 8, seed=0).eval_batches(k)])
    lengths = sorted(len(ids) for ids, _ in rows)
    picked = eval_sample(len(rows), k)
    assert len(picked) == k and picked[-1] > len(rows) * 0.75 and picked[0] < len(rows) * 0.25
    assert np.mean([len(rows[i][0]) for i in picked]) > 1.5 * np.mean(lengths[:k])  # not the k shortest rows
    assert int((x != PAD_ID).sum()) == sum(len(rows[i][0]) - 1 for i in picked)
    again = torch.cat([x.flatten() for x, _ in DialogBatches(rows, 3, seed=9).eval_batches(k)])
    assert int((again != PAD_ID).sum()) == int((x != PAD_ID).sum())  # the same rows, whatever the batch or seed


def test_sft_applies_its_dropout_parameter(pretrain_stage, tmp_path, demo_data):
    runs = {p: pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / str(p), demo_data / "dialogs.csv", max_steps=6,
                                        log_interval=2, dropout=p)) for p in (0.0, 0.5)}
    losses = {p: [r["train_loss"] for r in read_log(out / "log.csv") if r["train_loss"] is not None]
              for p, out in runs.items()}
    assert losses[0.0] != losses[0.5]  # the same data, seed and weights: only dropout differs
    assert pg.read_json(runs[0.5] / "model" / "config.json")["resid_pdrop"] == 0.5


# --- preference tuning (DPO) ----------------------------------------------------------------------

def toy_pair_batch(tok):
    """One chosen and one rejected answer to the same prompt, as PairBatches stacks them."""
    rows = encode_preference_pairs(tok, [{"prompt": "What is a tensor?", "chosen": "An array of numbers.",
                                             "rejected": "a tensor tensor tensor"}], 64)
    return PairBatches(rows, 1, seed=0).collate([0])


def test_dpo_loss_equals_a_hand_computation(pretrain_stage, tok):
    policy, reference = pg.load_model(pretrain_stage / "model"), pg.load_model(pretrain_stage / "model")
    with torch.no_grad():  # make the two models differ
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = toy_pair_batch(tok)
    loss, stats = DPOLoss(policy, reference, beta=0.5)(x, y)

    def logp(model, row):  # the answer tokens' log-probabilities, summed, from the plain HF forward
        logits = model(x[row:row + 1]).logits[0].log_softmax(-1)
        keep = y[row] != -100
        return logits[keep].gather(1, y[row][keep][:, None]).sum()
    with torch.no_grad():
        margin = 0.5 * ((logp(policy, 0) - logp(reference, 0)) - (logp(policy, 1) - logp(reference, 1)))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(margin).item(), rel=1e-4)
    assert stats[1].item() == pytest.approx(margin.item(), rel=1e-4) and stats[0].item() == float(margin > 0)
    # RPO: plus rpo_alpha times the chosen answer's NLL per answer token
    rpo, _ = DPOLoss(policy, reference, beta=0.5, rpo_alpha=0.3)(x, y)
    with torch.no_grad():
        nll = -logp(policy, 0) / int((y[0] != -100).sum())
    assert rpo.item() == pytest.approx(loss.item() + 0.3 * nll.item(), rel=1e-4)


def test_dpo_prompt_tokens_and_the_reference_get_no_gradient(pretrain_stage, tok):
    policy, reference = pg.load_model(pretrain_stage / "model"), pg.load_model(pretrain_stage / "model")
    outputs = []

    def keep_logits(module, inputs, out):  # returns None: the output is unchanged
        out.retain_grad()
        outputs.append(out)
    policy.lm_head.register_forward_hook(keep_logits)
    x, y = toy_pair_batch(tok)
    loss, _ = DPOLoss(policy, reference, beta=0.1)(x, y)
    loss.backward()
    grad = outputs[0].grad  # d loss / d logits of the policy, rows: chosen, rejected
    assert grad[y == -100].abs().max() == 0  # the prompt (and padding) teaches nothing
    assert (grad[y != -100].abs().sum(-1) > 0).all()  # every answer token does
    assert all(p.grad is None for p in reference.parameters()) and not any(p.requires_grad for p in reference.parameters())


def write_pairs(path, header, rows):
    return write_csv(path, header, rows)


def test_a_preference_file_with_a_missing_column_or_an_empty_cell_is_named(tmp_path):
    f = write_pairs(tmp_path / "p.csv", ["prompt", "chosen", "answer"], [["q", "a", "b"]])
    with pytest.raises(pg.PocketGPTError, match=r"p.csv: no rejected column; the columns are \['prompt', 'chosen', 'answer'\]"):
        read_preference_pairs(f)
    f = write_pairs(tmp_path / "e.csv", ["Prompt", "Chosen", "Rejected"], [["q", "a", "b"], ["q2", "a2", "  "]])
    with pytest.raises(pg.PocketGPTError, match=r"e.csv, line 3: the 'rejected' cell is empty"):
        read_preference_pairs(f)
    with pytest.raises(pg.PocketGPTError, match="preference='nope.csv': use None, 'self'"):
        pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), preference="nope.csv")


def test_a_bad_preference_file_stops_the_stage_before_sft_trains(pretrain_stage, tmp_path, demo_data):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": [{"role": "assistant"')
    with pytest.raises(pg.PocketGPTError, match=r"pairs.jsonl, line 2: not a JSON object"):
        pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path, demo_data / "dialogs.csv", preference=str(bad)))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.partial").exists()


def test_dpo_phase_resumed_mid_phase_matches_an_uninterrupted_one(pretrain_stage, tmp_path, demo_data):
    kw = dict(max_steps=6, preference="self", preference_rows=96, preference_epochs=2, batch_size=8, log_interval=2,
              eval_interval=4, preference_learning_rate=1e-3, dropout=0.1)  # dropout: the RNG must resume too
    full = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "a", demo_data / "dialogs.csv", **kw))
    part = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "b", demo_data / "dialogs.csv", **kw), stop_at_step=5)
    assert not pg.read_json(part / "metrics.json")["finished"]
    resumed = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "b", demo_data / "dialogs.csv", resume_from="auto", **kw))
    a, b = (read_log(d / "preference" / "log.csv") for d in (full, resumed))
    a = {r["step"]: r for r in a}
    b = {r["step"]: r for r in b if r["step"] != 5}
    assert set(b) == set(a) and len(a) >= 4
    for step, row in b.items():
        for k in ["train_loss", "val_loss", "reward_accuracy", "reward_margin"]:
            assert row[k] == pytest.approx(a[step][k], abs=2e-4), (step, k)
    m = pg.read_json(resumed / "metrics.json")
    assert m["finished"] and m["exported_model"] == "SFT + DPO" and m["preference"]["pairs"] > 40
    assert (resumed / "model_sft" / "config.json").is_file() and (resumed / "model" / "config.json").is_file()
    assert not torch.equal(pg.load_model(resumed / "model").transformer.wte.weight,
                           pg.load_model(resumed / "model_sft").transformer.wte.weight)  # DPO moved the weights


def test_a_preference_pair_too_long_for_the_context_is_left_out_and_the_rest_stay_in_step(tok):
    long_prompt = "word " * 400  # far past a 64-token context: SFT drops such a row, so must DPO
    pairs = [{"prompt": "What is a tensor?", "chosen": "An array.", "rejected": "A tensor tensor."},
             {"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."},
             {"prompt": "What is dropout?", "chosen": "Zeroing units.", "rejected": "Dropout dropout."}]
    rows = encode_preference_pairs(tok, pairs, 64)
    assert rows[1] is None and len(rows) == 3
    for pair, row in zip([pairs[0], pairs[2]], [rows[0], rows[2]]):
        (c, c_labels), (r, r_labels) = row
        assert tok.decode([t for t, lab in zip(c, c_labels) if lab != -100], skip_special_tokens=True).strip() == pair["chosen"]
        assert tok.decode([t for t, lab in zip(r, r_labels) if lab != -100], skip_special_tokens=True).strip() == pair["rejected"]


def test_a_preference_phase_that_memorises_its_pairs_says_so(pretrain_stage, tmp_path, demo_data):
    """Held-out pairs ranked right while the answers get worse than the SFT model's (fewer end, more repeat):
    the phase warns, with what to change. The rule on known numbers, then the phase measuring and reporting them
    with the defaults a user gets (RPO, a low rate)."""
    from pocketgpt.dpo import memorised_warning

    cfg = pg.make_config(pg.SFTConfig, "demo", run_dir=str(tmp_path), rpo_alpha=0.0, preference_learning_rate=5e-4)
    worse = {"heldout_reward_accuracy": 1.0, "heldout_eos_share_change": -0.6, "heldout_repeated_3gram_change": 0.25}
    said = memorised_warning(worse, cfg)
    assert said.startswith("the preference phase ranks 100% of its held-out pairs right while its greedy answers")
    assert "(ending with <|eos|>: -60%, repeated 3-grams: +25%)" in said and "raise rpo_alpha (now 0.0)" in said
    assert memorised_warning({**worse, "heldout_reward_accuracy": 0.8}, cfg) is None  # not saturated
    assert memorised_warning({**worse, "heldout_eos_share_change": 0.2, "heldout_repeated_3gram_change": 0.0}, cfg) is None
    out = pg.run_sft_stage(sft_cfg(pretrain_stage, tmp_path / "run", demo_data / "dialogs.csv", max_steps=6,
                                   preference="self", preference_rows=96, batch_size=8))
    p = pg.read_json(out / "metrics.json")["preference"]
    assert {"heldout_reward_accuracy", "heldout_eos_share_change", "heldout_repeated_3gram_change", "warning"} <= set(p)
    assert p["rpo_alpha"] == 1.0 and p["learning_rate"] == 1e-4  # the best measured, as a user gets them
