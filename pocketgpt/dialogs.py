"""Dialogs: the seed's template, the four layouts a dialog file comes in, and their ids.

Owns: CHAT_TEMPLATE (<|bos|>Instruction: {prompt}\nResponse: {answer}<|eos|>, turn after turn); finding
the layout and columns of a CSV/JSONL/Parquet file (question/answer, Alpaca, chat messages, ShareGPT);
reading it into (prompt, answer) examples, one per assistant turn; their ids and targets (loss on the
answer only), cut to the context; the prompt the seed feeds generate().
Imports: common, data, demo, tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import BOS_ID, EOS_ID, IGNORE_ID, PocketGPTError, on_kaggle, progress
from .data import (
    DIALOG_FORMATS,
    attached_input,
    csv_read_as,
    data_files,
    data_format,
    iter_table,
    open_table,
    row_place,
)
from .demo import demo_data
from .tokenizer import encode_text

CHAT_TEMPLATE = (  # the seed's format: <|bos|>Instruction: {prompt}\nResponse: {answer}<|eos|>, turn after turn;
    # a system text goes before the next instruction, as training reads it (conversation_texts)
    "{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '<|bos|>Instruction: ' + ns.system + m['content'] + '\\n' }}"
    "{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ 'Response: ' + m['content'] + '<|eos|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Response:' }}{% endif %}")




CHAT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


COLUMN_PAIRS = [("question", "answer"), ("instruction", "response"), ("prompt", "completion"),
                ("input", "output"), ("prompt", "response"), ("instruction", "output"), ("query", "response"),
                ("question", "response"), ("user", "assistant")]


def dialog_files(dialogs_path, run_dir) -> list[Path]:
    """The dialog files (CSV, JSONL, Parquet, Arrow, save_to_disk folders): a file, a folder or a glob;
    None = the demo dialogs (on Kaggle: the one attached dialogs.csv, dialogs.jsonl, ...)."""
    if dialogs_path is None:
        dialogs_path = str(attached_input("dialogs", "dialogs_path", DIALOG_FORMATS) if on_kaggle()
                           else demo_data(run_dir, "dialogs"))
    return data_files(dialogs_path, "dialogs_path", DIALOG_FORMATS, "Pass the file of instruction/response pairs "
                      "or chats (CSV, JSONL, Parquet; on Kaggle, attach its dataset).")


def detect_columns(columns, prompt_column=None, response_column=None, file="") -> tuple[str, str]:
    """The prompt and response columns: as given, or the first known pair (any case)."""
    lower = {c.strip().lower(): c for c in columns}
    if prompt_column or response_column:
        for name, param in [(prompt_column, "prompt_column"), (response_column, "response_column")]:
            if name is None or name not in columns:
                raise PocketGPTError(f"{file}: {param}={name!r} is not a column; the columns are {list(columns)}. "
                                     f"Set both prompt_column and response_column.")
        return prompt_column, response_column
    for p, r in COLUMN_PAIRS:
        if p in lower and r in lower:
            return lower[p], lower[r]
    raise PocketGPTError(f"{file}: no prompt/response columns found among {list(columns)}. Name them with "
                         f"prompt_column=... and response_column=... (known pairs: "
                         f"{', '.join('/'.join(pr) for pr in COLUMN_PAIRS[:4])}, ...), or give the file a chat "
                         f"column (messages, conversations) or Alpaca's instruction/input/output.")


def detect_layout(columns, prompt_column=None, response_column=None, file="") -> tuple[str, list[str]]:
    """Which of the four layouts a dialog file is in, and the columns it is read from: chat `messages`
    (role/content), ShareGPT `conversations` (from/value), Alpaca's instruction/input/output, or a
    prompt/response pair of columns ("question/answer": named, or found by detect_columns)."""
    lower = {c.strip().lower(): c for c in columns}
    if not (prompt_column or response_column):
        for layout in ("messages", "conversations"):
            if layout in lower:
                return layout, [lower[layout]]
        if {"instruction", "input", "output"} <= set(lower):
            return "alpaca", [lower[c] for c in ("instruction", "input", "output")]
    return "question/answer", list(detect_columns(columns, prompt_column, response_column, file))


def table_rows(file, holds: str):
    """A dialog or preference file's columns, and its rows as (where, {column: value}), streamed."""
    fmt = data_format(file, "csv")
    parts, columns = open_table(file, fmt)
    if not columns:
        raise PocketGPTError(f"{file} is empty: it needs {'a header row and ' if fmt == 'csv' else ''}{holds}.")

    def rows():
        for start, batch in iter_table(parts, file, fmt, columns):
            for k in range(len(batch[columns[0]])):
                yield row_place(file, fmt, start + k), {c: batch[c][k] for c in columns}
    return columns, rows()


def cell_text(value, where: str, column: str) -> str:
    """A cell as text, stripped: None is empty, a number is written out, a list or a record is an error."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        raise PocketGPTError(f"{where}: the {column!r} cell is a {type(value).__name__}, not text. Check which "
                             f"columns hold the text (prompt_column, response_column), or use a chat layout.")
    return str(value).strip()


def message_parts(m) -> tuple:
    """A chat message's role and text: role/content (chat) or from/value (ShareGPT); (None, None) for
    something that is not a message."""
    if not isinstance(m, dict):
        return None, None
    return m.get("role") or m.get("from"), m["content"] if m.get("content") is not None else m.get("value")


def conversation_texts(messages, where: str, column: str) -> list[str]:
    """A chat cell as its texts, user and assistant in turn: [u1, a1, u2, a2, ...].

    Messages are role/content (chat) or from/value (ShareGPT: human, gpt), as a list or its JSON text.
    A system text goes before the next user text, a blank line between, as CHAT_TEMPLATE renders it.
    Another role, or turns out of order, is an error that names the message."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise PocketGPTError(f"{where}: the {column!r} cell is not a JSON list of messages ({e}).") from None
    if not isinstance(messages, (list, tuple)):
        raise PocketGPTError(f"{where}: the {column!r} cell is a {type(messages).__name__}, not a list of messages "
                             f"(records with role and content, or from and value).")
    texts, system = [], []
    for k, m in enumerate(messages, 1):
        role, content = message_parts(m)
        kind = CHAT_ROLES.get(str(role).strip().lower())
        if kind is None:
            raise PocketGPTError(f"{where}: message {k} of the {column!r} cell has the role {role!r}. pocketGPT learns "
                                 f"from system, user and assistant turns (ShareGPT: system, human, gpt): map or "
                                 f"remove the others.")
        text = cell_text(content, where, column)
        if kind == "system":
            system.append(text)
            continue
        expected = "user" if len(texts) % 2 == 0 else "assistant"
        if kind != expected:
            raise PocketGPTError(f"{where}: message {k} of the {column!r} cell is the {kind}'s where the {expected}'s "
                                 f"turn belongs. Turns must alternate user, assistant, starting with user: merge or "
                                 f"remove it.")
        texts.append("\n\n".join(system + [text]) if kind == "user" else text)
        system = system if kind == "assistant" else []
    return texts


def read_dialogs(files, prompt_column=None, response_column=None) -> tuple[list[tuple], dict]:
    """Read every file into (prompt, response) examples, stripped, without empty ones or exact duplicates.

    A row is one example; a chat row is one per assistant turn, whose prompt is the conversation before
    it: (u1, a1, ..., un), or the instruction alone for the first turn (as every other layout gives).
    Alpaca's instruction and a non-empty input form the prompt, a blank line between. The report counts
    the rows of each layout and what was dropped."""
    pairs, report = [], {"files": [str(f) for f in files], "rows_read": 0, "rows_by_layout": {}, "examples": 0,
                         "dropped_empty": 0, "dropped_duplicates": 0}
    for f in files:
        columns, rows = table_rows(f, "instruction/response rows")
        layout, used = detect_layout(columns, prompt_column, response_column, f)
        report.setdefault("columns", {})[str(f)] = used
        report.setdefault("layouts", {})[str(f)] = layout
        if data_format(f, "csv") == "csv":
            report.setdefault("read_as", {})[str(f)] = csv_read_as(f)
        for where, row in rows:
            report["rows_read"] += 1
            report["rows_by_layout"][layout] = report["rows_by_layout"].get(layout, 0) + 1
            if layout in ("messages", "conversations"):
                texts = conversation_texts(row[used[0]], where, used[0])
                if len(texts) < 2:
                    raise PocketGPTError(f"{where}: the {used[0]!r} cell has no assistant turn, so nothing to learn "
                                         f"from. Add the answer or remove the row.")
                examples = [(texts[0] if k == 1 else tuple(texts[:k]), texts[k]) for k in range(1, len(texts), 2)]
            elif layout == "alpaca":
                instruction, extra, output = (cell_text(row[c], where, c) for c in used)
                examples = [(f"{instruction}\n\n{extra}" if instruction and extra else instruction, output)]
            else:
                examples = [tuple(cell_text(row[c], where, c) for c in used)]
            for prompt, response in examples:
                report["examples"] += 1
                last = prompt_turns(prompt)[-1]
                if not last or not response or last.lower() == "nan" or response.lower() == "nan":
                    report["dropped_empty"] += 1
                    continue
                pairs.append((prompt, response))
    unique = list(dict.fromkeys(pairs))
    report["dropped_duplicates"] = len(pairs) - len(unique)
    if not unique:
        raise PocketGPTError(f"{', '.join(map(str, files))}: no usable rows (every row had an empty prompt or response).")
    return unique, report


def prompt_turns(prompt) -> list[str]:
    """A prompt's texts: [instruction], or for a later turn of a chat [u1, a1, ..., un]."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def dialog_key(prompt, response) -> str:
    """The text a dialog is split by (split_of): its turns and its response, a line apart."""
    return "\n".join(prompt_turns(prompt) + [response])


def dialog_ids(tok, pairs) -> list[tuple[list[int], list[int]]]:
    """Ids of the seed's template and the training targets for each (prompt, answer) pair.

    Targets are -100 on the prompt; the answer and its <|eos|> are kept. <|bos|> and <|eos|> go
    in as ids and the text is encoded with special-token strings kept as text (encode_text), so
    an answer that quotes "<|eos|>" does not end there. The prompt ends exactly at "Response:";
    the answer brings its own leading space (a space left at the end of the prompt would merge
    with the answer's first word under byte-level BPE, a split the model never sees when it
    generates). A prompt with turns before it repeats the template for each of them, as
    CHAT_TEMPLATE renders the conversation; only the last answer has targets. Long rows are cut later."""
    turns = [prompt_turns(p) + [r] for p, r in pairs]
    prompts = iter(encode_text(tok, [chat_prompt(u).removeprefix("<|bos|>") for t in turns for u in t[0::2]]))
    answers = iter(encode_text(tok, [f" {a}" for t in turns for a in t[1::2]]))
    rows = []
    for t in turns:
        ids = []
        for _ in range(len(t) // 2):
            p, a = next(prompts), next(answers)
            ids += [BOS_ID, *p, *a, EOS_ID]
        rows.append((ids, [IGNORE_ID] * (len(ids) - len(a) - 1) + [*a, EOS_ID]))
    return rows


def encode_dialog(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    return dialog_ids(tok, [(prompt, response)])[0]


def encode_dialogs(tok, pairs, context: int, too_long: str, chunk: int = 2000,
                   kept_index: list | None = None) -> tuple[list, list, dict]:
    """Encode every pair (in batches: the Rust tokenizer works in parallel). A row longer than
    context+1 tokens first loses whole turns from the left of its conversation, as few as let it
    fit (its prompt then starts at a later turn); a row still too long gets its answer cut (still
    ending in <|eos|>) or is dropped, by `too_long`. Returns the kept pairs (prompts as cut), their
    rows and the counts (and, into `kept_index` when given, the index of each kept pair)."""
    kept, rows, truncated, dropped, history_cut = [], [], 0, 0, 0
    with progress(total=len(pairs), desc="encode dialogs", unit="row", disable=len(pairs) < 5000) as bar:  # seconds
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            for j, ((prompt, response), (ids, labels)) in enumerate(zip(part, dialog_ids(tok, part))):
                if len(ids) > context + 1 and not isinstance(prompt, str):  # each turn starts at its <|bos|>
                    starts = [i for i, t in enumerate(ids) if t == BOS_ID]
                    k = next((k for k, s in enumerate(starts) if len(ids) - s <= context + 1), len(starts) - 1)
                    ids, labels = ids[starts[k]:], labels[starts[k]:]
                    turns = prompt_turns(prompt)[2 * k:]
                    prompt = turns[0] if len(turns) == 1 else tuple(turns)
                    history_cut += 1
                if len(ids) > context + 1:
                    n_prompt = labels.count(IGNORE_ID)
                    if too_long == "drop" or n_prompt + 2 > context + 1:
                        dropped += 1
                        continue
                    ids = ids[:context] + [EOS_ID]
                    labels = labels[:context] + [EOS_ID]
                    truncated += 1
                kept.append((prompt, response))
                rows.append((ids, labels))
                if kept_index is not None:
                    kept_index.append(start + j)
            bar.update(len(part))
    return kept, rows, {"truncated": truncated, "dropped_too_long": dropped, "history_cut": history_cut}


def chat_prompt(prompt) -> str:
    """What the seed feeds generate(): the template up to and including "Response:"; a prompt with
    turns before it (u1, a1, ..., un) renders them first, as CHAT_TEMPLATE does."""
    *before, last = prompt_turns(prompt)
    turns = "".join(f"<|bos|>Instruction: {u}\nResponse: {a}<|eos|>" for u, a in zip(before[0::2], before[1::2]))
    return f"{turns}<|bos|>Instruction: {last}\nResponse:"


def chat_prompt_ids(tok, prompt) -> list[int]:
    """The seed's prompt as ids, <|bos|> (and <|eos|> after earlier turns) inserted as ids and the text kept as text."""
    *before, last = prompt_turns(prompt)
    turns = [i for ids, _ in dialog_ids(tok, list(zip(before[0::2], before[1::2]))) for i in ids] if before else []
    return [*turns, BOS_ID, *encode_text(tok, [chat_prompt(last).removeprefix("<|bos|>")])[0]]


def distinct_n(texts, n: int = 2) -> float:
    """Unique n-grams / all n-grams over the answers: low values mean the model repeats itself."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(words: list[str], n: int = 3) -> float:
    """Share of an answer's n-grams that repeat an earlier one: "the layer of the layer of the layer" is high."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def eos_and_repeats(new: list[list[int]], texts: list[str]) -> tuple[float, float]:
    """Of generated answers (their new ids and decoded texts): the share that end with <|eos|>, and the mean share
    of repeated 3-grams inside one -- how 04 scores answers and how the preference phase compares its own."""
    import numpy as np

    return (float(np.mean([bool(ids) and ids[-1] == EOS_ID for ids in new])),
            float(np.mean([repeated_ngram_share(t.split()) for t in texts])))
