"""200+ malformed messages and files: each gets a clear error (event or 4xx); serving goes on."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from serve_fixtures import (  # noqa: F401 (fixtures)
    ask,
    make_app_fixture,
    one_thread_fixture,
    pcm,
    serve_model_fixture,
    serve_vocoder_fixture,
    tone,
)

MESSAGE_LIMIT = 256 * 1024
UPLOAD_LIMIT = 1 << 20
rng = np.random.default_rng(0)


def _wav(audio: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, rate, format=fmt, **({"subtype": "PCM_16"} if fmt == "WAV" else {}))
    return out.getvalue()


def _event(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


def _session(**session) -> str:
    return _event("session.update", session=session)


def bad_messages() -> list[str | bytes]:
    """WebSocket messages that must each draw exactly one error event."""
    invalid_json = [
        "{bad",
        "",
        " ",
        "[]",
        "null",
        "123",
        '"text"',
        '{"type": 5}',
        '{"no_type": 1}',
        "{'type': 'session.update'}",
        '{"type": "session.update"',
        "\x00\x01",
        "true",
        '{"type": null}',
        '{"type": ["response.create"]}',
    ]
    random_text = [
        "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, size=n)) for n in range(1, 31)
    ]
    random_bytes = [
        rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (1, 2, 7, 64, 999) * 6
    ]
    unknown = [
        _event(kind)
        for kind in (
            "conversation.item.create",
            "response.created",
            "session.created",
            "input_audio_buffer.flush",
            "RESPONSE.CREATE",
            "response.create ",
            "transcription_session.update",
            "output_audio_buffer.clear",
            "x",
            "a" * 10000,
            "session.update.extra",
            "error",
            "input_audio_buffer",
            "response",
            "💥",
        )
    ]
    bad_audio = [
        _event("input_audio_buffer.append", audio=a)
        for a in (
            "not base64!",
            "AAA",
            "A",
            "====",
            12,
            None,
            ["AAAA"],
            {"b": 1},
            "AAAA",
            "AQIDBAU=",  # last two: odd byte counts
            "YWJj",
            "\u00e9\u00e9",
            "AA==AA==",
            True,
            1.5,
        )
    ]
    bad_session = [
        _event("session.update"),
        _event("session.update", session="fast"),
        _event("session.update", session=[1]),
        _session(temperature=-1),
        _session(temperature="hot"),
        _session(temperature=True),
        _session(top_p=0),
        _session(top_p=2),
        _session(repetition_penalty=0.5),
        _session(repetition_penalty="strong"),
        _session(chunk_size=0),
        _session(chunk_size=-5),
        _session(chunk_size="x"),
        _session(chunk_size=2.5),
        _session(max_output_tokens=0),
        _session(max_output_tokens=10**9),
        _session(max_output_tokens="many"),
        _session(output_modalities=["video"]),
        _session(output_modalities=[]),
        _session(output_modalities="audio"),
        _session(audio={"input": {"format": {"type": "audio/pcm", "rate": 44100}}}),
        _session(audio={"input": {"format": {"type": "audio/pcm", "rate": 8000}}}),
        _session(audio={"output": {"format": {"type": "audio/pcmu"}}}),
        _session(audio={"output": {"format": {"type": "audio/pcm", "rate": "fast"}}}),
        _session(audio={"input": {"format": "pcm16"}}),
        _session(audio="loud"),
        _session(audio={"input": {"turn_detection": {"type": "semantic_vad"}}}),
        _session(audio={"input": {"turn_detection": {"threshold": 2}}}),
        _session(audio={"input": {"turn_detection": {"silence_duration_ms": 1}}}),
        _session(audio={"input": {"turn_detection": {"prefix_padding_ms": -1}}}),
        _session(audio={"input": {"turn_detection": {"create_response": "yes"}}}),
        _session(audio={"input": {"turn_detection": "on"}}),
    ]
    out_of_order = (
        [_event("input_audio_buffer.commit")] * 5
        + [_event("response.create")] * 5
        + [_event("response.cancel")] * 5
        + [_event("response.create", response="now")] * 3
        + [_event("response.create", response={"max_output_tokens": -1})] * 2
    )
    oversize = [
        "x" * (MESSAGE_LIMIT + 1),
        _event("input_audio_buffer.append", audio="A" * MESSAGE_LIMIT),
        _event("input_audio_buffer.append", audio=pcm(tone(9.0))),
    ] + [" " * (MESSAGE_LIMIT + n) for n in (1, 99)]
    return (
        invalid_json
        + random_text
        + random_bytes
        + unknown
        + bad_audio
        + bad_session
        + out_of_order
        + oversize
    )


def bad_uploads() -> list[tuple[str, dict, int]]:
    """(query, request kwargs, expected status) for POST /v1/respond."""
    wav = _wav(tone(1.0))
    cases = [
        ("", {"content": rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()}, 400)
        for n in (1, 10, 100, 1000, 5000, 44, 12, 3, 77, 2048)
    ]
    cases += [
        ("", {"content": wav[:n]}, 400)
        for n in (4, 12, 20, 30, 43, 44, 46, 100, 5000, len(wav) - 2)
    ]
    cases += [
        ("", {"content": b""}, 400),
        ("", {"content": b"RIFF"}, 400),
        ("", {"files": {"file": ("empty.wav", b"", "audio/wav")}}, 400),
        ("", {"files": {"other": ("q.wav", wav, "audio/wav")}}, 400),
        ("", {"data": {"file": "not a file"}, "files": {"x": ("x", b"1", "text/plain")}}, 400),
    ]
    cases += [
        ("", {"content": _wav(tone(1.0)[:: 16000 // rate], rate)}, 400)
        for rate in (1000, 2000, 4000, 6000, 7999)
    ]
    ten_minutes = np.tile(tone(1.0), 600)
    cases += [
        ("", {"content": _wav(ten_minutes)}, 413),
        ("", {"content": _wav(np.zeros(16000 * 600, np.float32), fmt="FLAC")}, 400),
        ("", {"content": _wav(ten_minutes[: 16000 * 31])}, 400),
    ]
    cases += [
        ("", {"content": b"\x00" * (UPLOAD_LIMIT + 1)}, 413),
        ("", {"content": wav, "headers": {"content-length": str(UPLOAD_LIMIT * 5)}}, 413),
    ]
    cases += [
        (query, {"content": wav}, 400)
        for query in (
            "?temperature=-1",
            "?top_p=0",
            "?top_p=3",
            "?repetition_penalty=0.9",
            "?chunk_size=abc",
            "?chunk_size=0",
            "?sample_rate=44100",
            "?max_new_tokens=0",
            "?temperature=nan",
        )
    ]
    cases += [
        (query, {"content": wav}, 422) for query in ("?max_new_tokens=many", "?temperature=hot")
    ]
    cases += [
        ("", {"content": iter([wav])}, 411),  # chunked: no Content-Length
        ("", {"content": _wav(tone(0.01))}, 400),  # too short for one speech embedding
        (
            "",
            {
                "content": b"\x1a\x45\xdf\xa3" + bytes(200),
                "headers": {"content-type": "audio/webm"},
            },
            400,
        ),
    ]
    return cases


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(make_app):
    messages, uploads = bad_messages(), bad_uploads()
    assert len(messages) + len(uploads) >= 200
    app = make_app(
        max_message_bytes=MESSAGE_LIMIT, max_upload_bytes=UPLOAD_LIMIT, max_new_tokens=64
    )
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            for message in messages:
                (ws.send_bytes if isinstance(message, bytes) else ws.send_text)(message)
                reply = ws.receive_json()
                assert reply["type"] == "error", (message[:200], reply)
                assert reply["error"]["message"] and reply["error"]["code"] != "server_error", reply
            _ten_minutes_streamed(ws)
            assert ask(ws, tone(), max_output_tokens=4)[-1]["type"] == "response.done"
        for query, kwargs, status in uploads:
            response = client.post(f"/v1/respond{query}", **kwargs)
            assert response.status_code == status, (query, str(kwargs)[:200], response.text[:300])
            assert response.json()["error"]["message"]
        ok = client.post("/v1/respond?max_new_tokens=3", content=_wav(tone()))
        assert (
            ok.status_code == 200
            and json.loads(ok.text.splitlines()[-1])["type"] == "response.done"
        )
        assert client.get("/health").json()["status"] == "ok"
        counts = client.get("/metrics").json()["counts"]
    assert counts["errors.invalid_json"] >= 20 and counts["errors.unknown_event"] >= 15


def _ten_minutes_streamed(ws) -> None:
    """10 minutes appended 5 s at a time: refused past the 30 s buffer limit, then cleared."""
    piece = pcm(tone(5.0))
    refused = 0
    for _ in range(120):
        ws.send_text(_event("input_audio_buffer.append", audio=piece))
    for _ in range(114):  # accepted appends send nothing; each refused one sends an error
        reply = ws.receive_json()
        assert reply["type"] == "error" and "exceed 30 s" in reply["error"]["message"]
        refused += 1
    ws.send_text(_event("input_audio_buffer.clear"))
    assert ws.receive_json()["type"] == "input_audio_buffer.cleared"
    assert refused == 114


@pytest.mark.parametrize("missing", [True, False])
def test_webm_needs_ffmpeg(monkeypatch, missing):
    from llama_omni.audio import AudioError
    from llama_omni.serve import audio_io

    if missing:
        monkeypatch.setattr(audio_io.shutil, "which", lambda name: None)
    elif audio_io.shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    with pytest.raises(AudioError, match="ffmpeg" if missing else "not a readable sound file"):
        audio_io.decode_upload(b"\x1a\x45\xdf\xa3" + bytes(100), 30)
