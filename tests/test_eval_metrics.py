"""WER/CER against hand-computed cases, the text normalization, and the latency /
lagging-word accounting on a synthetic event stream."""

from __future__ import annotations

import numpy as np
import pytest

from llama_omni.data.normalize import normalize_english
from llama_omni.eval.metrics import StreamTimes, mean
from llama_omni.eval.report import markdown, summarize
from llama_omni.eval.wer import (
    ErrorCounts,
    corpus_wer,
    error_counts,
    error_rates,
    median_item_wer,
    median_wer,
)
from llama_omni.inference.events import AudioChunk, End, TextDelta, Units, collect

pytest.importorskip("jiwer")


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("It costs $5.", "it costs five dollars"),
    ("Um, I think it's [music] well-known.", "i think it's well known"),
    ("The **Café** (in Paris) opens at 10.", "the cafe in paris opens at ten"),
    ("rock-paper — scissors & stones", "rock paper scissors and stones"),
    ("\u2018Don\u2019t\u2019 go", "don't go"),
])
def test_normalize_english(text, expected):
    assert normalize_english(text) == expected


def test_wer_and_cer_by_hand():
    # words: "sat" -> "sit" (1 substitution), "the" deleted: 2 errors / 6 words
    # chars: a -> i, and "the " deleted (4 chars): 5 errors / 22 chars (spaces count)
    counts = error_counts("The cat sat on the mat.", "the cat sit on mat")
    assert counts == ErrorCounts(word_errors=2, words=6, char_errors=5, chars=22)
    wer, cer = error_rates([counts])
    assert wer == pytest.approx(100 * 2 / 6) and cer == pytest.approx(100 * 5 / 22)


def test_insertions_and_empty_answers():
    # one inserted word: 1 error / 2 words; chars: " now" = 4 insertions / 8 ("sit down")
    assert error_counts("sit down", "sit down now") == ErrorCounts(1, 2, 4, 8)
    # silence: every reference word and character is deleted
    assert error_counts("good morning", "") == ErrorCounts(2, 2, 12, 12)
    # nothing to score: the reference has no words after normalization
    assert error_counts("(...)", "hello") is None


def test_wer_normalizes_as_the_harness_does():
    assert corpus_wer(["a b c d"], ["A, b; x d."]) == 25.0
    assert corpus_wer(["I have 3 cats."], ["I have three cats"]) == 0.0


def test_median_wer_is_not_dominated_by_one_looping_transcript():
    references = ["the cat sleeps", "a dog barks", "birds sing"]
    hypotheses = ["the cat sleeps", "a dog parks", "birds sing " + "sing " * 30]
    assert corpus_wer(references, hypotheses) > 300
    assert median_wer(references, hypotheses) == pytest.approx(100 / 3)


def test_corpus_rates_sum_errors_before_dividing():
    counts = [ErrorCounts(2, 6, 5, 22), ErrorCounts(0, 4, 0, 18), None]
    wer, cer = error_rates(counts)
    assert wer == pytest.approx(20.0)  # 2 / 10, not the mean of 33.3 and 0
    assert cer == pytest.approx(12.5)  # 5 / 40
    assert error_rates([None]) == (None, None)


def test_median_wer_shrugs_off_one_looping_transcript():
    counts = [ErrorCounts(1, 4, 2, 20), ErrorCounts(0, 10, 0, 50), ErrorCounts(40, 10, 200, 50)]
    assert error_rates(counts)[0] == pytest.approx(100 * 41 / 24)  # the loop dominates
    assert median_item_wer(counts + [None]) == pytest.approx(25.0)
    assert median_item_wer([None]) is None


def test_number_words_match_digits():
    # "i have three cats and one thousand fish": 8 words, 32 letters + 7 spaces
    assert error_counts("I have 3 cats and 1,000 fish", "I have three cats and one thousand fish") \
        == ErrorCounts(0, 8, 0, 39)


def _stream(first_audio_at: int):
    """Text "Hello there friend. How are you?" with the first audio after `first_audio_at` deltas."""
    deltas = ["Hello", " there", " friend.", " How", " are", " you?"]
    tone = np.ones(160, dtype=np.float32)
    events = []
    for step, text in enumerate(deltas):
        events.append(TextDelta(0, 100.0 + 10 * step, text, (step,)))
        events.append(Units(0, 101.0 + 10 * step, (step, step + 1)))
        if step + 1 == first_audio_at:
            events.append(AudioChunk(0, 105.0 + 10 * step, tone))
    events.append(AudioChunk(0, 170.0, tone))
    events.append(End(0, 171.0, "stop"))
    return events


def test_latency_and_lagging_words_from_events():
    (answer,) = collect(_stream(first_audio_at=3), 1)
    times = StreamTimes.of(answer)
    assert times == StreamTimes(first_text_ms=100.0, first_audio_ms=125.0, lagging_words=3,
                                total_ms=171.0)
    (late,) = collect(_stream(first_audio_at=0), 1)  # audio only at the end: all words lag
    assert StreamTimes.of(late).first_audio_ms == 170.0 and StreamTimes.of(late).lagging_words == 6


def test_latency_per_omega_in_the_summary():
    def stage(stream, wer_counts):
        times = StreamTimes.of(collect(stream, 1)[0])
        return {"text": "", "errors": wer_counts, "dnsmos": {"ovrl_mos": 3.0, "p808_mos": 3.5},
                "utmos": None, "audio_seconds": 0.02, **times.__dict__}

    counts = {"word_errors": 1, "words": 4, "char_errors": 2, "chars": 20}
    records = {"llama-omni": [
        {"id": "a", "s2t": {"total_ms": 150.0, "first_text_ms": 100.0}, "fidelity": 0.5,
         "s2s_10": stage(_stream(1), counts), "s2s_inf": stage(_stream(0), counts)},
        {"id": "b", "s2t": {"total_ms": 130.0, "first_text_ms": 100.0}, "fidelity": 0.7,
         "s2s_10": stage(_stream(3), None), "s2s_inf": stage(_stream(0), counts)},
    ]}
    summary = summarize(records, {"model": "synthetic"}, (10, None), None)
    runs = summary["systems"]["llama-omni"]["s2s"]
    assert runs["10"]["latency_ms"] == pytest.approx((105 + 125) / 2)
    assert runs["10"]["lagging_words"] == pytest.approx((1 + 3) / 2)
    assert runs["inf"]["latency_ms"] == 170.0 and runs["inf"]["lagging_words"] == 6
    assert runs["10"]["wer"] == pytest.approx(25.0)  # the item without a reference is skipped
    assert summary["systems"]["llama-omni"]["s2t"]["fidelity"] == pytest.approx(0.6)
    table3 = markdown(summary, plot=None).split("## Table 3")[1]
    assert "| 10 | 115 | 2.00 | 25.00 | 25.00 |" in table3 and "| inf | 170 | 6.00 |" in table3


def test_mean_skips_missing_values():
    assert mean([1, None, 3]) == 2.0 and mean([None]) is None
