"""Training data: manifest and published-format readers, label masks, collation, split."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from llama_omni.model.llm import LLMConfig
from llama_omni.model.prompt import IGNORE_INDEX, SPEECH_TOKEN_INDEX
from llama_omni.train.batches import EpochBatches, SpeechTextCollator, SpeechTextExample
from llama_omni.train.data import (
    DataError,
    answer_spans,
    check_audio_exists,
    read_conversations,
    split_heldout,
    tokenize,
    written,
)
from train_helpers import word_units, write_manifest, write_wav

LLAMA3 = LLMConfig(source="embedded", hidden_size=64, prompt_style="llama3-omni")


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return AutoTokenizer.from_pretrained(tiny_llm_dir / "llm")


def test_manifest_reader(tmp_path):
    root = write_manifest(tmp_path, items=2, turns=2)
    items = read_conversations(root)
    assert [c.id for c in items] == ["item-0", "item-1"]
    first = items[0]
    assert [t.role for t in first.turns] == ["user", "assistant"] * 2
    assert first.audio == [root / "audio/q0.wav", root / "audio/q1.wav"]
    assert first.turns[0].text is None  # the transcript is not part of the prompt
    assert first.answer_units == [tuple(word_units(t.text, 32)) for t in first.turns[1::2]]
    check_audio_exists(items)


def test_published_reader(tmp_path):
    write_wav(tmp_path / "wav" / "a.wav", 0.5, 1)
    records = [{
        "id": "alpaca-1", "speech": "wav/a.wav",
        "conversations": [
            {"from": "human", "value": "<speech>\nPlease directly answer the questions in the user's speech."},
            {"from": "gpt", "value": "Sure."},
        ],
        "tgt_units": [5, 9, 2],
    }]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (item,) = read_conversations(tmp_path / "train.json")
    assert item.id == "alpaca-1" and item.audio == [tmp_path / "wav/a.wav"]
    assert item.turns[0].text == "Please directly answer the questions in the user's speech."
    assert item.answer_units == [(5, 9, 2)]


def test_missing_audio_names_item_and_path(tmp_path):
    root = write_manifest(tmp_path, items=2)
    (root / "audio/q1.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"item 'item-1': .*q1\.wav"):
        check_audio_exists(read_conversations(root))


@pytest.mark.parametrize("turns, message", [
    ([{"role": "assistant", "text": "hi"}, {"role": "user", "audio": "a.wav"}], "role 'user'"),
    ([{"role": "user"}, {"role": "assistant", "text": "hi"}], "needs 'audio'"),
    ([{"role": "user", "audio": "a.wav"}, {"role": "assistant", "audio": "b.wav"}], "needs a 'text'"),
])
def test_malformed_items_are_named(tmp_path, turns, message):
    item = {"id": "bad-1", "source": "test", "turns": turns, "original": {}}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(item) + "\n")
    with pytest.raises(ValueError, match=f"'bad-1'.*{message}"):
        read_conversations(tmp_path)


def test_published_speech_only_in_first_turn(tmp_path):
    records = [{"id": "p", "speech": "a.wav", "conversations": [
        {"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "A."},
        {"from": "human", "value": "<speech>\nAgain?"}, {"from": "gpt", "value": "B."}]}]
    (tmp_path / "t.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="'p'"):
        read_conversations(tmp_path / "t.json")


def test_label_mask_covers_answers_only(tmp_path, tokenizer):
    """Labels: system, user turns, headers and speech slots are ignored; each answer and
    its end-of-turn token are supervised; speech positions stay ignored after expansion."""
    items = read_conversations(write_manifest(tmp_path, items=1, turns=2))
    tokens = tokenize(items[0], tokenizer, LLAMA3)
    spans = answer_spans(tokens.labels)
    assert len(spans) == 2
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for (start, end), turn in zip(spans, [items[0].turns[1], items[0].turns[3]]):
        assert tokens.ids[start:end] == tokenizer.encode(turn.text, add_special_tokens=False) + [eot]
        assert tokens.labels[start:end] == tokens.ids[start:end]
    supervised = {i for s, e in spans for i in range(s, e)}
    assert all(tokens.labels[i] == IGNORE_INDEX for i in range(len(tokens.ids)) if i not in supervised)
    slots = [i for i, t in enumerate(tokens.ids) if t == SPEECH_TOKEN_INDEX]
    assert len(slots) == 2 and all(i < spans[0][0] or spans[0][1] <= i < spans[1][0] for i in slots)

    example = SpeechTextExample("x", tokens.ids, tokens.labels, ["a", "b"], 0)
    features = [torch.randn(23, 8), torch.randn(11, 8)]  # 4 and 2 speech positions (k = 5)
    batch = SpeechTextCollator(downsample=5)([(example, features)])
    labels = batch.labels[0].tolist()
    assert len(labels) == len(tokens.ids) - 2 + 4 + 2
    assert batch.features.shape == (2, 23, 8) and batch.feature_lengths.tolist() == [23, 11]
    first = slots[0]
    assert labels[first : first + 4] == [IGNORE_INDEX] * 4
    assert [x for x in labels if x != IGNORE_INDEX] == [x for x in tokens.labels if x != IGNORE_INDEX]


def test_written_conversation_reads_transcripts_instead_of_speech(tmp_path, tokenizer):
    item = read_conversations(write_manifest(tmp_path, items=1, turns=2))[0]
    text = written(item)
    assert [t.text for t in text.turns[::2]] == ["question 0", "question 1"]
    assert text.audio == [] and text.turns[1::2] == item.turns[1::2]
    spoken, typed = tokenize(item, tokenizer, LLAMA3), tokenize(text, tokenizer, LLAMA3)
    assert SPEECH_TOKEN_INDEX not in typed.ids and "question 1" in tokenizer.decode(typed.ids)
    assert ([x for x in typed.labels if x != IGNORE_INDEX]
            == [x for x in spoken.labels if x != IGNORE_INDEX])
    unknown = dataclasses.replace(item.turns[2], transcript=None)
    with pytest.raises(DataError, match="item-0.*no transcript"):
        written(dataclasses.replace(item, turns=(*item.turns[:2], unknown, item.turns[3])))


def test_collation_pads_right_with_ignore(tmp_path, tokenizer):
    items = read_conversations(write_manifest(tmp_path, items=2))
    examples = [SpeechTextExample(c.id, *vars(tokenize(c, tokenizer, LLAMA3)).values(), ["k"], 0)
                for c in items]
    feats = [[torch.randn(10, 4)], [torch.randn(30, 4)]]
    batch = SpeechTextCollator(downsample=5)(list(zip(examples, feats)))
    lengths = [len(e.ids) - 1 + n for e, n in zip(examples, [2, 6])]
    assert batch.labels.shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert (batch.labels[short, min(lengths):] == IGNORE_INDEX).all()
    assert batch.positions == sum(lengths)


def test_heldout_split_is_stable(tmp_path):
    items = read_conversations(write_manifest(tmp_path, items=6))
    train, heldout = split_heldout(items, 0.5, max_items=10)
    again = split_heldout(list(reversed(items)), 0.5, max_items=10)[1]
    assert {c.id for c in heldout} == {c.id for c in again}
    assert {c.id for c in train} | {c.id for c in heldout} == {c.id for c in items}
    assert len(split_heldout(items, 0.99, max_items=2)[1]) == 2


def epoch(sampler: EpochBatches, number: int) -> list[list[int]]:
    sampler.epoch = number
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


@pytest.mark.parametrize("grouped", [False, True])
def test_epoch_batches_cover_every_example_once_in_a_seeded_order(grouped):
    size = 1000
    lengths = torch.randint(1, 100, (size,), generator=torch.Generator().manual_seed(1)).tolist()
    sampler = EpochBatches(size, 4, seed=7, lengths=lengths if grouped else None)
    first = epoch(sampler, 0)
    assert sorted(i for b in first for i in b) == list(range(size))
    assert all(len(b) == 4 for b in first)
    assert epoch(sampler, 0) == first  # a resumed run sees the same batches
    assert epoch(sampler, 1) != first


def test_grouping_by_length_leaves_little_padding_and_a_random_order():
    size = 1000
    lengths = torch.randint(1, 100, (size,), generator=torch.Generator().manual_seed(1)).tolist()

    def useful_fraction(batches):  # real positions / padded positions
        return sum(lengths[i] for b in batches for i in b) / sum(
            len(b) * max(lengths[i] for i in b) for b in batches)

    plain = epoch(EpochBatches(size, 4, seed=7), 0)
    grouped = epoch(EpochBatches(size, 4, seed=7, lengths=lengths), 0)
    assert useful_fraction(plain) < 0.7 and useful_fraction(grouped) > 0.95
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    with pytest.raises(ValueError, match="lengths"):
        EpochBatches(size, 4, seed=7, lengths=lengths[:-1])
