"""GGUF for llama.cpp, written with the `gguf` package from a Hugging Face model folder.

Owns: the tensor mapping and tokenizer metadata of a gpt2 GGUF (with pocketGPT's chat template), the file
types it writes (f32, f16, q8_0) and reading one back. Running a GGUF in llama.cpp is llama.py's.
Imports: common, files, dialogs (CHAT_TEMPLATE); `gguf` where a function needs it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from .common import PocketGPTError
from .dialogs import CHAT_TEMPLATE
from .files import write_file

GGUF_FTYPES = ("f32", "f16", "q8_0")  # the file types write_gguf can produce


def gguf_file_types() -> dict:
    """The code in a GGUF's general.file_type of each file type write_gguf writes."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_tensors(model):
    """Map a GPT2LMHeadModel's weights to llama.cpp's gpt2 tensor names, as float32 arrays.

    llama.cpp names tensors by role (blk.N.attn_qkv, ...) and stores every matrix as
    [out, in]; HF GPT-2 keeps its attention and MLP matrices in Conv1D layout [in, out], so
    those are transposed. Embeddings are [vocab, n_embd] in both and are not transposed.
    """
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    t = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "output_norm.bias": sd["transformer.ln_f.bias"],
    }
    for i in range(model.config.n_layer):
        h, b = f"transformer.h.{i}.", f"blk.{i}."
        t[b + "attn_norm.weight"] = sd[h + "ln_1.weight"]
        t[b + "attn_norm.bias"] = sd[h + "ln_1.bias"]
        t[b + "attn_qkv.weight"] = sd[h + "attn.c_attn.weight"].T  # Conv1D [in, out] -> [out, in]
        t[b + "attn_qkv.bias"] = sd[h + "attn.c_attn.bias"]
        t[b + "attn_output.weight"] = sd[h + "attn.c_proj.weight"].T
        t[b + "attn_output.bias"] = sd[h + "attn.c_proj.bias"]
        t[b + "ffn_norm.weight"] = sd[h + "ln_2.weight"]
        t[b + "ffn_norm.bias"] = sd[h + "ln_2.bias"]
        t[b + "ffn_up.weight"] = sd[h + "mlp.c_fc.weight"].T
        t[b + "ffn_up.bias"] = sd[h + "mlp.c_fc.bias"]
        t[b + "ffn_down.weight"] = sd[h + "mlp.c_proj.weight"].T
        t[b + "ffn_down.bias"] = sd[h + "mlp.c_proj.bias"]
    if not model.config.tie_word_embeddings:  # tied: no output.weight, llama.cpp reuses token_embd
        t["output.weight"] = sd["lm_head.weight"]
    return {name: np.ascontiguousarray(arr) for name, arr in t.items()}


def gguf_encode_tensor(name, arr, ftype):
    """Return (data, raw_dtype) for one tensor in the requested file type.

    Only 2-D weight matrices are converted: norms and biases are tiny and precision-critical,
    and position_embd stays F32 as in llama.cpp's own converter, so they are always F32.
    """
    import gguf

    if ftype == "f32" or arr.ndim != 2 or name == "position_embd.weight":
        return arr.astype(np.float32), None
    if ftype == "f16":
        return arr.astype(np.float16), None
    if arr.shape[-1] % 32:  # q8_0 packs rows in blocks of 32 values
        raise PocketGPTError(f"q8_0 needs rows divisible by 32; {name} has shape {arr.shape}")
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(arr, qtype), qtype


def gguf_vocab(hf_dir, n_vocab):
    """Tokens, token types and merges for the GGUF tokenizer, read from tokenizer.json.

    Tokens go in as the raw byte-level strings of the vocab ("Ġthe"), which is how llama.cpp's
    gpt2 tokenizer expects them. Special tokens become CONTROL so llama.cpp only matches them
    when asked to parse specials, like HF. If the model's embedding has more rows than the
    tokenizer has tokens, the list is padded with unused tokens so the two sizes agree.
    """
    import gguf
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    id_to_token = {i: s for s, i in tj["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in tj["added_tokens"]:
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if len(id_to_token) > n_vocab or max(id_to_token) >= n_vocab:
        raise PocketGPTError(f"{hf_dir}: tokenizer has {len(id_to_token)} tokens, model vocab_size is {n_vocab}")
    tokens, token_types = [], []
    for i in range(n_vocab):
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, gguf.TokenType.UNUSED))
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older versions as "a b" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, token_types, merges


def add_gguf_metadata(w, hf_dir, cfg, tokenizer, ftype):
    """What llama.cpp reads before the tensors: the gpt2 hyperparameters, the file type, and the tokenizer
    (vocabulary, merges, special ids, pocketGPT's chat template)."""
    import gguf

    # hyperparameters llama.cpp reads for arch gpt2
    w.add_name(os.path.basename(os.path.normpath(hf_dir)))
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)  # HF: n_inner=None means 4*n_embd
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf_file_types()[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tokenizer: byte-level BPE with the GPT-2 pre-tokenizer regex, exactly as HF runs it
    tokens, token_types, merges = gguf_vocab(hf_dir, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # without it llama.cpp splits words differently from HF
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    # HF's GPT2Tokenizer adds no bos (our prompts carry <|bos|> in the text); llama.cpp must agree
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    w.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    # llama.cpp's chat (llama-cli -cnv, llama-server, create_chat_completion) renders this template
    # and stops at <|eos|>; without it they format prompts with some default template
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_eot_token_id(tokenizer.eos_token_id)


def write_gguf(hf_dir, out_path, ftype="f16"):
    """Write the HF model folder hf_dir as a llama.cpp GGUF file (arch "gpt2") and return its path.

    The file is written through write_file (a temporary name, renamed once whole), so an interrupted
    export never leaves a file that looks finished, and a full disk says so.
    """
    import gguf

    if ftype not in GGUF_FTYPES:
        raise PocketGPTError(f"ftype must be one of {GGUF_FTYPES}, got {ftype!r}")
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
    cfg = model.config
    # llama.cpp's gpt2 graph is the plain GPT-2 block; refuse configs it would silently run wrong
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise PocketGPTError(f"llama.cpp gpt2 uses tanh-GELU; config has {cfg.activation_function!r}")
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
        raise PocketGPTError("llama.cpp gpt2 supports only the standard 1/sqrt(head_dim) attention scaling")

    def write(tmp):  # through the one door: a temporary name, renamed once whole
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        try:
            add_gguf_metadata(w, hf_dir, cfg, tokenizer, ftype)
            for name, arr in tensors.items():
                data, raw_dtype = gguf_encode_tensor(name, arr, ftype)
                w.add_tensor(name, data, raw_dtype=raw_dtype)

            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    tensors = gguf_tensors(model)
    bytes_per_value = {"f32": 4, "f16": 2, "q8_0": 34 / 32}[ftype]  # q8_0: 32 int8 and one fp16 scale per block
    write_file(out_path, write, needed=int(bytes_per_value * sum(a.size for a in tensors.values())))
    return Path(out_path)


def gguf_ftype(gguf_path):
    """The file type write_gguf used ("f32", "f16", "q8_0"), read back from the file."""
    import gguf
    ftype = int(gguf.GGUFReader(gguf_path).fields["general.file_type"].contents())
    return {int(code): name for name, code in gguf_file_types().items()}[ftype]
