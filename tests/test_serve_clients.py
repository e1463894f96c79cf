"""Real clients on live loopback servers: the openai package's Realtime client, gradio_client."""

import base64
import os
from pathlib import Path

import pytest
from serve_fixtures import (  # noqa: F401 (fixtures)
    EXAMPLES,
    live_server,
    make_app_fixture,
    one_thread_fixture,
    pcm,
    serve_model_fixture,
    serve_vocoder_fixture,
    speech,
)


def test_openai_realtime_client_completes_a_spoken_turn(make_app):
    openai = pytest.importorskip("openai")
    with live_server(make_app(api_key="test-key")) as port:
        client = openai.OpenAI(
            api_key="test-key",
            base_url=f"http://127.0.0.1:{port}/v1",
            websocket_base_url=f"ws://127.0.0.1:{port}/v1",
        )
        with client.realtime.connect(model="llama-omni") as connection:
            connection.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "max_output_tokens": 10,
                    "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}},
                }
            )
            connection.input_audio_buffer.append(audio=pcm(speech()))
            connection.input_audio_buffer.commit()
            connection.response.create()
            text, audio, kinds = "", b"", []
            for event in connection:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.output_audio.delta":
                    audio += base64.b64decode(event.delta)
                elif event.type == "error":
                    pytest.fail(event.error.message)
                elif event.type == "response.done":
                    done = event.response
                    break
    assert kinds[0] == "session.created" and "session.updated" in kinds
    assert type(done).__name__ == "RealtimeResponse" and done.status in ("completed", "incomplete")
    assert text and done.output[0].content[0].transcript == text
    assert len(audio) > 0 and len(audio) % 2 == 0


def test_gradio_client_drives_a_full_turn(serve_model, serve_vocoder, monkeypatch, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from llama_omni.serve.gradio_app import build_demo
    from llama_omni.serve.scheduler import Scheduler
    from llama_omni.serve.sessions import ServerLimits

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    scheduler = Scheduler(serve_model, serve_vocoder)
    scheduler.start()
    demo = build_demo(scheduler, ServerLimits())
    try:
        demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path))
        text, units, speech_file, latency = client.predict(
            handle_file(str(EXAMPLES / "tea.flac")), 0.0, 0.7, 1.2, 12, 5, api_name="/respond"
        )
    finally:
        demo.close()
        scheduler.stop()
    assert text.strip() and units.split() and "first audio after" in latency
    assert speech_file and Path(speech_file).is_file() and os.path.getsize(speech_file) > 0
