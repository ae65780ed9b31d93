"""The seed's inference code, run on an exported folder in a fresh process: what a user who downloads it gets.

    python -m pocketgpt.seed_check FOLDER PROMPT      # prints one JSON line, read by export.verify_export

Imports: only what the seed's code imports (transformers, torch, numpy): nothing of pocketGPT, so the
folder is checked as it stands on its own. So its literals (the prompt format, top_p=0.9, temperature=0.8, the
special tokens) are the seed's code, copied, on purpose: pocketGPT's own are model.SAMPLING, dialogs'
CHAT_TEMPLATE and common.SPECIAL_TOKENS (tests/test_facts_once.py knows this copy).
"""
import json
import sys

import torch
from transformers import GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast

PROBE = "Tokenizers split text: naïve café 🤗 <|eos|>  x\n\ty<pad>"  # specials glued to text, odd whitespace


def seed_inference(path: str, prompt: str) -> dict:
    """The seed's loading and generate() call on the folder (the seed's max_length=384 was its model's context:
    here the folder's own, so a grown model generates to its new length), the logits of its prompt, and the slow
    tokenizer built from vocab.json and merges.txt against the fast one."""
    model = GPT2LMHeadModel.from_pretrained(path); tokenizer = GPT2TokenizerFast.from_pretrained(path)  # noqa: E702
    slow = GPT2Tokenizer(vocab=f"{path}/vocab.json", merges=f"{path}/merges.txt", bos_token="<|bos|>",
                         eos_token="<|eos|>", unk_token="<unk>", pad_token="<pad>")
    inputs = tokenizer.encode(f"<|bos|>Instruction: {prompt}\nResponse:", return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(inputs, max_length=model.config.n_positions, do_sample=True, top_p=0.9,
                         temperature=0.8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(inputs).logits[0].numpy()
    return {"text": tokenizer.decode(out[0], skip_special_tokens=True), "logits": logits.tolist(),
            "generated_to": out.shape[1], "max_length": model.config.n_positions,
            "len_tokenizer": len(tokenizer), "vocab_size": model.config.vocab_size, "dtype": str(model.dtype),
            "slow_ids_equal": slow.encode(PROBE) == tokenizer.encode(PROBE) and len(slow) == len(tokenizer),
            "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}


if __name__ == "__main__":
    print(json.dumps(seed_inference(sys.argv[1], sys.argv[2])))
