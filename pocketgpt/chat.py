"""Chat: talk to an exported model (its folder through transformers, or a GGUF through llama.cpp) in a terminal.

Imports: common, config, stages, tokenizer, model, dialogs, llama.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from .common import PocketGPTError
from .config import SEED
from .dialogs import CHAT_TEMPLATE
from .llama import LLAMA_GREEDY, LLAMA_SKIPPED, llama_chat_ids, llama_cpp_problem, load_llama
from .model import SAMPLING, generate, load_model
from .stages import StageDir
from .tokenizer import load_tokenizer


class PrintStreamer(TextStreamer):
    """transformers' streamer, handing each finished piece of text to a function (not print)."""

    def __init__(self, tok, on_text):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.on_text(text)


class FolderChat:
    """A conversation with an export folder (or any pocketGPT model folder) through transformers,
    on the GPU where there is one, sampled as the seed samples unless greedy."""

    def __init__(self, path):
        folder = Path(path)
        folder = StageDir(folder).export if (StageDir(folder).export / "config.json").is_file() else folder
        self.model = load_model(folder).to("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(folder)
        self.tok.chat_template = self.tok.chat_template or CHAT_TEMPLATE
        self.n_ctx = self.model.config.n_positions
        self.where = f"{folder} (transformers, {self.model.device.type})"

    def prompt_ids(self, messages) -> list[int]:
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                 tokenizer_kwargs={"verbose": False}))  # a long one is cut after

    def answer(self, messages, max_new_tokens: int, greedy: bool, seed: int, on_text) -> str:
        new = generate(self.model, self.prompt_ids(messages), max_new_tokens, greedy=greedy, seed=seed,
                       streamer=PrintStreamer(self.tok, on_text))
        return self.tok.decode(new, skip_special_tokens=True).strip()


class GGUFChat:
    """The same conversation through llama.cpp (llama-cpp-python), which formats it with the chat
    template the GGUF carries and stops at <|eos|>: what llama-server and llama-cli do with it."""

    def __init__(self, path):
        problem = llama_cpp_problem(path)
        if problem == LLAMA_SKIPPED:
            raise PocketGPTError(f"{path} is a GGUF: chatting with it needs llama-cpp-python "
                                 f"(pip install llama-cpp-python), or chat with the export folder instead.")
        if problem:
            raise PocketGPTError(f"{path}: llama.cpp {problem.removeprefix('not run: llama.cpp ')}. Or chat with the "
                                 f"export folder instead.")
        self.llm = load_llama(path, n_ctx=0, logits_all=False)  # n_ctx=0: the model's own context
        if not self.llm.metadata.get("tokenizer.chat_template"):
            raise PocketGPTError(f"{path} carries no chat template (a GGUF from before it did): export again with 04.")
        self.n_ctx = int(self.llm.metadata["gpt2.context_length"])
        self.where = f"{path} (llama.cpp)"

    def prompt_ids(self, messages) -> list[int]:
        return llama_chat_ids(self.llm, messages)

    def answer(self, messages, max_new_tokens: int, greedy: bool, seed: int, on_text) -> str:
        room = self.n_ctx - len(self.prompt_ids(messages))
        if room < 1:
            raise PocketGPTError(f"the message is longer than the model's context ({self.n_ctx} tokens): shorten it.")
        sampling = (LLAMA_GREEDY if greedy else  # the seed's sampling, as transformers does it
                    dict(temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=50, min_p=0.0))
        parts = []
        for chunk in self.llm.create_chat_completion(messages=messages, max_tokens=min(max_new_tokens, room),
                                                     stream=True, seed=seed, **sampling):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                parts.append(text)
                on_text(text)
        return "".join(parts).strip()

    def close(self):
        self.llm.close()


def open_chat(path):
    """A FolderChat for a folder, a GGUFChat for a .gguf file; an error that says which paths work."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFChat(path)
    if path.is_dir() and ((path / "config.json").is_file() or (StageDir(path).export / "config.json").is_file()):
        return FolderChat(path)
    raise PocketGPTError(f"chat {path}: give an export folder (04's export/ or its pocketGPT/), a model folder "
                         f"with config.json, or a .gguf file.")


def fit_conversation(bot, messages: list[dict], room: int) -> list[dict]:
    """Drop the oldest exchanges (a system text stays) until the prompt leaves `room` tokens of the
    context for the answer; the newest message is always kept (generate() cuts it if it must)."""
    messages = list(messages)
    while len(bot.prompt_ids(messages)) > bot.n_ctx - room:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) <= 1:
            break
        messages = [m for i, m in enumerate(messages) if m["role"] == "system" or i >= users[1]]
    return messages


def chat(path, prompt: str | None = None, system: str | None = None, greedy: bool = False,
         max_new_tokens: int | None = None, seed: int = SEED) -> int:
    """`python pocketgpt_utils.py chat PATH`: a conversation in the terminal (each answer streams;
    earlier turns stay in the prompt while they fit the context; /reset forgets them; an empty
    line is ignored; Ctrl-D or /quit ends), or with `prompt` one answer, printed, for scripts."""
    bot = open_chat(path)
    max_new = max_new_tokens or bot.n_ctx // 2
    room = min(max_new, bot.n_ctx // 4)  # what an answer keeps at least, when old turns are dropped

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    base = [{"role": "system", "content": system}] if system else []
    try:
        if prompt is not None:
            messages = fit_conversation(bot, base + [{"role": "user", "content": prompt}], room)
            answer = bot.answer(messages, max_new, greedy, seed, on_text=lambda t: None)
            write(answer + "\n")
            return 0
        write(f"pocketGPT chat: {bot.where}, {'greedy' if greedy else 'sampled as the seed samples'}. "
              f"/reset forgets the conversation, Ctrl-D or /quit ends.\n")
        messages, turn = list(base), 0
        while True:
            write("you> ")
            line = sys.stdin.readline()
            if not line or line.strip() == "/quit":
                write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                messages = list(base)
                continue
            messages = fit_conversation(bot, messages + [{"role": "user", "content": text}], room)
            write("pocketGPT>")
            started = []  # the first piece starts after the "Response:" of the prompt: one space, not two

            def show(piece):
                write(piece if started else " " + piece.lstrip())
                started.append(True)
            answer = bot.answer(messages, max_new, greedy, seed + turn, on_text=show)
            write("\n")
            messages.append({"role": "assistant", "content": answer})
            turn += 1
    finally:
        if hasattr(bot, "close"):
            bot.close()
