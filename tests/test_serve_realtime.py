"""The Realtime-style WebSocket API on the tiny model: turns, settings, cancel, VAD, limits."""

import base64
import time

import numpy as np
from fastapi.testclient import TestClient
from serve_fixtures import (  # noqa: F401 (fixtures)
    ask,
    client_fixture,
    make_app_fixture,
    one_thread_fixture,
    pcm,
    receive_until,
    serve_model_fixture,
    serve_vocoder_fixture,
    speech,
    tone,
)


def _audio(events, kind="response.output_audio.delta"):
    chunks = [
        np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in events if e["type"] == kind
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0)


def test_spoken_turn_streams_text_units_and_audio(client):
    with client.websocket_connect("/v1/realtime") as ws:
        created = ws.receive_json()
        assert created["type"] == "session.created"
        assert created["session"]["audio"]["output"]["format"]["rate"] == 16000
        events = ask(ws, tone(), max_output_tokens=12)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["input_audio_buffer.committed", "response.created"]
    assert "response.output_text.delta" in kinds and "response.output_units.delta" in kinds
    done = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert done["output"][0]["content"][0]["transcript"] == text and text
    assert done["status"] in ("completed", "incomplete")
    audio = _audio(events)
    assert audio.size == round(done["audio_seconds"] * 16000) > 0
    assert done["latency_ms"]["first_audio"] > 0
    assert len({e["event_id"] for e in events}) == len(events)


def test_output_at_24k_is_the_16k_answer_resampled(client):
    def answer(rate):
        with client.websocket_connect("/v1/realtime") as ws:
            ws.receive_json()
            ws.send_json(
                {
                    "type": "session.update",
                    "session": {
                        "max_output_tokens": 8,
                        "audio": {"output": {"format": {"type": "audio/pcm", "rate": rate}}},
                    },
                }
            )
            assert ws.receive_json()["session"]["audio"]["output"]["format"]["rate"] == rate
            return ask(ws, tone())

    low, high = answer(16000), answer(24000)
    assert {e["sample_rate"] for e in high if e["type"] == "response.output_audio.delta"} == {24000}
    assert abs(_audio(high).size - _audio(low).size * 1.5) <= 1
    assert _text(low) == _text(high)


def _text(events):
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_turns_build_on_the_conversation(client):
    """The second answer to the same question differs once the first turn is in the prompt."""
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        first, second = (
            _text(ask(ws, tone(), max_output_tokens=6)),
            _text(ask(ws, tone(), max_output_tokens=6)),
        )
    with client.websocket_connect("/v1/realtime") as fresh:
        fresh.receive_json()
        again = _text(ask(fresh, tone(), max_output_tokens=6))
    assert first == again and second != first


def test_text_only_session_sends_no_audio(client):
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json(
            {
                "type": "session.update",
                "session": {
                    "output_modalities": ["text"],
                    "max_output_tokens": 5,
                    "repetition_penalty": 1.3,
                },
            }
        )
        updated = ws.receive_json()
        events = ask(ws, tone())
    assert updated["type"] == "session.updated"
    assert updated["session"]["repetition_penalty"] == 1.3
    assert not [
        e
        for e in events
        if e["type"] in ("response.output_audio.delta", "response.output_units.delta")
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "output_text"


def start_long_answer(ws) -> None:
    """Open the session, ask with a 1000-token budget, return once the answer streams."""
    ws.receive_json()
    ws.send_json({"type": "input_audio_buffer.append", "audio": pcm(tone())})
    ws.send_json({"type": "input_audio_buffer.commit"})
    ws.send_json({"type": "response.create", "response": {"max_output_tokens": 1000}})
    receive_until(ws, "response.output_text.delta")


def test_cancel_stops_the_answer_and_the_session_goes_on(client):
    with client.websocket_connect("/v1/realtime") as ws:
        start_long_answer(ws)
        ws.send_json({"type": "response.cancel"})
        done = receive_until(ws, "response.done")[-1]["response"]
        assert done["status"] == "cancelled"
        assert ask(ws, tone(), max_output_tokens=3)[-1]["response"]["status"] in (
            "completed",
            "incomplete",
        )


def test_disconnect_mid_answer_frees_the_session_and_the_worker(client):
    server = client.app.state.server
    with client.websocket_connect("/v1/realtime") as ws:
        start_long_answer(ws)
        assert client.get("/health").json()["sessions"] == 1
        assert server.scheduler.active == 1
    deadline = time.monotonic() + 10  # a 1000-token answer takes far longer on this machine
    while server.scheduler.active or client.get("/health").json()["sessions"]:
        assert time.monotonic() < deadline, "the disconnected session still holds the worker"
        time.sleep(0.05)
    assert client.get("/metrics").json()["counts"]["responses.cancelled"] == 1


def test_server_vad_commits_answers_and_barge_in_cancels(client):
    question = np.concatenate([speech(), np.zeros(16000, np.float32)])
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json(
            {
                "type": "session.update",
                "session": {
                    "max_output_tokens": 1000,
                    "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
                },
            }
        )
        assert (
            ws.receive_json()["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        )
        for piece in np.array_split(question, 20):  # 150 ms appends, like a microphone
            ws.send_json({"type": "input_audio_buffer.append", "audio": pcm(piece)})
        events = receive_until(ws, "response.created")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
            "input_audio_buffer.speech_stopped"
        )
        committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
        assert 1500 < committed["audio_ms"] < 3000  # the question, not the trailing silence
        ws.send_json({"type": "input_audio_buffer.append", "audio": pcm(speech("tea"))})  # barge in
        events = receive_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
        "output_audio_buffer.cleared"
    )
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"


def test_http_respond_streams_ndjson(client):
    import io
    import json

    import soundfile as sf

    body = io.BytesIO()
    sf.write(body, tone(), 16000, format="FLAC")
    with client.stream(
        "POST",
        "/v1/respond?max_new_tokens=6&sample_rate=24000",
        files={"file": ("q.flac", body.getvalue(), "audio/flac")},
    ) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    kinds = [e["type"] for e in lines]
    assert kinds[0] == "response.created" and kinds[-1] == "response.done"
    assert "response.output_text.delta" in kinds and "response.output_audio.delta" in kinds
    assert lines[-1]["response"]["output"][0]["content"][0]["transcript"] == _text(lines)


def test_api_key_guards_the_api(make_app):
    with TestClient(make_app(api_key="sesame")) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert client.post("/v1/respond", content=b"x").status_code == 401
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["error"]["code"] == "invalid_api_key"
        with client.websocket_connect("/v1/realtime?api_key=sesame") as ws:
            assert ws.receive_json()["type"] == "session.created"


def test_session_limit(make_app):
    with TestClient(make_app(max_sessions=1)) as client:
        with client.websocket_connect("/v1/realtime") as first:
            assert first.receive_json()["type"] == "session.created"
            with client.websocket_connect("/v1/realtime") as second:
                assert second.receive_json()["error"]["code"] == "session_limit"
        with client.websocket_connect("/v1/realtime") as again:
            assert again.receive_json()["type"] == "session.created"


def test_health_metrics_and_page(client):
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ask(ws, tone(), max_output_tokens=4)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["audio"] and health["sessions"] == 0
    metrics = client.get("/metrics").json()
    assert metrics["latency_ms"]["first_audio_ms"]["n"] == 1
    assert {"p50", "p90", "p99"} <= set(metrics["latency_ms"]["total_ms"])
    assert metrics["counts"]["events.response.create"] == 1
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    examples = client.get("/v1/examples").json()
    assert examples and all(client.get(e["url"]).status_code == 200 for e in examples)
