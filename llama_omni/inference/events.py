"""What the engine emits while it answers: typed events, each stamped in milliseconds.

`ms` counts from the end of the input audio (the moment the request was complete), so
`first AudioChunk.ms` is the paper's latency. `request` is the index of the request in
its batch. Per request the order is: text deltas, units and audio chunks interleaved as
they become ready, then exactly one `End`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


class Clock:
    """Milliseconds since a start time (time.perf_counter() seconds; default: now)."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


@dataclass(frozen=True)
class TextDelta:
    request: int
    ms: float
    text: str  # new characters (may be empty while a multi-byte character is incomplete)
    token_ids: tuple[int, ...]  # the tokens this delta covers (stop token included)


@dataclass(frozen=True)
class Units:
    request: int
    ms: float
    units: tuple[int, ...]  # new units after CTC collapse, continuing the previous ones


@dataclass(frozen=True)
class AudioChunk:
    request: int
    ms: float
    audio: np.ndarray = field(repr=False)  # [T] float32 mono
    sample_rate: int = 16000


@dataclass(frozen=True)
class End:
    request: int
    ms: float
    reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


Event = TextDelta | Units | AudioChunk | End


@dataclass
class Answer:
    """Everything one request produced, gathered from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 16000
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    total_ms: float | None = None
    lagging_words: int | None = None  # words of text already out when the audio started
    end_reason: str | None = None

    @property
    def audio(self) -> np.ndarray:
        """[T] float32: the chunks joined."""
        if not self.chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.chunks)

    @property
    def audio_seconds(self) -> float:
        return sum(len(c) for c in self.chunks) / self.sample_rate

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.token_ids.extend(event.token_ids)
            self.text += event.text
            if self.first_text_ms is None and event.text.strip():
                self.first_text_ms = event.ms
        elif isinstance(event, Units):
            self.units.extend(event.units)
        elif isinstance(event, AudioChunk):
            if self.first_audio_ms is None and len(event.audio):
                self.first_audio_ms = event.ms
                self.lagging_words = len(self.text.split())
            self.chunks.append(event.audio)
            self.sample_rate = event.sample_rate
        elif isinstance(event, End):
            self.total_ms = event.ms
            self.end_reason = event.reason


def collect(events: Iterable[Event], n_requests: int) -> list[Answer]:
    """Run an event stream to its end and gather one Answer per request."""
    answers = [Answer() for _ in range(n_requests)]
    for event in events:
        answers[event.request].add(event)
    return answers
