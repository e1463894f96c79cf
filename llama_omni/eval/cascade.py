"""The cascade baseline: ASR -> backbone LLM -> TTS, measured like the model itself.

The transcript goes to the LLM as a text turn through the same `Engine` decoding loop
(text only), and the TTS speaks each sentence as soon as it is complete, so the cascade
streams too: its first audio follows its first sentence. Everything comes out as the
engine's events on one clock that starts before the ASR, so latency, lagging words and
decode time mean the same for both systems. The TTS runs in the decoding thread: the LLM
waits while a sentence is spoken, as in a simple single-process cascade.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from llama_omni.configbase import require
from llama_omni.data.normalize import normalize_for_tts
from llama_omni.data.tts import SAMPLE_RATE, VoicePool
from llama_omni.eval.metrics import ASR
from llama_omni.inference.engine import Engine, Request
from llama_omni.inference.events import AudioChunk, Clock, End, Event, TextDelta
from llama_omni.model.prompt import Turn

RESPONSE_VOICE = "hibari:heart"  # the voice our training responses are spoken in
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n+")


def text_request(engine: Engine, text: str) -> Request:
    """A single-turn text prompt (no speech) in the model's prompt style."""
    return Request(engine.model.prompt_ids([Turn.user(text, speech=False)]), [])


class Cascade:
    """engine: text-only (EngineOptions(speech=False)) over the LLM to use."""

    def __init__(self, engine: Engine, asr: ASR, voice: str = RESPONSE_VOICE):
        require(not engine.options.speech, "the cascade's engine must be text-only (speech=False)")
        self.engine, self.asr, self.voice = engine, asr, voice
        self.voices = VoicePool([voice])

    def stream(self, audio: np.ndarray, *, speech: bool = True,
               clock: Clock | None = None) -> tuple[str, Iterator[Event]]:
        """(transcript, events of the answer). The ASR runs now, on the clock; speech=False
        leaves out the TTS (the speech-to-text task)."""
        clock = clock or Clock()
        transcript = self.asr(audio)
        return transcript, self._answer(transcript, speech, clock)

    def _answer(self, transcript: str, speech: bool, clock: Clock) -> Iterator[Event]:
        if not transcript.strip():
            yield End(0, clock.ms(), "no_transcript")
            return
        pending = ""
        for event in self.engine.stream([text_request(self.engine, transcript)], clock):
            if isinstance(event, End):
                if speech:
                    yield from self._speak(pending, clock)
                yield End(event.request, clock.ms(), event.reason)
                continue
            yield event
            if speech and isinstance(event, TextDelta):
                pending += event.text
                ends = [m.end() for m in _SENTENCE_END.finditer(pending)]
                if ends:
                    yield from self._speak(pending[: ends[-1]], clock)
                    pending = pending[ends[-1]:]

    def _speak(self, text: str, clock: Clock) -> Iterator[AudioChunk]:
        spoken = normalize_for_tts(text)
        if any(c.isalnum() for c in spoken):
            audio = self.voices.synthesize(self.voice, spoken)
            yield AudioChunk(0, clock.ms(), audio, SAMPLE_RATE)
