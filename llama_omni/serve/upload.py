"""POST /v1/respond: one uploaded question -> its answer as NDJSON event lines.

Refusals come before the stream starts, as 4xx (or 503 when busy) JSON errors: a
missing Content-Length (411), an oversize upload (413), bad parameters or unreadable,
too short or too long audio (400). The stream then carries the same events as the
WebSocket API (response.created, deltas, response.done).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama_omni.audio import AudioError
from llama_omni.serve.audio_io import decode_upload
from llama_omni.serve.protocol import EventIds, error_event, http_error, session_object
from llama_omni.serve.responses import ResponseOutput, final_status
from llama_omni.serve.scheduler import Failure, Job, QueueFull
from llama_omni.serve.sessions import History, SessionSettings

if TYPE_CHECKING:
    from llama_omni.serve.app import Server


async def answer_upload(
    server: Server, request: Request, chunk_size: str, sample_rate: int, audio: bool, **sampling
) -> Response:
    """Check, decode and queue the upload; stream the answer."""
    limits = server.limits
    problem = _check_length(request, limits.max_upload_bytes)
    if problem:
        return problem
    try:
        sampling["max_new_tokens"] = min(sampling["max_new_tokens"], limits.max_new_tokens)
        settings = SessionSettings(
            output_rate=sample_rate, chunk_size=_omega(chunk_size), audio=audio, **sampling
        )
        data = await _upload_bytes(request)
        wave = await asyncio.to_thread(decode_upload, data, limits.max_audio_seconds)
    except ValueError as err:  # AudioError included
        code = "invalid_audio" if isinstance(err, AudioError) else "invalid_value"
        return http_error(400, code, str(err))
    return await _stream_answer(server, wave, settings)


def _omega(text: str) -> int | None:
    if text == "inf":
        return None
    if not text.isdigit():
        raise ValueError(f"chunk_size must be a positive number of units or 'inf', got {text!r}")
    return int(text)


def _check_length(request: Request, limit: int) -> JSONResponse | None:
    """Uploads must say their size (Content-Length) and stay within the limit."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return http_error(411, "length_required", "send the upload with a Content-Length header")
    if int(length) > limit:
        return http_error(
            413, "upload_too_large", f"the upload has {length} bytes; the limit is {limit}"
        )
    return None


async def _upload_bytes(request: Request) -> bytes:
    """The file of a multipart form (field "file"), else the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise AudioError('the multipart form needs the sound file in a field named "file"')
        return await upload.read()
    return await request.body()


async def _stream_answer(server: Server, wave, settings: SessionSettings) -> Response:
    """Queue one turn; refuse with 4xx/503 until its first event, then stream NDJSON."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(
        wave,
        History(0),
        settings.engine_options(),
        emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
    )
    ids = EventIds()
    output = ResponseOutput(ids("resp"), ids("item"), settings.output_rate, job.t_end)
    try:
        server.scheduler.submit(job)
    except QueueFull as err:
        return http_error(503, "server_busy", str(err))
    first = await events.get()
    if isinstance(first, Failure):
        output.convert(first)
        output.record(server.metrics, "failed")
        return http_error(400 if first.code == "invalid_audio" else 500, first.code, first.message)

    async def lines() -> AsyncIterator[bytes]:
        status = "cancelled"
        try:
            created = {
                "type": "response.created",
                "response": {"id": output.response_id, "status": "in_progress"},
                "session": session_object("http", settings),
            }
            yield _line(created)
            event = first
            while True:
                for wire in output.convert(event):
                    yield _line(wire)
                if output.finished:
                    break
                event = await events.get()
            status = final_status(output)
            if output.failure is not None:
                yield _line(
                    error_event(
                        ids("event"),
                        output.failure.message,
                        output.failure.code,
                        kind="server_error",
                    )
                )
            yield _line(output.done(status, settings.audio))
        finally:  # also on a client that went away mid-answer
            job.cancel()
            output.record(server.metrics, status)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()
