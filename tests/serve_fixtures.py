"""Helpers for the serving tests: a tiny model behind the app, a live loopback server.

A test module uses a fixture by importing its `*_fixture` function (pytest registers it
under the fixture's name); `one_thread` applies to every test of such a module.
"""

from __future__ import annotations

import base64
import functools
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from inference_fixtures import one_thread_fixture  # noqa: F401 (re-exported fixture)

from llama_omni.audio import load_audio
from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig
from llama_omni.serve.app import create_app
from llama_omni.serve.sessions import ServerLimits

EXAMPLES = Path(__file__).parents[1] / "llama_omni" / "serve" / "static" / "examples"


@functools.cache
def _tiny_parts(llm_dir: Path) -> tuple[OmniModel, UnitVocoder]:
    """Built once per test run (a module-level cache, shared by every test module)."""
    torch.manual_seed(0)
    model = OmniModel.initialize(OmniConfig.preset("tiny-test"), base_dir=llm_dir).eval()
    torch.manual_seed(1)
    return model, UnitVocoder(VocoderConfig.preset("tiny-test")).eval()


@pytest.fixture(name="serve_model")
def serve_model_fixture(tiny_llm_dir) -> OmniModel:
    """The tiny test model: serving only reads it, so all tests share one."""
    return _tiny_parts(tiny_llm_dir)[0]


@pytest.fixture(name="serve_vocoder")
def serve_vocoder_fixture(tiny_llm_dir) -> UnitVocoder:
    return _tiny_parts(tiny_llm_dir)[1]


@pytest.fixture(name="make_app")
def make_app_fixture(serve_model, serve_vocoder):
    """create_app over the tiny model; keyword arguments become ServerLimits fields."""

    def make(max_queue: int = 32, max_batch: int = 8, **limits):
        return create_app(serve_model, serve_vocoder, ServerLimits(**limits), max_queue, max_batch)

    return make


@pytest.fixture(name="client")
def client_fixture(make_app):
    with TestClient(make_app()) as test_client:
        yield test_client


def speech(name: str = "capital") -> np.ndarray:
    """A spoken example question (16 kHz float32)."""
    return load_audio(EXAMPLES / f"{name}.flac")


def tone(seconds: float = 1.0, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def pcm(audio: np.ndarray) -> str:
    return base64.b64encode((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def receive_until(ws, kind: str, limit: int = 5000) -> list[dict]:
    """Events up to and including the first of type `kind`."""
    events = []
    for _ in range(limit):
        events.append(ws.receive_json())
        if events[-1]["type"] == kind:
            return events
    raise AssertionError(f"no {kind} within {limit} events")


def ask(ws, audio: np.ndarray, **response) -> list[dict]:
    """Append, commit and answer one turn; the events up to response.done."""
    ws.send_json({"type": "input_audio_buffer.append", "audio": pcm(audio)})
    ws.send_json({"type": "input_audio_buffer.commit"})
    ws.send_json({"type": "response.create", **({"response": response} if response else {})})
    return receive_until(ws, "response.done")


@contextmanager
def live_server(app):
    """Run `app` with uvicorn on a free loopback port; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
