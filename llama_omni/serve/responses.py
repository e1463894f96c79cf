"""One answer as wire events: the scheduler's job events -> Realtime-style JSON dicts.

Shared by the WebSocket API and the streamed HTTP endpoint. Audio is resampled to the
session's output rate as a stream (gap-free across chunks) and sent as base64 PCM16.
Latencies count from the end of the user's audio (the job's t_end), as in the paper.
"""

from __future__ import annotations

import time
from typing import Any

from llama_omni.audio import SAMPLE_RATE
from llama_omni.inference.events import AudioChunk, End, TextDelta, Units
from llama_omni.serve.audio_io import StreamResampler, pcm16_encode
from llama_omni.serve.metrics import Metrics
from llama_omni.serve.scheduler import Failure, JobEvent


class ResponseOutput:
    def __init__(self, response_id: str, item_id: str, output_rate: int, t_end: float):
        self.response_id, self.item_id = response_id, item_id
        self.output_rate = output_rate
        self.t_end = t_end
        self._resampler = StreamResampler(SAMPLE_RATE, output_rate)
        self.text = ""
        self.units = 0
        self.audio_samples = 0
        self.first_text_ms: float | None = None
        self.first_audio_ms: float | None = None
        self.total_ms: float | None = None
        self.end_reason: str | None = None
        self.failure: Failure | None = None

    def _ms(self) -> float:
        return round((time.perf_counter() - self.t_end) * 1000.0, 1)

    def _delta(self, kind: str, **fields) -> dict[str, Any]:
        return {
            "type": f"response.{kind}.delta",
            "response_id": self.response_id,
            "item_id": self.item_id,
            "output_index": 0,
            "content_index": 0,
            **fields,
        }

    def convert(self, event: JobEvent) -> list[dict[str, Any]]:
        """The wire events for one job event (without event ids)."""
        if isinstance(event, TextDelta) and event.text:
            if self.first_text_ms is None and event.text.strip():
                self.first_text_ms = self._ms()
            self.text += event.text
            return [self._delta("output_text", delta=event.text)]
        if isinstance(event, Units) and event.units:
            self.units += len(event.units)
            return [self._delta("output_units", units=list(event.units))]
        if isinstance(event, AudioChunk):
            return self._audio(self._resampler.push(event.audio))
        if isinstance(event, End):
            self.total_ms, self.end_reason = self._ms(), event.reason
            return self._audio(self._resampler.flush())
        if isinstance(event, Failure):
            self.failure = event
        return []

    def _audio(self, audio) -> list[dict[str, Any]]:
        if audio.size == 0:
            return []
        if self.first_audio_ms is None:
            self.first_audio_ms = self._ms()
        self.audio_samples += audio.size
        return [
            self._delta("output_audio", delta=pcm16_encode(audio), sample_rate=self.output_rate)
        ]

    @property
    def finished(self) -> bool:
        return self.end_reason is not None or self.failure is not None

    def done(self, status: str, audio: bool, reason: str | None = None) -> dict[str, Any]:
        """response.done for this answer: status completed, incomplete, cancelled or failed."""
        details = None
        if status in ("incomplete", "cancelled", "failed"):
            details = {"type": status, "reason": reason}
            if self.failure is not None:
                details["error"] = {"code": self.failure.code, "message": self.failure.message}
        part = (
            {"type": "output_audio", "transcript": self.text}
            if audio
            else {"type": "output_text", "text": self.text}
        )
        return {
            "type": "response.done",
            "response": {
                "id": self.response_id,
                "object": "realtime.response",
                "status": status,
                "status_details": details,
                "output_modalities": ["audio"] if audio else ["text"],
                "output": [
                    {
                        "id": self.item_id,
                        "object": "realtime.item",
                        "type": "message",
                        "role": "assistant",
                        "status": "completed" if status == "completed" else "incomplete",
                        "content": [part],
                    }
                ],
                "latency_ms": {
                    "first_text": self.first_text_ms,
                    "first_audio": self.first_audio_ms,
                    "total": self.total_ms,
                },
                "units": self.units,
                "audio_seconds": round(self.audio_samples / self.output_rate, 3),
            },
        }

    def record(self, metrics: Metrics, status: str) -> None:
        metrics.count(f"responses.{status}")
        if status in ("completed", "incomplete"):
            metrics.observe("first_text_ms", self.first_text_ms)
            metrics.observe("first_audio_ms", self.first_audio_ms)
            metrics.observe("total_ms", self.total_ms)


def final_status(output: ResponseOutput) -> str:
    """completed (stop token), incomplete (max tokens reached) or failed."""
    if output.failure is not None:
        return "failed"
    return "completed" if output.end_reason == "stop" else "incomplete"
