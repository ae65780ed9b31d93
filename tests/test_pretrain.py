"""Stage 2: the model, the loop, resuming, precision, and the errors a user can hit."""
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import TINY

import pocketgpt_utils as pg
from pocketgpt.batches import TokenWindows
from pocketgpt.budget import PLAN_PROBE_STEPS
from pocketgpt.checkpoint import load_checkpoint
from pocketgpt.common import HERE
from pocketgpt.device import choose_precision, cpu_has_native_bf16, peak_for_name
from pocketgpt.model import LMLoss, build_model, count_params, generate
from pocketgpt.optim import Muon, lr_at, make_optimizers, orthogonalize
from pocketgpt.train import FP16_MAX_SKIPS_IN_A_ROW, read_log


def pretrain_cfg(tokenizer_stage, tmp_path, **kw):
    params = {k: v for k, v in TINY.items() if k != "vocab_size"}
    params.update(tokenizer_dir=str(tokenizer_stage), out_dir=str(tmp_path / "pretrain"), precision="fp32",
                  max_hours=1, checkpoint_minutes=60)
    params.update(kw)
    return pg.make_config(pg.PretrainConfig, "demo", run_dir=str(tmp_path), **params)


def test_t4_profile_is_the_seeds_27m_model():
    cfg = pg.make_config(pg.PretrainConfig, "t4", run_dir="/tmp/unused")
    model = build_model(24000, cfg)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.n_positions) == (384, 6, 10, 384)
    assert 27.0e6 < count_params(model) < 27.2e6
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_loss_matches_the_stock_hf_loss(tokenizer_stage):
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused", **{k: v for k, v in TINY.items() if k != "vocab_size"})
    model = build_model(TINY["vocab_size"], cfg).eval()
    ids = torch.randint(0, TINY["vocab_size"], (3, 33))
    ours = LMLoss(model)(ids[:, :-1], ids[:, 1:])
    stock = model(ids, labels=ids).loss
    assert torch.allclose(ours, stock, atol=1e-5)


def test_pretraining_lowers_the_loss_and_writes_a_loadable_folder(tokenizer_stage, tmp_path):
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=40))
    rows = read_log(out / "log.csv")
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert vals[-1] < vals[0] - 0.3 and vals[-1] < np.log(TINY["vocab_size"]) - 0.5  # learned beyond uniform
    metrics = pg.read_json(out / "metrics.json")
    assert metrics["finished"] and metrics["steps"] == 40 and metrics["stop_reason"] == "max_steps"
    assert metrics["tokens"] == 40 * TINY["batch_size"] * TINY["n_positions"]
    assert (out / "loss.png").stat().st_size > 1000
    model = pg.load_model(out / "model")
    assert model.config.vocab_size == TINY["vocab_size"] and model.dtype == torch.float32
    assert pg.find_stage("pretrain", run_dir=tmp_path) == out


@pytest.mark.parametrize("recipe", [dict(optimizer="muon", schedule="wsd"), dict(optimizer="adamw", schedule="cosine")],
                         ids=["muon-wsd", "adamw-cosine"])
def test_a_stopped_and_resumed_run_matches_the_uninterrupted_one(tokenizer_stage, tmp_path, recipe):
    kw = dict(max_steps=16, log_interval=2, eval_interval=4, dropout=0.1, **recipe)  # dropout: the RNG must resume too
    full = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "a", **kw))
    part = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", **kw), stop_at_step=7)
    assert not pg.read_json(part / "metrics.json")["finished"]
    resumed = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", resume_from=str(part), **kw))
    a, b = read_log(full / "log.csv"), read_log(resumed / "log.csv")
    a = {r["step"]: r for r in a}
    b = {r["step"]: r for r in b if r["train_loss"] is not None and r["step"] != 7}
    assert sorted(b) == sorted(k for k in a if a[k]["train_loss"] is not None)
    for step, row in b.items():
        assert row["train_loss"] == pytest.approx(a[step]["train_loss"], abs=2e-4), step
    assert pg.read_json(resumed / "metrics.json")["final_val_loss"] == pytest.approx(
        pg.read_json(full / "metrics.json")["final_val_loss"], abs=2e-4)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_on_this_cpu_follows_the_fp32_loss_curve(tokenizer_stage, tmp_path):
    runs = {p: pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / p, max_steps=40, precision=p))
            for p in ["fp32", "bf16"]}
    logs = {p: [r["val_loss"] for r in read_log(d / "log.csv") if r["val_loss"] is not None] for p, d in runs.items()}
    assert pg.read_json(runs["bf16"] / "metrics.json")["precision"] == "bf16"
    for a, b in zip(logs["fp32"], logs["bf16"]):
        assert abs(a - b) / a < 0.02
    assert choose_precision("auto") == "bf16"


def test_precision_choice_never_trusts_emulated_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert choose_precision("auto") == "fp16"
    with pytest.raises(pg.PocketGPTError, match="no native bf16"):
        choose_precision("bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert choose_precision("auto") == "bf16"


def test_data_order_is_seeded_and_covers_every_window_once_per_epoch(tokenizer_stage):
    d = TokenWindows(tokenizer_stage / "train.bin", 16, 4, seed=1, vocab_size=TINY["vocab_size"])
    order = d.order()
    assert sorted(order.tolist()) == list(range(d.n))
    x, y = d.next_batch()
    expected = np.stack([d.data[i * 16:i * 16 + 17] for i in order[:4]]).astype(np.int64)
    assert torch.equal(x, torch.from_numpy(expected[:, :-1])) and torch.equal(y, torch.from_numpy(expected[:, 1:]))
    again = TokenWindows(tokenizer_stage / "train.bin", 16, 4, seed=1, vocab_size=TINY["vocab_size"])
    assert torch.equal(again.next_batch()[0], x)  # same seed, same order
    other = TokenWindows(tokenizer_stage / "train.bin", 16, 4, seed=2, vocab_size=TINY["vocab_size"])
    assert not torch.equal(other.next_batch()[0], x)
    d.load_state({"epoch": 0, "index": d.n - 2})  # a batch that crosses into the next epoch
    d.next_batch()
    assert d.state() == {"epoch": 1, "index": 2}
    assert not np.array_equal(d.order(), order)  # a new order each epoch


# --- bad input ------------------------------------------------------------------------------------

def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(pg.PocketGPTError, match="No finished 'tokenizer' stage.*01_tokenizer"):
        pg.run_pretrain_stage(pg.make_config(pg.PretrainConfig, "demo", run_dir=str(tmp_path)))


def test_corrupt_tokenizer_is_named(tokenizer_stage, tmp_path):
    broken = tmp_path / "tok"
    shutil.copytree(tokenizer_stage, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(pg.PocketGPTError, match=f"tokenizer in {broken} cannot be loaded"):
        pg.run_pretrain_stage(pretrain_cfg(broken, tmp_path))


def test_token_id_beyond_the_vocabulary_is_caught(tokenizer_stage, tmp_path):
    bad = tmp_path / "tok"
    shutil.copytree(tokenizer_stage, bad)
    ids = np.fromfile(bad / "train.bin", dtype=np.uint16)
    ids[123] = 60000
    ids.tofile(bad / "train.bin")
    with pytest.raises(pg.PocketGPTError, match="train.bin holds token id 60000 at position 123"):
        pg.run_pretrain_stage(pretrain_cfg(bad, tmp_path))


def test_split_shorter_than_a_window_is_caught(tokenizer_stage, tmp_path):
    short = tmp_path / "tok"
    shutil.copytree(tokenizer_stage, short)
    np.arange(4, 40, dtype=np.uint16).tofile(short / "val.bin")
    with pytest.raises(pg.PocketGPTError, match="val.bin holds 36 tokens, fewer than one context window of 65"):
        pg.run_pretrain_stage(pretrain_cfg(short, tmp_path))


def test_bad_model_shape_names_the_parameter(tmp_path):
    with pytest.raises(pg.PocketGPTError, match="n_head=7 does not divide n_embd=384"):
        pg.make_config(pg.PretrainConfig, "t4", run_dir=str(tmp_path), n_head=7)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tokenizer_stage, tmp_path):
    cfg = pretrain_cfg(tokenizer_stage, tmp_path, max_steps=200, learning_rate=1e4, min_lr=1e4, warmup_steps=1,
                       grad_clip=1e9, log_interval=1, checkpoint_minutes=0)
    with pytest.raises(pg.PocketGPTError, match=r"training loss is inf or nan by step \d+.*last good checkpoint"):
        pg.run_pretrain_stage(cfg)
    ckpt = load_checkpoint(tmp_path / "pretrain.partial")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "pretrain").exists()


def test_resuming_with_another_model_shape_is_refused(tokenizer_stage, tmp_path):
    part = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=4))
    with pytest.raises(pg.PocketGPTError, match="that run has n_layer=2"):
        pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "x", n_layer=3, resume_from=str(part)))


def test_two_processes_share_the_work_and_only_rank_0_writes(tokenizer_stage, tmp_path):
    """The multi-GPU path (accelerate/DDP), run as two CPU processes on gloo, as torchrun starts them."""
    import os
    import subprocess
    import sys

    args = ["-p", "tokenizer_dir", str(tokenizer_stage), "-p", "run_dir", str(tmp_path), "-p", "precision", "fp32"]
    for k in ["n_layer", "n_head", "n_embd", "n_positions", "batch_size", "log_interval", "eval_interval"]:
        args += ["-p", k, str(TINY[k])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(HERE / "pocketgpt_utils.py"),
           "stage", "pretrain", "-p", "max_steps", "10", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = pg.read_json(tmp_path / "pretrain" / "metrics.json")
    assert metrics["processes"] == 2
    assert metrics["tokens"] == 10 * 2 * TINY["batch_size"] * TINY["n_positions"]  # a global batch of both
    steps = [r["step"] for r in read_log(tmp_path / "pretrain" / "log.csv")]
    assert steps == sorted(set(steps))  # one writer


def test_the_t4_path_fp16_with_gradscaler_trains_and_checkpoints_the_scaler(tokenizer_stage, tmp_path):
    """What a T4 runs (fp16 autocast + GradScaler), exercised on this CPU, which computes fp16 too
    (choose_precision refuses fp16 without a GPU: the stage is handed the precision a T4 gets)."""
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=30), precision="fp16")
    metrics = pg.read_json(out / "metrics.json")
    vals = [r["val_loss"] for r in read_log(out / "log.csv") if r["val_loss"] is not None]
    assert metrics["precision"] == "fp16" and vals[-1] < vals[0]
    # the checkpoint holds the scaler's state: it started at 2**16 and halved once per skipped step
    # (it grows only after 2000 clean steps), so the scale it holds says how many steps were skipped
    scale = load_checkpoint(out)["scaler"]["scale"]
    assert 2.0 ** 16 / scale == 2 ** metrics["skipped_steps"]
    assert pg.load_model(out / "model").dtype == torch.float32  # saved in fp32 whatever trained it


def inf_loss_at(monkeypatch, steps):
    """The training loss becomes inf at the given training steps (counted from 1), as an fp16 overflow makes it."""
    forward, calls = LMLoss.forward, {"n": 0}

    def forward_with_overflow(self, x, y, reduction="mean"):
        loss = forward(self, x, y, reduction)
        if not self.training:
            return loss
        calls["n"] += 1
        return loss * float("inf") if calls["n"] in steps else loss
    monkeypatch.setattr(LMLoss, "forward", forward_with_overflow)


def test_fp16_a_step_the_gradscaler_skips_is_counted_not_fatal(tokenizer_stage, tmp_path, monkeypatch):
    inf_loss_at(monkeypatch, {5})  # on a log step
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=20, log_interval=5), precision="fp16")
    metrics, rows = pg.read_json(out / "metrics.json"), {r["step"]: r for r in read_log(out / "log.csv")}
    assert metrics["finished"] and metrics["steps"] == 20
    assert rows[5]["skipped_steps"] >= 1 and rows[5]["train_loss"] is not None  # the mean of the finite steps
    assert metrics["skipped_steps"] == sum(r["skipped_steps"] or 0 for r in rows.values())


def test_fp16_a_loss_that_stays_inf_stops_the_run_with_a_message(tokenizer_stage, tmp_path, monkeypatch):
    inf_loss_at(monkeypatch, set(range(3, 1000)))
    with pytest.raises(pg.PocketGPTError, match=f"stayed inf/nan for {FP16_MAX_SKIPS_IN_A_ROW} steps in a row"):
        pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=200, log_interval=100), precision="fp16")


def test_evaluation_logging_and_checkpoints_keep_their_own_cadence(tokenizer_stage, tmp_path, monkeypatch):
    saved, save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: (saved.append(obj.get("state", {}).get("step")),
                                                             save(obj, f, **kw)))
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=20, log_interval=3,
                                             eval_interval=5, checkpoint_minutes=1e-6))
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if r["tokens_per_s"] is not None] == [3, 5, 6, 9, 10, 12, 15, 18, 20]
    assert set(range(1, 20)) <= set(saved)  # a checkpoint whenever its time comes, not only on log steps


def test_the_validation_sample_is_spread_over_the_split_and_fixed(tokenizer_stage):
    val = tokenizer_stage / "val.bin"
    d = TokenWindows(val, 16, 4, seed=1, vocab_size=TINY["vocab_size"])
    k = d.n // 4
    every = d.windows(range(d.n))[0]
    index = {tuple(row.tolist()): i for i, row in enumerate(every)}
    picked = [index[tuple(row.tolist())] for x, _ in d.eval_batches(k) for row in x]
    assert len(picked) == k and max(picked) > 0.75 * d.n and min(picked) < 0.25 * d.n  # not the first pages
    other = TokenWindows(val, 16, 7, seed=2, vocab_size=TINY["vocab_size"])  # another batch size and seed
    assert [index[tuple(r.tolist())] for x, _ in other.eval_batches(k) for r in x] == picked
    assert sum(x.shape[0] for x, _ in d.eval_batches(10 * d.n)) == d.n  # all of it when small


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(tokenizer_stage):
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused", **{k: v for k, v in TINY.items() if k != "vocab_size"})
    model = build_model(TINY["vocab_size"], cfg).eval()
    prompt = list(range(4, 4 + TINY["n_positions"] + 30))
    with pytest.warns(UserWarning, match=f"prompt has {len(prompt)} tokens.*only its last"):
        new = generate(model, prompt, max_new_tokens=8, greedy=True)
    assert 1 <= len(new) <= 8


def test_profile_none_means_t4_on_a_gpu_and_demo_on_a_cpu(monkeypatch, tmp_path):
    assert pg.resolve_profile(None)[0] == "demo"  # this machine has no GPU
    assert pg.make_config(pg.PretrainConfig, None, run_dir=str(tmp_path)).n_embd == 128
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    profile, why = pg.resolve_profile(None)
    assert profile == "t4" and "Tesla T4" in why
    assert pg.make_config(pg.PretrainConfig, None, run_dir=str(tmp_path)).n_embd == 384
    with pytest.raises(pg.PocketGPTError, match="profile='t5' is unknown"):
        pg.resolve_profile("t5")


def test_mfu_peaks_are_looked_up_by_whole_gpu_names():
    assert peak_for_name("NVIDIA L40S", "bf16") == 362e12  # not the L4's 121
    assert peak_for_name("NVIDIA L4", "bf16") == 121e12
    assert peak_for_name("Tesla T4", "fp16") == 65e12 and peak_for_name("Tesla T4", "fp32") == 8.1e12
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for_name("NVIDIA GeForce RTX 4090", "bf16") is None  # unknown: no MFU rather than a wrong one


def schedule_cfg(**kw):
    return pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused", **{
        "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 100, **kw})


def test_wsd_warms_up_holds_then_decays_to_min_lr_on_the_last_step():
    cfg = schedule_cfg(schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])  # stable
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))  # decaying over the last 20 steps
    assert lrs[-1] == pytest.approx(1e-4)
    cosine = [lr_at(s, schedule_cfg(schedule="cosine")) for s in range(100)]
    assert cosine[-1] == pytest.approx(1e-4) and all(a >= b for a, b in zip(cosine[10:], cosine[11:]))


def test_max_steps_auto_fills_one_session_and_ends_annealed(tokenizer_stage, tmp_path):
    """A budget-limited single session on the real clock: the plan ends inside it, at min_lr."""
    budget_h = 12 / 3600  # room for the plan, and for re-plans on a machine half as fast
    started = time.time()
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps="auto", max_hours=budget_h,
                                             log_interval=20, eval_interval=100, warmup_steps=10,
                                             max_epochs=1000))  # the budget, not the tiny corpus, sets the plan
    wall = time.time() - started
    m, rows = pg.read_json(out / "metrics.json"), read_log(out / "log.csv")
    assert m["planned"] and m["finished"] and m["stop_reason"] == "max_steps" and m["steps"] == m["max_steps"]
    assert m["steps"] > 2 * PLAN_PROBE_STEPS[1] and rows[-1]["elapsed_s"] > 0.5 * budget_h * 3600  # it filled the session
    assert rows[-1]["step"] == m["steps"] and rows[-1]["lr"] == pytest.approx(pg.PROFILES["demo"]["pretrain"]["min_lr"])
    assert wall < budget_h * 3600 + 3
    assert pg.read_json(out / "manifest.json")["params"]["max_steps"] == "auto"  # what was asked; metrics: the plan
    assert load_checkpoint(out)["state"]["max_steps"] == m["steps"]  # a resumed session keeps the plan


def muon_steps(opt_cls, w0, grads, **kw):
    w = torch.nn.Parameter(w0.clone())
    opt = opt_cls([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
def test_our_muon_is_torch_muon_to_the_bit_where_both_apply():
    """pocketGPT's Muon exists for one thing torch.optim.Muon cannot do (Q|K|V as three blocks);
    on any other matrix it must be the same optimizer."""
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (96, 96)]:
        w0, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
        ours = muon_steps(Muon, w0, grads, lr=0.02, weight_decay=0.1)
        theirs = muon_steps(torch.optim.Muon, w0, grads, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        assert torch.equal(ours, theirs), shape


def test_muon_needs_no_transpose_of_hf_conv1d_weights():
    """HF GPT-2 keeps its matrices as Conv1D (in x out), nanoGPT as Linear (out x in). Muon's update for
    the transposed matrix is the transpose of its update, the fused Q|K|V included: the layout does not
    change training."""
    torch.manual_seed(0)
    for shape in [(64, 192), (64, 256)]:  # Conv1D's c_attn (in x 3*in) and c_fc (in x 4*in)
        w0, grads = torch.randn(shape), [torch.randn(shape) for _ in range(2)]
        conv1d = muon_steps(Muon, w0, grads, lr=0.02)
        linear = muon_steps(Muon, w0.T.contiguous(), [g.T.contiguous() for g in grads], lr=0.02)
        assert torch.allclose(conv1d, linear.T, atol=1e-3), shape  # Newton-Schulz runs in bf16: equal to its rounding
        assert not torch.allclose(conv1d, w0, atol=1e-2)  # and it did move


def test_muon_orthogonalizes_a_fused_qkv_matrix_as_three_blocks():
    torch.manual_seed(0)
    g = torch.randn(32, 96)  # Conv1D's c_attn: Q | K | V side by side
    split = muon_steps(Muon, torch.zeros(32, 96), [g], lr=1.0, momentum=0.0, nesterov=False)
    fused = muon_steps(Muon, torch.zeros(32, 96), [g], lr=1.0, momentum=0.0, nesterov=False, split_qkv=False)
    for block, grad in zip(split.chunk(3, dim=1), g.chunk(3, dim=1)):  # each block: -0.2*sqrt(32) * its own polar factor
        expected = -0.2 * 32 ** 0.5 * orthogonalize(grad).float()
        assert torch.allclose(block, expected, atol=1e-3)
    assert not torch.allclose(split, fused, atol=1e-2)


def test_muon_trains_the_block_matrices_and_adamw_the_rest(tokenizer_stage):
    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused", **{k: v for k, v in TINY.items() if k != "vocab_size"})
    model = build_model(TINY["vocab_size"], cfg)
    adamw, muon = make_optimizers(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")}
    assert "transformer.wte.weight" not in in_muon  # the embedding (and the tied lm_head) stays with AdamW
    assert len(make_optimizers(model, pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused",
                                                        optimizer="adamw"), torch.device("cpu"))) == 1


def test_resuming_with_another_optimizer_names_the_parameter(tokenizer_stage, tmp_path):
    part = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=12), stop_at_step=4)
    with pytest.raises(pg.PocketGPTError, match="that run trained with adamw \\+ muon.*set optimizer='muon'"):
        pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=12, optimizer="adamw",
                                           resume_from=str(part)))


def test_every_log_row_reaches_tensorboard_through_accelerate(tokenizer_stage, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=20, log_with="tensorboard"))
    rows = read_log(out / "log.csv")
    runs = list((out / "trackers").glob("pretrain*"))
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0])).Reload()
    train = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert train == [(int(r["step"]), pytest.approx(r["train_loss"], rel=1e-6)) for r in rows if r["train_loss"] is not None]
    assert [e.step for e in events.Scalars("val_loss")] == [int(r["step"]) for r in rows if r["val_loss"] is not None]
    assert {"lr", "tokens_per_s", "tokens"} <= set(events.Tags()["scalars"])


def test_a_tracker_that_is_not_installed_or_unknown_is_named(tokenizer_stage, tmp_path, monkeypatch):
    with pytest.raises(pg.PocketGPTError, match=r"log_with='tensorbored': 'tensorbored' is not one of accelerate's trackers"):
        pretrain_cfg(tokenizer_stage, tmp_path, log_with="tensorbored")
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(pg.PocketGPTError, match=r"the wandb package is not installed \(pip install wandb\)"):
        pretrain_cfg(tokenizer_stage, tmp_path, log_with=["tensorboard", "wandb"])


def test_a_launcher_that_starts_fewer_processes_than_asked_is_said(tokenizer_stage, tmp_path):
    """`accelerate launch --num_processes 2` on a machine without GPUs starts one process, in silence (it needs
    --multi_gpu): the stage says so, and the README's command for two CPU processes does start two."""
    import os
    import subprocess
    import sys

    args = ["-p", "tokenizer_dir", str(tokenizer_stage), "-p", "precision", "fp32", "-p", "max_steps", "4"]
    for k in ["n_layer", "n_head", "n_embd", "n_positions", "batch_size"]:
        args += ["-p", k, str(TINY[k])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    for flags, processes in [(["--num_processes", "2"], 1), (["--multi_gpu", "--num_processes", "2"], 2)]:
        run = tmp_path / str(processes)
        proc = subprocess.run([*accelerate, *flags, str(HERE / "pocketgpt_utils.py"), "stage", "pretrain", "--profile",
                               "demo", "-p", "run_dir", str(run), *args], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert pg.read_json(run / "pretrain" / "metrics.json")["processes"] == processes
        said = "note: the launcher was asked for 2 processes (--num_processes 2) and started 1" in proc.stdout
        assert said == (processes == 1), proc.stdout[-2000:]
        assert proc.stdout.count("done: ") == 1  # rank 0 alone reports


def test_newton_schulz_runs_in_fp32_on_a_gpu_without_native_bf16(tokenizer_stage, tmp_path, monkeypatch, capsys):
    """A T4 only emulates bf16: Muon orthogonalizes in fp32 there, bf16 from compute capability 8.0 (and on a
    CPU, where bf16 measured faster); the run says which in its log and metrics."""
    import pocketgpt.device as device

    cfg = pg.make_config(pg.PretrainConfig, "demo", run_dir="/tmp/unused", **{k: v for k, v in TINY.items() if k != "vocab_size"})
    model = build_model(TINY["vocab_size"], cfg)
    assert make_optimizers(model, cfg, torch.device("cpu"))[1].param_groups[0]["newton_schulz"] == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4
    assert device.newton_schulz_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an H100
    assert device.newton_schulz_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.undo()
    g = torch.randn(32, 96)
    q = orthogonalize(g, dtype=torch.float32)
    assert q.dtype == torch.float32 and not torch.equal(q, orthogonalize(g).float())  # fp32's rounding, not bf16's
    capsys.readouterr()
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path, max_steps=4, newton_schulz="fp32"))
    assert pg.read_json(out / "metrics.json")["newton_schulz"] == "fp32"
    assert "Muon: Newton-Schulz in fp32 (this device has no native bf16)" in capsys.readouterr().out


def test_a_plan_that_the_data_limits_ends_decayed_early_and_a_resumed_session_keeps_it(tokenizer_stage, tmp_path, capsys):
    """max_steps="auto" on a corpus far too small for its budget: the plan is max_epochs' worth of steps (not
    what the clock would allow), says it is data-limited, ends decayed there, well inside the budget; a session
    stopped on the way and resumed keeps the same limit."""
    budget_h = 120 / 3600
    kw = dict(max_steps="auto", max_hours=budget_h, max_epochs=1, log_interval=20, eval_interval=1000, warmup_steps=5)
    windows = TokenWindows(tokenizer_stage / "train.bin", TINY["n_positions"], TINY["batch_size"], 0, TINY["vocab_size"])
    limit = windows.steps_for(1, 1)
    started = time.time()
    out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "a", **kw))
    wall = time.time() - started
    m, rows = pg.read_json(out / "metrics.json"), read_log(out / "log.csv")
    assert m["data_limited"] and m["max_steps"] == m["steps"] == limit and m["finished"] and m["stop_reason"] == "max_steps"
    assert rows[-1]["lr"] == pytest.approx(pg.PROFILES["demo"]["pretrain"]["min_lr"])  # decayed at the data's end
    said = capsys.readouterr().out
    assert "plan (max_steps='auto'): data-limited: 1 epoch of " in said and "a larger corpus or model would use the rest" in said
    assert f"; micro-batch {TINY['batch_size']} x 1 accumulated; ends about " in said  # what each step is made of
    assert " epoch 0." in said and wall < 0.5 * budget_h * 3600  # the stage ended early
    fig = pg.plot_losses({"pretrain": out / "log.csv"}, show=False)
    assert fig.axes[0].get_title().startswith("pretrain: 1.00 epochs (dotted: each epoch's end)")
    epoch = m["train_tokens_available"]  # one pass over train.bin: a dotted line where it ends
    assert [list(line.get_xdata()) for line in fig.axes[0].lines if line.get_linestyle() == ":"] == [[epoch, epoch]]
    part = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", **kw), stop_at_step=limit // 2)
    again = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", resume_from=str(part), **kw))
    m2 = pg.read_json(again / "metrics.json")
    assert m2["steps"] == m2["max_steps"] == limit and m2["finished"]
    assert m2["final_val_loss"] == pytest.approx(m["final_val_loss"], abs=2e-4)


def test_a_stop_evaluates_its_step_once_and_a_stop_mid_window_leaves_the_window_open(tokenizer_stage, tmp_path):
    """The end of a run that stops before max_steps: a stop on an evaluation step adds nothing, a stop on a log step
    evaluates that row, and a stop between log steps adds an evaluated row without a training loss while the open
    window (its sums and steps) goes into the checkpoint, so the resumed run's next row is the uninterrupted one's."""
    kw = dict(max_steps=12, log_interval=2, eval_interval=4)
    tokens_per_step = TINY["batch_size"] * TINY["n_positions"]
    full = read_log(pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "full", **kw)) / "log.csv")
    for stop, steps, window_steps in [(8, [2, 4, 6, 8], 0), (6, [2, 4, 6], 0), (7, [2, 4, 6, 7], 1)]:
        out = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / str(stop), **kw), stop_at_step=stop)
        rows, m = read_log(out / "log.csv"), pg.read_json(out / "metrics.json")
        state = load_checkpoint(out)["state"]
        assert [r["step"] for r in rows] == steps and rows[-1]["val_loss"] is not None, stop
        assert m["stop_reason"] == "stopped" and not m["finished"] and m["steps"] == state["step"] == stop
        assert m["final_val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-4) and m["tokens"] == stop * tokens_per_step
        assert state["window"]["steps"] == window_steps and len(state["log"]) == len(rows)
        last = rows[-1]
        if window_steps:  # mid-window: the row holds the evaluation; the training loss waits for the resumed run
            assert last["train_loss"] is None and last["tokens_per_s"] is None and last["grad_norm"] is None
            assert last["tokens"] == stop * tokens_per_step and state["tokens"] == 6 * tokens_per_step
            resumed = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / str(stop), resume_from=str(out), **kw))
            again = {r["step"]: r for r in read_log(resumed / "log.csv")}
            assert again[8]["train_loss"] == pytest.approx(full[3]["train_loss"], abs=2e-4)
            assert again[8]["tokens"] == full[3]["tokens"] == 8 * tokens_per_step
        else:  # the stop's own row, once, with its training loss and its evaluation
            assert last["train_loss"] is not None and last["tokens_per_s"] is not None
            assert last["train_loss"] == pytest.approx(full[len(steps) - 1]["train_loss"], abs=2e-4)


def test_a_finished_run_resumed_again_trains_nothing_and_writes_its_log_into_the_new_folder(tokenizer_stage, tmp_path):
    kw = dict(max_steps=8, log_interval=2, eval_interval=4)
    done = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "a", **kw))
    again = pg.run_pretrain_stage(pretrain_cfg(tokenizer_stage, tmp_path / "b", resume_from=str(done), **kw))
    assert again != done and (again / "log.csv").read_text() == (done / "log.csv").read_text()
    m, before = pg.read_json(again / "metrics.json"), pg.read_json(done / "metrics.json")
    assert m["session_steps"] == 0 and m["steps"] == 8 and m["finished"] and m["stop_reason"] == "max_steps"
    for key in ["final_val_loss", "final_train_loss", "tokens"]:
        assert m[key] == before[key], key
    a, b = pg.load_model(done / "model").state_dict(), pg.load_model(again / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
