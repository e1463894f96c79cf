"""ASR-WER/CER: the one word and character error count of the project (the harness, the
held-out units check of training, the vocoder and units benchmarks all use it).

Both texts pass through `normalize_english` first. Corpus rates sum errors over items and
divide by the summed reference length; the per-item median shows what a typical answer
sounds like when one transcript dominates the sum (Whisper can loop on an answer that
repeats a phrase, transcribing it far past the audio).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llama_omni.data.normalize import normalize_english


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations (substitutions + deletions + insertions) and reference lengths."""

    word_errors: int
    words: int
    char_errors: int
    chars: int


def error_counts(reference: str, hypothesis: str) -> ErrorCounts | None:
    """Errors of `hypothesis` against `reference` after normalization; characters include
    the spaces. None when the reference has no words left (nothing to score)."""
    try:
        import jiwer
    except ImportError:
        raise ImportError("ASR-WER needs jiwer: `pip install jiwer`") from None

    ref, hyp = normalize_english(reference), normalize_english(hypothesis)
    if not ref:
        return None
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return ErrorCounts(
        words.substitutions + words.deletions + words.insertions,
        words.hits + words.substitutions + words.deletions,
        chars.substitutions + chars.deletions + chars.insertions,
        chars.hits + chars.substitutions + chars.deletions,
    )


def error_rates(counts: Iterable[ErrorCounts | None]) -> tuple[float | None, float | None]:
    """(WER %, CER %) over all items with a reference; (None, None) when there is none."""
    counts = [c for c in counts if c is not None]
    if not counts:
        return None, None
    wer = 100.0 * sum(c.word_errors for c in counts) / sum(c.words for c in counts)
    cer = 100.0 * sum(c.char_errors for c in counts) / sum(c.chars for c in counts)
    return wer, cer


def median_item_wer(counts: Iterable[ErrorCounts | None]) -> float | None:
    """Median over items of each item's WER (%)."""
    rates = [100.0 * c.word_errors / c.words for c in counts if c is not None]
    return statistics.median(rates) if rates else None


def _pair_counts(references: Sequence[str], hypotheses: Sequence[str]) -> list[ErrorCounts | None]:
    return [error_counts(r, h) for r, h in zip(references, hypotheses, strict=True)]


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """WER in percent over all pairs (0 when no reference has words)."""
    return error_rates(_pair_counts(references, hypotheses))[0] or 0.0


def median_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Median over pairs of each pair's WER in percent (0 when no reference has words)."""
    return median_item_wer(_pair_counts(references, hypotheses)) or 0.0
