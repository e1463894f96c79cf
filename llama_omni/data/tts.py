"""Text-to-speech backends behind one interface: text in, 16 kHz float32 mono out.

Instructions are spoken by varied voices (several backends), responses by one fixed voice
(hibari's af_heart by default). Every backend returns audio at 16 kHz, the rate of the
whole system, whatever its native rate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000


class TTSError(RuntimeError):
    """A backend could not synthesize a text (missing voice, empty output, ...)."""


class TTSBackend(ABC):
    name: str

    @abstractmethod
    def voices(self) -> list[str]:
        """Voice names this backend offers on this machine."""

    @abstractmethod
    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        """float32 mono waveform at 16 kHz."""


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if rate == SAMPLE_RATE:
        return audio
    g = np.gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)


class HibariTTS(TTSBackend):
    """The packaged hibari voice (af_heart, 24 kHz ONNX), the default response voice."""

    name = "hibari"

    def __init__(self, threads: int = 1):
        self.threads = threads

    @cached_property
    def _engine(self):
        try:
            from hibari import Hibari
        except ImportError:
            raise TTSError("hibari is not installed: `pip install hibari-tts==0.2.1`") from None
        return Hibari(threads=self.threads)

    def voices(self) -> list[str]:
        return ["heart"]

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        if voice not in (None, "heart"):
            raise TTSError(f"hibari offers only the packaged voice 'heart', not {voice!r}")
        if not text.strip():
            raise TTSError("cannot synthesize empty text")
        audio = self._engine(text)
        if audio is None or len(audio) == 0:
            raise TTSError(f"hibari produced no audio for {text[:60]!r}")
        return to_16k(audio, self._engine.sample_rate)
