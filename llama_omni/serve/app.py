"""The FastAPI app: Realtime WebSocket API, streamed HTTP answers, web page, health, metrics.

Routes
    GET  /                 the voice-chat web page (static/)
    GET  /health           liveness, model, open sessions, queue (no API key needed)
    GET  /metrics          request / event / error counts and latency percentiles (JSON)
    WS   /v1/realtime      Realtime-style events (see protocol.py); multi-turn per connection
    POST /v1/respond       an audio file (raw body or multipart "file") -> NDJSON event lines
    GET  /v1/examples      example questions: [{"text", "url"}] of audio served under /static

With an API key set, every route but / , /static and /health needs
`Authorization: Bearer KEY` (browsers' WebSockets may pass `?api_key=KEY` instead).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from llama_omni.audio import AudioError
from llama_omni.inference.engine import Engine, vocoder_mismatch
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder
from llama_omni.serve.audio_io import decode_upload
from llama_omni.serve.metrics import Metrics
from llama_omni.serve.protocol import EventIds, error_event, session_object
from llama_omni.serve.realtime import RealtimeConnection
from llama_omni.serve.responses import ResponseOutput, final_status
from llama_omni.serve.scheduler import Failure, Job, QueueFull, Scheduler
from llama_omni.serve.sessions import History, ServerLimits, SessionLimit, SessionRegistry, SessionSettings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
EXAMPLES = (  # (text, file under static/examples)
    ("What is the capital of France?", "capital.flac"),
    ("Can you give me three tips for staying healthy?", "healthy.flac"),
    ("How do I make a cup of tea?", "tea.flac"),
)


class Server:
    """What every route shares: the scheduler (model worker), sessions, limits, metrics."""

    def __init__(self, model: OmniModel, vocoder: UnitVocoder | None, limits: ServerLimits,
                 max_queue: int, max_batch: int, model_name: str):
        self.audio_problem = vocoder_mismatch(model, vocoder)
        self.scheduler = Scheduler(model, None if self.audio_problem else vocoder, max_queue, max_batch)
        encoder_seconds = Engine(model, None).max_audio_seconds
        self.limits = limits
        if limits.max_audio_seconds > encoder_seconds:
            self.limits = ServerLimits(**{**vars(limits), "max_audio_seconds": encoder_seconds})
        self.sessions = SessionRegistry(self.limits)
        self.metrics = Metrics()
        self.model_name = model_name
        self.started = time.time()

    def authorized(self, headers, query) -> bool:
        key = self.limits.api_key
        if key is None:
            return True
        given = headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else query.get("api_key", "")
        return secrets.compare_digest(given.encode(), key.encode())

    def health(self) -> dict:
        return {
            "status": "ok", "model": self.model_name, "audio": self.audio_problem is None,
            "audio_problem": self.audio_problem, "sessions": len(self.sessions.sessions),
            "max_sessions": self.limits.max_sessions, "queued": self.scheduler.queued,
            "decoding": self.scheduler.active, "uptime_s": round(time.time() - self.started, 1),
        }


def create_app(
    model: OmniModel,
    vocoder: UnitVocoder | None = None,
    limits: ServerLimits | None = None,
    max_queue: int = 32,
    max_batch: int = 8,
    model_name: str = "llama-omni",
) -> FastAPI:
    """The app; its lifespan starts and stops the model worker."""
    server = Server(model, vocoder, limits or ServerLimits(), max_queue, max_batch, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="llama-omni", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors())
        return _error(422, "invalid_value", problems)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.count(f"http.{request.method} {getattr(route, 'path', 'unmatched')}.{response.status_code}")
        return response

    def denied(request: Request) -> JSONResponse | None:
        if server.authorized(request.headers, request.query_params):
            return None
        return _error(401, "invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metrics")
    async def metrics(request: Request):
        return denied(request) or {**server.metrics.snapshot(), **server.health(),
                                   "batches": server.scheduler.batches, "batched_turns": server.scheduler.batched_jobs}

    @app.get("/v1/examples")
    async def examples(request: Request):
        return denied(request) or [{"text": text, "url": f"/static/examples/{name}"} for text, name in EXAMPLES]

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        ids = EventIds()
        if not server.authorized(ws.headers, ws.query_params):
            await ws.send_json(error_event(ids("event"), "missing or wrong API key", "invalid_api_key"))
            await ws.close(code=1008, reason="invalid API key")
            return
        try:
            session = server.sessions.open()
        except SessionLimit as err:
            server.metrics.count("errors.session_limit")
            await ws.send_json(error_event(ids("event"), err, "session_limit", kind="server_error"))
            await ws.close(code=1013, reason="too many sessions")
            return
        await RealtimeConnection(ws, server, session).run()

    @app.post("/v1/respond")
    async def respond(
        request: Request,
        temperature: float = 0.0,
        top_p: float = 0.7,
        max_new_tokens: int = 512,
        chunk_size: str = "40",
        sample_rate: int = 16000,
        audio: bool = True,
    ):
        """Answer one uploaded question; the body streams back as NDJSON event lines."""
        problem = denied(request) or _check_length(request, server.limits.max_upload_bytes)
        if problem:
            return problem
        try:
            settings = SessionSettings(
                output_rate=sample_rate, temperature=temperature, top_p=top_p,
                max_new_tokens=min(max_new_tokens, server.limits.max_new_tokens),
                chunk_size=_omega(chunk_size), audio=audio,
            )
            data = await _upload_bytes(request)
            wave = await asyncio.to_thread(decode_upload, data, server.limits.max_audio_seconds)
        except (AudioError, ValueError) as err:
            return _error(400, "invalid_audio" if isinstance(err, AudioError) else "invalid_value", str(err))
        return await _stream_answer(server, wave, settings)

    return app


def _omega(text: str) -> int | None:
    if text == "inf":
        return None
    if not text.isdigit():
        raise ValueError(f"chunk_size must be a positive number of units or 'inf', got {text!r}")
    return int(text)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _check_length(request: Request, limit: int) -> JSONResponse | None:
    """Uploads must say their size (Content-Length) and stay within the limit."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return _error(411, "length_required", "send the upload with a Content-Length header")
    if int(length) > limit:
        return _error(413, "upload_too_large", f"the upload has {length} bytes; the limit is {limit}")
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
    job = Job(wave, History(0), settings.engine_options(), emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    ids = EventIds()
    output = ResponseOutput(ids("resp"), ids("item"), settings.output_rate, job.t_end)
    try:
        server.scheduler.submit(job)
    except QueueFull as err:
        return _error(503, "server_busy", str(err))
    first = await events.get()
    if isinstance(first, Failure):
        output.convert(first)
        output.record(server.metrics, "failed")
        return _error(400 if first.code == "invalid_audio" else 500, first.code, first.message)

    async def lines() -> AsyncIterator[bytes]:
        status = "cancelled"
        try:
            created = {"type": "response.created", "response": {"id": output.response_id, "status": "in_progress"},
                       "session": session_object("http", settings)}
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
                yield _line(error_event(ids("event"), output.failure.message, output.failure.code, kind="server_error"))
            yield _line(output.done(status, settings.audio))
        finally:  # also on a client that went away mid-answer
            job.cancel()
            output.record(server.metrics, status)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()
