"""One Realtime WebSocket connection: read client events, stream answers, detect turns.

Three pieces run per connection: the read loop (this object's `run`), one writer task
that owns the socket's sending side (events are queued to it, so that answer streaming
and replies to client events never interleave inside a frame), and at most one answer
task. Every bad message becomes an `error` event; the connection stays open. A
disconnect cancels the answer in progress and frees the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from llama_omni.audio import SAMPLE_RATE
from llama_omni.serve.audio_io import pcm16_decode
from llama_omni.serve.protocol import (
    EventIds,
    ProtocolError,
    error_event,
    parse_event,
    response_overrides,
    session_changes,
    session_object,
)
from llama_omni.serve.responses import ResponseOutput, final_status
from llama_omni.serve.scheduler import Job, QueueFull
from llama_omni.serve.sessions import Session, SessionSettings

if TYPE_CHECKING:
    from llama_omni.serve.app import Server

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """The answer being streamed: its job, its wire output and the task sending it."""

    job: Job
    output: ResponseOutput
    settings: SessionSettings
    task: asyncio.Task | None = None
    done: bool = False


class RealtimeConnection:
    def __init__(self, ws: WebSocket, server: Server, session: Session):
        self.ws, self.server, self.session = ws, server, session
        self.ids = EventIds()
        self._outbox: asyncio.Queue[dict | None] = asyncio.Queue()
        self.answer: Answer | None = None
        self.detector = None  # vad.TurnDetector while server_vad is on
        self._origin = 0  # detector sample index of the input buffer's first sample
        self._speech_start: int | None = None
        self._item: str | None = None  # id of the user item being spoken

    # -- sending ---------------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> None:
        self._outbox.put_nowait({"event_id": self.ids("event"), **event})

    def error(
        self, err: Exception | str, code: str = "invalid_value", client_event_id: str | None = None
    ) -> None:
        self.server.metrics.count(f"errors.{getattr(err, 'code', code)}")
        self.send(error_event(self.ids("event"), err, code, client_event_id))

    async def _write(self) -> None:
        while (event := await self._outbox.get()) is not None:
            await self.ws.send_text(json.dumps(event))

    # -- the read loop ---------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        self.send(
            {
                "type": "session.created",
                "session": session_object(self.session.id, self.session.settings),
            }
        )
        try:
            while not writer.done():
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                self.handle(
                    message.get("text")
                    if message.get("text") is not None
                    else message.get("bytes") or b""
                )
        except WebSocketDisconnect:
            pass
        finally:
            self._cancel_answer(notify=False)
            self.server.sessions.close(self.session)
            self._outbox.put_nowait(None)
            writer.cancel()

    def handle(self, data: str | bytes) -> None:
        """Act on one client message; any problem with it becomes an error event."""
        limit = self.server.limits.max_message_bytes
        if len(data) > limit:
            self.error(
                f"the message has {len(data)} bytes; the limit is {limit} "
                "(send audio in smaller appends)",
                "message_too_large",
            )
            return
        event_id = None
        try:
            event = parse_event(data)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            self.server.metrics.count(f"events.{event['type']}")
            getattr(self, "on_" + event["type"].replace(".", "_"))(event)
        except (ProtocolError, ValueError) as err:  # AudioError is a ValueError
            self.error(err, "invalid_value", event_id)
        except QueueFull as err:
            self.error(err, "server_busy", event_id)
        except Exception as err:  # a bug must not end the session: report it, keep serving
            log.exception("handling a client event failed")
            self.error(f"internal error: {type(err).__name__}: {err}", "server_error", event_id)

    # -- client events ---------------------------------------------------------------------
    def on_session_update(self, event: dict) -> None:
        settings = session_changes(event.get("session"), self.session.settings)
        self.session.update(settings)
        if settings.turn_detection is None:
            self.detector = None
        elif self.detector is None or self.detector.settings != settings.turn_detection:
            from llama_omni.serve.vad import TurnDetector

            self.detector = TurnDetector(settings.turn_detection)
            self._origin, self._speech_start = 0, None
            self.session.buffer.clear()
        self.send({"type": "session.updated", "session": session_object(self.session.id, settings)})

    def on_input_audio_buffer_append(self, event: dict) -> None:
        audio = pcm16_decode(event.get("audio"), "input_audio_buffer.append's audio")
        new = self.session.buffer.append(audio)
        if self.detector is not None:
            self._detect(new)

    def on_input_audio_buffer_commit(self, event: dict) -> None:
        self._commit(self.session.commit())

    def on_input_audio_buffer_clear(self, event: dict) -> None:
        self.session.buffer.clear()
        self._restart_detection()
        self.send({"type": "input_audio_buffer.cleared"})

    def on_response_create(self, event: dict) -> None:
        self._start_answer(response_overrides(event, self.session.settings))

    def on_response_cancel(self, event: dict) -> None:
        if self.answer is None:
            raise ProtocolError(
                "there is no response in progress to cancel", "response_cancel_not_active"
            )
        self._cancel_answer(notify=True, reason="client_cancelled")

    # -- turns -----------------------------------------------------------------------------
    def _commit(self, audio: np.ndarray) -> None:
        item = self._item or self.ids("item")
        self._item = None
        self._restart_detection()
        self.send(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item,
                "previous_item_id": None,
                "audio_ms": round(audio.size * 1000 / SAMPLE_RATE),
            }
        )

    def _restart_detection(self) -> None:
        """After a commit or clear the buffer is empty: it starts where the detector is."""
        if self.detector is not None:
            self._origin, self._speech_start = self.detector.received, None

    def _detect(self, new: np.ndarray) -> None:
        for edge in self.detector.feed(new):
            if edge.kind == "start":
                self._speech_start = edge.sample
                self._item = self.ids("item")
                self.send(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": edge.ms,
                        "item_id": self._item,
                    }
                )
                if self.answer is not None and self.detector.settings.interrupt_response:
                    self._cancel_answer(notify=True, reason="turn_detected")
            elif self._speech_start is not None:
                self.send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": edge.ms,
                        "item_id": self._item,
                    }
                )
                start = max(0, self._speech_start - self._origin)
                turn = self.session.buffer.take()[start : edge.sample - self._origin]
                if turn.size:
                    self._commit(self.session.add_turn(turn))
                    if self.detector.settings.create_response and self.answer is None:
                        self._start_answer(self.session.settings)
                self._restart_detection()
        if not self.detector.speaking:  # keep only the prefix padding of leading silence
            keep = self.detector.settings.prefix_padding_ms * SAMPLE_RATE // 1000 + 2 * 512
            self._origin += self.session.buffer.drop_before(keep)

    # -- answers ---------------------------------------------------------------------------
    def _start_answer(self, settings: SessionSettings) -> None:
        if self.answer is not None:
            raise ProtocolError(
                "a response is already in progress; cancel it first",
                "conversation_already_has_active_response",
            )
        if self.session.pending is None:
            raise ProtocolError(
                "there is no committed user audio to answer: append audio, then commit",
                "input_audio_buffer_empty",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            self.session.pending,
            self.session.history,
            settings.engine_options(),
            emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
        )
        output = ResponseOutput(self.ids("resp"), self.ids("item"), settings.output_rate, job.t_end)
        self.server.scheduler.submit(job)
        self.session.pending = None
        answer = self.answer = Answer(job, output, settings)
        self.send(
            {
                "type": "response.created",
                "response": {
                    "id": output.response_id,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "output_modalities": ["audio"] if settings.audio else ["text"],
                    "output": [],
                },
            }
        )
        answer.task = asyncio.create_task(self._stream(answer, events))

    async def _stream(self, answer: Answer, events: asyncio.Queue) -> None:
        output = answer.output
        while not output.finished:
            for wire in output.convert(await events.get()):
                self.send(wire)
        if output.failure is not None:
            self.error(output.failure.message, output.failure.code)
        elif answer.job.speech is not None:
            self.session.history.add(answer.job.speech, output.text, answer.job.cache_slot)
        self._finish(answer, final_status(output))

    def _finish(self, answer: Answer, status: str, reason: str | None = None) -> None:
        if answer.done:
            return
        answer.done = True
        self.send(answer.output.done(status, answer.settings.audio, reason))
        answer.output.record(self.server.metrics, status)
        if self.answer is answer:
            self.answer = None

    def _cancel_answer(self, notify: bool, reason: str = "client_cancelled") -> None:
        answer = self.answer
        if answer is None:
            return
        answer.job.cancel()
        if answer.task is not None:
            answer.task.cancel()
        if notify:
            if reason == "turn_detected":  # barge-in: the client should stop playing at once
                self.send(
                    {
                        "type": "output_audio_buffer.cleared",
                        "response_id": answer.output.response_id,
                    }
                )
            self._finish(answer, "cancelled", reason)
        else:
            answer.output.record(self.server.metrics, "cancelled")
            answer.done, self.answer = True, None
