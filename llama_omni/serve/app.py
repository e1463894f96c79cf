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

import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from llama_omni.inference.engine import Engine, EngineOptions, vocoder_mismatch
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder
from llama_omni.serve.metrics import Metrics
from llama_omni.serve.protocol import EventIds, error_event, http_error
from llama_omni.serve.realtime import RealtimeConnection
from llama_omni.serve.scheduler import Scheduler
from llama_omni.serve.sessions import (
    ServerLimits,
    SessionLimit,
    SessionRegistry,
)
from llama_omni.serve.upload import answer_upload

STATIC_DIR = Path(__file__).parent / "static"
EXAMPLES = (  # (text, file under static/examples)
    ("What is the capital of France?", "capital.flac"),
    ("Can you give me three tips for staying healthy?", "healthy.flac"),
    ("How do I make a cup of tea?", "tea.flac"),
)


class Server:
    """What every route shares: the scheduler (model worker), sessions, limits, metrics."""

    def __init__(
        self,
        model: OmniModel,
        vocoder: UnitVocoder | None,
        limits: ServerLimits,
        max_queue: int,
        max_batch: int,
        model_name: str,
    ):
        self.audio_problem = vocoder_mismatch(model, vocoder)
        self.scheduler = Scheduler(
            model, None if self.audio_problem else vocoder, max_queue, max_batch
        )
        encoder_seconds = Engine(model, None, EngineOptions(speech=False)).max_audio_seconds
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
            "status": "ok",
            "model": self.model_name,
            "audio": self.audio_problem is None,
            "audio_problem": self.audio_problem,
            "sessions": len(self.sessions.sessions),
            "max_sessions": self.limits.max_sessions,
            "queued": self.scheduler.queued,
            "decoding": self.scheduler.active,
            "uptime_s": round(time.time() - self.started, 1),
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
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors()
        )
        return http_error(422, "invalid_value", problems)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.count(
            f"http.{request.method} {getattr(route, 'path', 'unmatched')}.{response.status_code}"
        )
        return response

    def denied(request: Request) -> JSONResponse | None:
        if server.authorized(request.headers, request.query_params):
            return None
        return http_error(
            401, "invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY"
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metrics")
    async def metrics(request: Request):
        return denied(request) or {
            **server.metrics.snapshot(),
            **server.health(),
            "batches": server.scheduler.batches,
            "batched_turns": server.scheduler.batched_jobs,
            "prompt_positions": {
                "reused": server.scheduler.positions_reused,
                "fed": server.scheduler.positions_fed,
            },
        }

    @app.get("/v1/examples")
    async def examples(request: Request):
        return denied(request) or [
            {"text": text, "url": f"/static/examples/{name}"} for text, name in EXAMPLES
        ]

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        ids = EventIds()
        if not server.authorized(ws.headers, ws.query_params):
            await ws.send_json(
                error_event(ids("event"), "missing or wrong API key", "invalid_api_key")
            )
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
        repetition_penalty: float | None = None,
        max_new_tokens: int = 512,
        chunk_size: str = "40",
        sample_rate: int = 16000,
        audio: bool = True,
    ):
        """Answer one uploaded question; the body streams back as NDJSON event lines."""
        options = {"temperature": temperature, "top_p": top_p,
                   "repetition_penalty": repetition_penalty, "max_new_tokens": max_new_tokens}
        return denied(request) or await answer_upload(
            server, request, chunk_size, sample_rate, audio, **options
        )

    return app
