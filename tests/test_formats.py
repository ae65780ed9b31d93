"""Your data in the shapes it comes in: corpora and dialogs as JSONL, Parquet, CSV, Arrow, saved datasets,
compressed, in every dialog layout, give the same documents and the same ids as the .txt and the CSV."""
import bz2
import csv
import gzip
import json
import shutil

import datasets
import pandas as pd
import pytest
import zstandard

import pocketgpt_utils as pg
from pocketgpt.common import BOS_ID
from pocketgpt.corpus import corpus_files, find_text_column, iter_documents, scan_corpus
from pocketgpt.data import CORPUS_FORMATS, attached_input, data_size
from pocketgpt.dialogs import (
    CHAT_TEMPLATE,
    chat_prompt,
    chat_prompt_ids,
    dialog_files,
    dialog_ids,
    encode_dialogs,
    prompt_turns,
    read_dialogs,
)
from pocketgpt.dpo import read_preference_pairs
from pocketgpt.tokenizer import encode_text

# --- writing the same data in every format ----------------------------------------------------------

def compress(path, suffix):
    """path + suffix, compressed as the suffix says (.gz, .bz2, .zst)."""
    out = path.with_name(path.name + suffix)
    data = path.read_bytes()
    if suffix == ".gz":
        out.write_bytes(gzip.compress(data))
    elif suffix == ".bz2":
        out.write_bytes(bz2.compress(data))
    else:  # two frames: a reader that stops after the first loses the rest
        c = zstandard.ZstdCompressor()
        out.write_bytes(c.compress(data[:len(data) // 2]) + c.compress(data[len(data) // 2:]))
    return out


def write_table(path, rows):
    """rows (a list of dicts) as the file's extension says: .jsonl, .json (one array), .parquet, .csv, .arrow,
    or a save_to_disk folder (no extension)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".arrow":
        ds = datasets.Dataset.from_list(rows)
        ds.save_to_disk(str(path.with_suffix(".saved")))
        shutil.copy(next(path.with_suffix(".saved").glob("*.arrow")), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def docs(demo_data):
    return list(iter_documents([demo_data / "corpus.txt"]))[:400]


@pytest.fixture(scope="module")
def small_txt(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(d + "\n\n" for d in docs), encoding="utf-8")
    return path


CORPUS_FILES = ["c.txt.gz", "c.txt.bz2", "c.txt.zst", "c.jsonl", "c.json", "c.parquet", "c.csv", "c.arrow", "saved",
                "c.jsonl.gz", "c.jsonl.bz2", "c.jsonl.zst", "c.csv.gz"]


def write_corpus(folder, name, docs, small_txt, column="text"):
    """The documents in the format `name` says; a .txt is the documents a blank line apart."""
    base = name.split(".")[0] + "." + name.split(".")[1] if "." in name else name
    if base.endswith(".txt"):
        shutil.copy(small_txt, folder / base)
    else:
        write_table(folder / base, [{"id": i, column: d} for i, d in enumerate(docs)])
    if name == base:
        return folder / base
    out = compress(folder / base, name[len(base):])
    (folder / base).unlink()
    return out


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_every_corpus_format_gives_the_documents_of_the_txt(tmp_path, docs, small_txt, name):
    path = write_corpus(tmp_path, name, docs, small_txt)
    assert list(iter_documents(corpus_files(path))) == docs
    bar = Bar()
    assert sum(1 for _ in iter_documents([path], progress=bar)) == len(docs)
    assert bar.n == data_size(path)  # progress in bytes on disk reaches the end, exactly


class Bar:
    n = 0

    def update(self, k):
        assert k >= 0
        self.n += k


@pytest.mark.parametrize("name", ["c.jsonl", "c.parquet", "c.jsonl.zst"])
def test_tokenizer_stage_writes_the_same_ids_from_a_table_as_from_the_txt(tmp_path, docs, small_txt, name):
    """The same documents as .txt, as JSON Lines or Parquet: the same tokenizer and the same train.bin/val.bin."""
    table = write_corpus(tmp_path, name, docs, small_txt, column="Content")  # found in any case
    outs = {}
    for key, corpus in [("txt", small_txt), ("table", table)]:
        cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path / key), corpus_path=str(corpus),
                             vocab_size=400, val_fraction=0.1)
        outs[key] = pg.build_tokenizer_stage(cfg)
    for f in ["tokenizer.json", "train.bin", "val.bin"]:
        assert (outs["txt"] / f).read_bytes() == (outs["table"] / f).read_bytes(), f
    meta = pg.read_json(outs["table"] / "meta.json")
    assert meta["text_columns"] == {str(table): "Content"} and meta["documents"] == len(docs)


def test_a_folder_of_jsonl_files_and_a_saved_dataset_dict(tmp_path, docs):
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        write_table(folder / f"part-{k}.jsonl", [{"text": d} for d in docs[k::3]])
    (folder / ".hidden.jsonl").write_text("not json\n")
    assert [f.name for f in corpus_files(folder)] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert sorted(iter_documents(corpus_files(folder))) == sorted(docs)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:300]}),
                                   "test": datasets.Dataset.from_dict({"text": docs[300:]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert corpus_files(tmp_path / "dict") == [tmp_path / "dict"]
    assert sorted(iter_documents([tmp_path / "dict"])) == sorted(docs)


def test_the_text_column_is_detected_in_any_case_or_named(tmp_path):
    assert find_text_column(["id", "CONTENT"]) == "CONTENT"
    assert find_text_column(["text", "body"]) == "text"
    assert find_text_column(["a", "Story"], "story") == "Story"
    path = write_table(tmp_path / "c.parquet", [{"title": "t", "body2": "one"}])
    with pytest.raises(pg.PocketGPTError, match=r"c.parquet: no text column found among \['title', 'body2'\]\. "
                                                r"Set text_column"):
        list(iter_documents([path]))
    assert list(iter_documents([path], text_column="body2")) == ["one"]
    with pytest.raises(pg.PocketGPTError, match=r"text_column='nope' is not a column; the columns are \['title', 'body2'\]"):
        list(iter_documents([path], text_column="nope"))


def test_rows_without_text_are_skipped_and_counted(tmp_path):
    path = write_table(tmp_path / "c.jsonl", [{"text": "a"}, {"text": None}, {"text": "  "}, {"text": "b\n\nc"}])
    scan = scan_corpus([path])
    assert (scan["documents"], scan["rows"], scan["empty_rows"]) == (2, 4, 2)
    assert list(iter_documents([path])) == ["a", "b\n\nc"]  # a row is one document, blank lines and all


# --- bad corpus input: a clear message, and no finished-looking folder -------------------------------

def tokenizer_fails(tmp_path, corpus, match, **kw):
    cfg = pg.make_config(pg.TokenizerConfig, "demo", run_dir=str(tmp_path), corpus_path=str(corpus), vocab_size=300, **kw)
    with pytest.raises(pg.PocketGPTError, match=match):
        pg.build_tokenizer_stage(cfg)
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "tokenizer.partial").exists()


def test_a_jsonl_line_that_is_not_json_is_named_with_its_line(tmp_path, caplog):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(5)]
    lines[3] = '{"text": "unterminated'
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer_fails(tmp_path, tmp_path / "c.jsonl", r"c.jsonl, line 4: not a JSON object .*fix or remove that line")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("datasets")]  # its own "in row 1" line
    compress(tmp_path / "c.jsonl", ".gz")
    tokenizer_fails(tmp_path, tmp_path / "c.jsonl.gz", r"c.jsonl.gz, line 4: not a JSON object")
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    tokenizer_fails(tmp_path, tmp_path / "d.jsonl", r"d.jsonl, line 2: not a JSON object \(a JSON list, not an object\)")
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    tokenizer_fails(tmp_path, tmp_path / "u.jsonl", r"u.jsonl, line 2: not a JSON object \(.*utf-8.*\)")


def test_an_unreadable_file_is_named(tmp_path, small_txt):
    (tmp_path / "c.parquet").write_bytes(b"this is not parquet at all")
    tokenizer_fails(tmp_path, tmp_path / "c.parquet", r"c.parquet cannot be read as Parquet \(.*\)\. Check that it is whole")
    whole = gzip.compress("".join(json.dumps({"text": line}) + "\n" for line in small_txt.read_text().splitlines()).encode())
    (tmp_path / "c.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a download that stopped halfway
    tokenizer_fails(tmp_path, tmp_path / "c.jsonl.gz", r"c.jsonl.gz is damaged or cut short")


def test_a_parquet_file_without_a_text_column_is_named_with_its_columns(tmp_path):
    write_table(tmp_path / "c.parquet", [{"id": 1, "label": "x"}])
    tokenizer_fails(tmp_path, tmp_path / "c.parquet", r"c.parquet: no text column found among \['id', 'label'\]")


def test_a_cell_that_is_not_text_is_named_with_its_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n')
    tokenizer_fails(tmp_path, tmp_path / "c.jsonl", r"c.jsonl, line 2: the 'text' cell is a list, not text")


def test_an_empty_data_set_is_rejected(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    tokenizer_fails(tmp_path, tmp_path / "c.jsonl", r"corpus .*c.jsonl is empty \(no text\)")
    write_table(tmp_path / "n.parquet", [{"text": None}, {"text": ""}])
    tokenizer_fails(tmp_path, tmp_path / "n.parquet", r"n.parquet is empty")


def test_a_folder_of_two_formats_asks_for_a_glob(tmp_path, docs):
    write_table(tmp_path / "c.jsonl", [{"text": d} for d in docs[:5]])
    write_table(tmp_path / "meta.csv", [{"text": "not a document"}])
    tokenizer_fails(tmp_path, tmp_path, r"the folder holds files of 2 formats \(csv, json\)\. Set corpus_path to a glob")
    assert len(list(iter_documents(corpus_files(tmp_path / "*.jsonl")))) == 5


# --- dialogs: four layouts, three formats, the same ids as the CSV -------------------------------------

@pytest.fixture(scope="module")
def tok(tokenizer_stage):
    t = pg.load_tokenizer(tokenizer_stage)
    t.chat_template = CHAT_TEMPLATE
    return t


PAIRS = [("What is a tensor?", "An array of numbers."), ("Explain dropout.", "It zeroes random activations."),
         ("What does <|eos|> mean?", "It ends an answer; 007 and nan stay text."), ("Sum 2+2.", "4")]


def layout_rows(layout):
    """PAIRS as rows of a layout (Alpaca: the instruction alone, an empty input)."""
    if layout == "question/answer":
        return [{"id": i, "Question": p, "Answer": r} for i, (p, r) in enumerate(PAIRS)]
    if layout == "alpaca":
        return [{"instruction": p, "input": "", "output": r} for p, r in PAIRS]
    if layout == "messages":
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in PAIRS]
    return [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]} for p, r in PAIRS]


def write_dialogs(path, rows):
    if path.suffix == ".csv":  # a chat cell in a CSV is its JSON text
        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    return write_table(path, rows)


@pytest.mark.parametrize("layout", ["question/answer", "alpaca", "messages", "conversations"])
@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_every_dialog_layout_and_format_gives_the_ids_of_the_csv(tmp_path, tok, layout, ext):
    reference = tmp_path / "ref.csv"
    with open(reference, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["question", "answer"], *PAIRS])
    path = write_dialogs(tmp_path / f"d{ext}", layout_rows(layout))
    pairs, report = read_dialogs([path])
    ref_pairs, _ = read_dialogs([reference])
    assert pairs == ref_pairs == PAIRS
    assert dialog_ids(tok, pairs) == dialog_ids(tok, ref_pairs)
    assert report["rows_by_layout"] == {layout: len(PAIRS)} and report["layouts"] == {str(path): layout}


def test_alpaca_input_joins_the_instruction(tmp_path):
    path = write_table(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "hola", "output": "hello"},
                                              {"instruction": "Greet.", "input": " ", "output": "hi"}])
    pairs, _ = read_dialogs([path])
    assert pairs == [("Translate.\n\nhola", "hello"), ("Greet.", "hi")]


CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a tensor?"},
        {"role": "assistant", "content": "An array."}, {"role": "user", "content": "And a BOS token?"},
        {"role": "assistant", "content": "It starts a turn."}, {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."}]


def test_each_assistant_turn_is_an_example_and_matches_the_chat_template(tmp_path, tok):
    path = write_table(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    pairs, report = read_dialogs([path])
    first = "You answer briefly.\n\nWhat is a tensor?"
    assert pairs == [(first, "An array."),
                     ((first, "An array.", "And a BOS token?"), "It starts a turn."),
                     ((first, "An array.", "And a BOS token?", "It starts a turn.", "Thanks."), "You are welcome.")]
    assert report["examples"] == 3 and report["rows_read"] == 1 and report["rows_by_layout"] == {"messages": 1}
    for (prompt, answer), (ids, labels), upto in zip(pairs, dialog_ids(tok, pairs), [3, 5, 7]):
        # training ids are what the exported chat template renders for the conversation so far
        assert list(tok.apply_chat_template(CHAT[:upto], tokenize=True, return_dict=False)) == ids
        generation = tok.apply_chat_template(CHAT[:upto - 1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(generation) == chat_prompt_ids(tok, prompt) == ids[:len(generation)]
        assert tok.decode(generation) == chat_prompt(prompt)
        n_answer = len(encode_text(tok, [f" {answer}"])[0]) + 1
        assert labels[-n_answer:] == ids[-n_answer:] and set(labels[:-n_answer]) == {-100}  # only the last answer


def test_a_long_conversation_is_cut_from_the_left_by_whole_turns(tok):
    turns = [f"question {i} " + " ".join(["word"] * 8) for i in range(5)]
    prompt = tuple(t for i in range(5) for t in (turns[i], f"answer {i}"))[:-1]  # u0 a0 ... a3 u4
    pairs = [(prompt, "the last answer")]
    full = dialog_ids(tok, pairs)[0][0]
    kept, rows, counts = encode_dialogs(tok, pairs, 64, "truncate")
    (cut_prompt, answer), (ids, labels) = kept[0], rows[0]
    assert counts["history_cut"] == 1 and len(full) > 65 >= len(ids) and ids[0] == BOS_ID
    assert ids == full[len(full) - len(ids):] and answer == "the last answer"  # the newest turns, whole
    assert dialog_ids(tok, [(cut_prompt, answer)])[0] == (ids, labels)
    assert len(prompt_turns(cut_prompt)) % 2 == 1 and prompt_turns(cut_prompt)[-1] == turns[4]


# --- bad dialog input -----------------------------------------------------------------------------------

def test_a_chat_row_without_an_assistant_turn_is_named(tmp_path):
    path = write_table(tmp_path / "chat.jsonl", [{"messages": CHAT[:3]}, {"messages": CHAT[:2]}])
    with pytest.raises(pg.PocketGPTError, match=r"chat.jsonl, line 2: the 'messages' cell has no assistant turn.*"
                                                r"Add the answer or remove the row"):
        read_dialogs([path])


def test_chat_turns_out_of_order_or_of_another_role_are_named(tmp_path):
    path = write_table(tmp_path / "chat.parquet", [{"conversations": [{"from": "human", "value": "a"},
                                                                      {"from": "human", "value": "b"}]}])
    with pytest.raises(pg.PocketGPTError, match=r"chat.parquet, row 1: message 2 of the 'conversations' cell is the "
                                                r"user's where the assistant's turn belongs"):
        read_dialogs([path])
    path = write_table(tmp_path / "tool.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                               {"role": "tool", "content": "b"}]}])
    with pytest.raises(pg.PocketGPTError, match=r"tool.jsonl, line 1: message 2 of the 'messages' cell has the role 'tool'"):
        read_dialogs([path])
    (tmp_path / "c.csv").write_text('messages\n"[{""role"": ""user"""\n')
    with pytest.raises(pg.PocketGPTError, match=r"c.csv, line 2: the 'messages' cell is not a JSON list of messages"):
        read_dialogs([tmp_path / "c.csv"])


def test_bad_dialog_files_are_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": }\n')
    with pytest.raises(pg.PocketGPTError, match=r"d.jsonl, line 2: not a JSON object"):
        read_dialogs([tmp_path / "d.jsonl"])
    write_table(tmp_path / "d.parquet", [{"text": "t", "label": 1}])
    with pytest.raises(pg.PocketGPTError, match=r"d.parquet: no prompt/response columns found among \['text', 'label'\]"):
        read_dialogs([tmp_path / "d.parquet"])
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(pg.PocketGPTError, match=r"e.jsonl is empty: it needs instruction/response rows"):
        read_dialogs([tmp_path / "e.jsonl"])
    with pytest.raises(pg.PocketGPTError, match=r"dialogs_path=.*nope.jsonl: no such file, folder or glob match"):
        dialog_files(tmp_path / "nope.jsonl", tmp_path)


# --- preference pairs: strings or messages, any format ----------------------------------------------------

def test_preference_pairs_as_strings_or_messages_read_the_same(tmp_path):
    strings = [{"prompt": "What is a tensor?", "chosen": "An array.", "rejected": "A tensor tensor."}]
    explicit = [{"prompt": [{"role": "user", "content": "What is a tensor?"}],
                 "chosen": [{"role": "assistant", "content": "An array."}],
                 "rejected": [{"role": "assistant", "content": "A tensor tensor."}]}]
    implicit = [{"chosen": [{"role": "user", "content": "What is a tensor?"}, {"role": "assistant", "content": "An array."}],
                 "rejected": [{"role": "user", "content": "What is a tensor?"},
                              {"role": "assistant", "content": "A tensor tensor."}]}]
    expected = [{"prompt": "What is a tensor?", "chosen": "An array.", "rejected": "A tensor tensor."}]
    assert read_preference_pairs(write_table(tmp_path / "s.parquet", strings)) == expected
    assert read_preference_pairs(write_table(tmp_path / "e.jsonl", explicit)) == expected
    assert read_preference_pairs(write_table(tmp_path / "i.jsonl", implicit)) == expected
    turns = [{"prompt": CHAT[:4], "chosen": "It starts a turn.", "rejected": "No idea."}]
    pair = read_preference_pairs(write_table(tmp_path / "t.jsonl", turns))[0]
    assert pair["prompt"] == ("You answer briefly.\n\nWhat is a tensor?", "An array.", "And a BOS token?")
    different = [dict(implicit[0], rejected=[{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "x"}])]
    with pytest.raises(pg.PocketGPTError, match=r"d.jsonl, line 1: there is no prompt column, so chosen and rejected"):
        read_preference_pairs(write_table(tmp_path / "d.jsonl", different))


# --- Kaggle: attached inputs in any format are found as corpus.txt / dialogs.csv are ---------------------

@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("POCKETGPT_KAGGLE_ROOT", str(tmp_path))
    (tmp_path / "input" / "datasets" / "someone" / "my-data").mkdir(parents=True)
    return tmp_path / "input" / "datasets" / "someone" / "my-data"


def test_attached_inputs_in_any_format_are_found(kaggle, tmp_path, docs, small_txt):
    corpus = write_corpus(kaggle, "corpus.jsonl.gz", docs, small_txt)
    dialogs = write_dialogs(kaggle / "dialogs.parquet", layout_rows("messages"))
    write_table(kaggle / "corpus_notes.csv", [{"text": "not the corpus"}])  # another name: not a match
    assert attached_input("corpus", "corpus_path", CORPUS_FORMATS) == corpus
    assert dialog_files(None, tmp_path) == [dialogs]
    write_table(kaggle / "corpus.parquet", [{"text": "x"}])
    with pytest.raises(pg.PocketGPTError, match=r"corpus_path=None and 2 files named corpus.jsonl.gz / corpus.parquet "
                                                r"are attached: .*Set corpus_path"):
        attached_input("corpus", "corpus_path", CORPUS_FORMATS)


# --- CSV as people really write it: one convention for places, the line in the file ---------------------

def test_an_unescaped_quote_inside_a_csv_cell_stops_with_the_file_and_line(tmp_path):
    """'"He said "hi" to me"' (inner quotes not doubled, as hand edits leave them) is read by pandas, in
    silence, as 'He said hi" to me"'; here it stops, naming the line to fix, in dialogs and preference pairs."""
    bad = 'question,answer\nWhat is a tensor?,An array.\n"He said "hi" to me",ok\n'
    (tmp_path / "d.csv").write_text(bad)
    with pytest.raises(pg.PocketGPTError, match=r"d.csv, line 3: a double quote inside a quoted cell is not doubled"
                                                r".*\"He said \"\"hi\"\" to me\""):
        read_dialogs([tmp_path / "d.csv"])
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected\nq,"a "good" one",b\n')
    with pytest.raises(pg.PocketGPTError, match=r"p.csv, line 2: a double quote inside a quoted cell is not doubled"):
        read_preference_pairs(tmp_path / "p.csv")
    (tmp_path / "ok.csv").write_text('question,answer\n"He said ""hi"" to me",He said "hi"\n')  # both are valid CSV
    assert read_dialogs([tmp_path / "ok.csv"])[0] == [('He said "hi" to me', 'He said "hi"')]


def test_csv_rows_are_named_by_their_line_even_after_a_cell_over_several_lines(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected\n"a prompt\nover three\nlines",yes,no\n\nq2,a2,b2\nq3,a3,\n')
    with pytest.raises(pg.PocketGPTError, match=r"p.csv, line 7: the 'rejected' cell is empty"):  # line 7 in an editor
        read_preference_pairs(tmp_path / "p.csv")
    (tmp_path / "three.csv").write_text('question,answer\nq,a\nq2,a,extra\n')
    with pytest.raises(pg.PocketGPTError, match=r"three.csv, line 3: 3 cells where the header has 2"):
        read_dialogs([tmp_path / "three.csv"])
    (tmp_path / "open.csv").write_text('question,answer\nq,a\n"never closed,a\nq3,a3\n')
    with pytest.raises(pg.PocketGPTError, match=r"open.csv, line 3: a cell opens a double quote that never closes"):
        read_dialogs([tmp_path / "open.csv"])


# --- dialogs as spreadsheets save them: , ; or tab, UTF-8 with or without BOM, UTF-16 -------------------

SHEET_PAIRS = [("What is a tensor; in short?", "An array, of numbers; any shape."), ("Tab\there?", "Yes, a tab."),
               ("Ünïcode and 日本語?", "Kept, as written."), ("Quote \"x\"?", "Doubled; in the file.")]


def write_sheet(path, header, rows, sep, encoding):
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f, delimiter=sep).writerows([header, *rows])
    return path


@pytest.mark.parametrize("sep, encoding, said", [(",", "utf-8-sig", "comma-separated, UTF-8"),
                                                 (";", "utf-8", "semicolon-separated, UTF-8"),
                                                 ("\t", "utf-16", "tab-separated, UTF-16"),
                                                 (";", "utf-16", "semicolon-separated, UTF-16")])
def test_dialogs_and_preference_pairs_as_spreadsheets_save_them(tmp_path, sep, encoding, said):
    """Excel saves CSV with ';' where the decimal mark is a comma, and "Unicode text" as UTF-16 with tabs: each
    is read as what it is, says how, and 03's preference file goes through the same reader."""
    path = write_sheet(tmp_path / "d.csv", ["instruction", "response"], SHEET_PAIRS, sep, encoding)
    pairs, report = read_dialogs([path])
    assert pairs == SHEET_PAIRS
    assert report["read_as"] == {str(path): said}
    prefs = write_sheet(tmp_path / "p.csv", ["prompt", "chosen", "rejected"],
                        [(p, r, "No; wrong.") for p, r in SHEET_PAIRS], sep, encoding)
    assert [(p["prompt"], p["chosen"]) for p in read_preference_pairs(prefs)] == SHEET_PAIRS


def test_a_spreadsheets_csv_that_cannot_be_read_says_the_real_cause(tmp_path):
    (tmp_path / "semi.csv").write_text("question;answer\nq1;a1\nq2;a, b;extra\n")
    with pytest.raises(pg.PocketGPTError, match=r"semi.csv, line 3: 3 cells where the header has 2 \(read as "
                                                r"semicolon-separated: the header's separator\). A cell that holds a "
                                                r"semicolon must be in double quotes"):
        read_dialogs([tmp_path / "semi.csv"])
    (tmp_path / "u16.csv").write_bytes("question,answer\nq,a\n".encode("utf-16-le"))  # no byte order mark
    with pytest.raises(pg.PocketGPTError, match=r"u16.csv looks like UTF-16 without a byte order mark"):
        read_dialogs([tmp_path / "u16.csv"])
    (tmp_path / "latin.csv").write_bytes("question,answer\ncaf\xe9?,oui\n".encode("latin-1"))
    with pytest.raises(pg.PocketGPTError, match=r"latin.csv is not UTF-8 \(byte \d+: .*Save it as UTF-8"):
        read_dialogs([tmp_path / "latin.csv"])


@pytest.mark.parametrize("sep, encoding", [(";", "utf-8"), ("\t", "utf-16")])
def test_a_spreadsheets_dialog_file_reads_whole_in_flat_memory(tmp_path, demo_data, sep, encoding):
    """15k rows (a tenth of the seed's 139k) read in a fresh process: every row, split as asked, and a peak
    RSS under 150 MB (here 75 MB; pandas + datasets took 0.37 GB for the comma-separated UTF-8 file)."""
    import subprocess
    import sys
    from pathlib import Path

    from pocketgpt.data import split_of
    from pocketgpt.dialogs import dialog_key
    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    import bench_corpus

    demo = list(pd.read_csv(demo_data / "dialogs.csv", keep_default_na=False).itertuples(index=False))
    path = bench_corpus.write_dialogs_csv(tmp_path / "d.csv", demo, 15_000, sep, encoding)
    out = subprocess.run([sys.executable, str(tools / "bench_corpus.py"), "dialogs", "--one", str(path)],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["rows"] == 15_000 and m["peak_rss_mb"] < 150, m
    pairs, _ = read_dialogs([path])
    written = [demo[i % len(demo)] for i in range(15_000)]
    assert pairs == list(dict.fromkeys((f"{q} (variant {i // len(demo)})".strip(), f"{a} {a}".strip())
                                       for i, (q, a) in enumerate(written)))  # every character, duplicates once
    val = sum(split_of(dialog_key(*p), 1337, 0.05) == "val" for p in pairs) / len(pairs)
    assert 0.025 <= val <= 0.1
