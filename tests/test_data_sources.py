"""Instruction sources (including the cut-off packaged ShareGPT file) and filters."""

import json
from collections import Counter
from itertools import islice

import pytest

from llama_omni.data.filters import FilterConfig, apply_filters, reject_reason
from llama_omni.data.sources import (
    Instruction,
    SourceConfig,
    read_alpaca,
    read_jsonl,
    read_sharegpt,
    read_source,
    read_ultrachat,
    sharegpt_path,
)


def test_cut_off_sharegpt_file_is_read_record_by_record(tmp_path):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                  {"from": "gpt", "value": f"answer {i}"}]}
               for i in range(3)]
    text = json.dumps(records)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.rindex("answer 2") + 3])  # stops inside the last record
    items = list(read_sharegpt(cut))
    assert [i.text for i in items] == ["question 0", "question 1"]
    assert items[0] == Instruction("c0", "sharegpt", "question 0", "answer 0")


def test_packaged_sharegpt_file():
    path = sharegpt_path()
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text(encoding="utf-8", errors="replace"))  # it is really cut off
    items = list(islice(read_sharegpt(), 50))
    assert len(items) == 50 and all(i.text and i.source == "sharegpt" for i in items)
    assert len({i.id for i in items}) == 50


def test_alpaca_ultrachat_jsonl(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Translate this.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "", "input": "", "output": ""},
    ]))
    assert [(i.id, i.text, i.response) for i in read_alpaca(alpaca)] == [
        ("alpaca-0", "Name a color.", "Blue."), ("alpaca-1", "Translate this.\nBonjour", "Hello")]

    ultra = tmp_path / "ultra.jsonl"
    ultra.write_text(json.dumps({"id": "7", "data": ["How are tides made?", "The moon."]}) + "\n"
                     + json.dumps({"prompt_id": "p/1", "messages": [
                         {"role": "user", "content": "Why is the sky blue?"},
                         {"role": "assistant", "content": "Scattering."}]}) + "\n")
    assert [(i.id, i.text) for i in read_ultrachat(ultra)] == [
        ("ultrachat-7", "How are tides made?"), ("ultrachat-p_1", "Why is the sky blue?")]

    plain = tmp_path / "mine.jsonl"
    plain.write_text('"Tell me a joke."\n{"prompt": "Sing a song.", "id": "s"}\n')
    assert [(i.id, i.text) for i in read_jsonl(plain, "prompt")] == [
        ("mine-1", "Tell me a joke."), ("s", "Sing a song.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_jsonl(bad))


def test_duplicate_ids_are_made_unique(tmp_path):
    plain = tmp_path / "dup.jsonl"
    plain.write_text('{"id": "a", "instruction": "one two three"}\n'
                     '{"id": "a", "instruction": "four five six"}\n')
    ids = [i.id for i in read_source(SourceConfig(kind="jsonl", path=str(plain)))]
    assert len(set(ids)) == 2


@pytest.mark.parametrize("text,reason", [
    ("Hi", "too_short"),
    ("word " * 80, "too_long"),
    ("Wie spät ist es heute in Berlin, bitte sagen Sie es mir?", "not_english"),
    ("How do I reverse a list in Python?", "code"),
    ("Why does `x = foo()` return None?", "code"),
    ("Solve the equation 3x + 5 = 20 for x.", "math"),
    ("What is 17 * 23?", "math"),
    ("What are some good habits for a healthy morning?", None),
    ("Poly Ether Ether Ketone", None),
])
def test_filter_rules(text, reason):
    assert reject_reason(text, FilterConfig()) == reason


def test_duplicates_are_dropped_and_counted():
    items = [Instruction(str(i), "t", t) for i, t in enumerate(
        ["Tell me about the moon.", "tell me about the Moon!", "Tell me about the sun."])]
    rejected = Counter()
    kept = list(apply_filters(items, FilterConfig(), rejected))
    assert [i.id for i in kept] == ["0", "2"] and rejected == {"duplicate": 1}


def test_the_evaluation_hold_out_never_enters_a_data_set():
    from llama_omni.eval.sets import heldout_ids

    held = next(iter(heldout_ids()))
    items = [i for i in islice(read_sharegpt(), 20000) if i.id == held]
    assert items, "the hold-out id is in the packaged file"
    rejected = Counter()
    assert list(apply_filters(items, FilterConfig(), rejected)) == []
    assert rejected == {"eval_heldout": 1}
    assert list(apply_filters(items, FilterConfig(exclude_eval_heldout=False, max_words=None,
                                                  max_chars=None, drop_code=False,
                                                  drop_math=False, english=False)))
