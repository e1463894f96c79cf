"""`llama-omni serve` (API + web page) and `llama-omni gradio` (a Space-style demo)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

ModelOption = Annotated[
    Path | None,
    typer.Option(
        help="Checkpoint directory (ours or the published format); "
        "default: the installed default model."
    ),
]
VocoderOption = Annotated[
    Path | None, typer.Option(help="Vocoder directory; default: the one the model's config names.")
]
HostOption = Annotated[
    str,
    typer.Option(
        help="Address to bind. The default serves this machine only; "
        "0.0.0.0 opens it to the network."
    ),
]


def serve(
    model: ModelOption = None,
    vocoder: VocoderOption = None,
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LLAMA_OMNI_API_KEY",
            help="Require 'Authorization: Bearer KEY' (env LLAMA_OMNI_API_KEY).",
        ),
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Open WebSocket sessions at most.")] = 16,
    max_queue: Annotated[
        int, typer.Option(help="Turns waiting for the model at most (more: 'server busy').")
    ] = 32,
    max_batch: Annotated[
        int, typer.Option(help="Turns of different sessions decoded together at most.")
    ] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest uploaded file, MiB.")] = 10.0,
    max_audio_seconds: Annotated[
        float,
        typer.Option(
            help="Longest spoken question (also capped by the speech encoder, 30 s for Whisper)."
        ),
    ] = 30.0,
) -> None:
    """Serve the model: Realtime-style WebSocket API, HTTP answers, web voice chat, metrics.

    Open http://HOST:PORT/ for the voice chat. The WebSocket API is at /v1/realtime
    (point the openai package's websocket_base_url at ws://HOST:PORT/v1).
    """
    import uvicorn

    from llama_omni.serve.app import create_app
    from llama_omni.serve.sessions import ServerLimits

    limits = ServerLimits(
        max_sessions=max_sessions,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_audio_seconds=max_audio_seconds,
        api_key=api_key or None,
    )
    omni, voice, name = _load_model(model, vocoder)
    app = create_app(omni, voice, limits, max_queue=max_queue, max_batch=max_batch, model_name=name)
    _warn_if_open(host, api_key)
    # Messages above our own limit get an error event; far larger ones are cut by uvicorn.
    uvicorn.run(
        app, host=host, port=port, ws_max_size=4 * limits.max_message_bytes, log_level="info"
    )


def gradio(
    model: ModelOption = None,
    vocoder: VocoderOption = None,
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 7860,
) -> None:
    """Serve the Gradio demo: record or upload a question, hear and read the streamed answer."""
    from llama_omni.serve.gradio_app import launch

    omni, voice, name = _load_model(model, vocoder)
    _warn_if_open(host, None)
    launch(omni, voice, host=host, port=port, title=name)


def _load_model(model: Path | None, vocoder: Path | None):
    from llama_omni.cli.chat import _load
    from llama_omni.inference.defaults import default_model_dir

    omni, voice = _load(model, vocoder)
    return omni, voice, (model or default_model_dir()).name


def _warn_if_open(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not (
        api_key or os.environ.get("LLAMA_OMNI_API_KEY")
    ):
        logging.getLogger("llama_omni.serve").warning(
            "binding %s without an API key: anyone who reaches this machine can use the model", host
        )
