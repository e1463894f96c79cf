"""The wire format: JSON events shaped like the OpenAI Realtime API (GA event names).

Client -> server: session.update, input_audio_buffer.append / commit / clear,
response.create, response.cancel. Server -> client: session.created / updated,
input_audio_buffer.committed / cleared / speech_started / speech_stopped,
response.created, response.output_text.delta, response.output_audio.delta (base64
PCM16 at the session's output rate), response.output_units.delta (ours: the speech
units, for display), output_audio_buffer.cleared (flush playback after barge-in),
response.done (with latency figures) and error.

Sessions take the Realtime session object's fields that make sense for this model
(output_modalities, max_output_tokens, audio.input/output.format.rate,
audio.input.turn_detection) plus four of ours at its top level: temperature, top_p,
repetition_penalty and chunk_size (Omega, or "inf"). Other Realtime fields (voice, instructions, tools,
...) are accepted and ignored.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from fastapi.responses import JSONResponse

from llama_omni.serve.sessions import SessionSettings, TurnDetection

CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.create",
    "response.cancel",
)


class ProtocolError(ValueError):
    """A client event the server cannot act on; becomes an `error` event."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def parse_event(text: str | bytes) -> dict[str, Any]:
    """One client message -> its JSON object with a known `type`."""
    try:
        event = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"the message is not valid JSON ({err})", "invalid_json") from err
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError(
            'a client event must be a JSON object with a string "type"', "invalid_event", "type"
        )
    if event["type"] not in CLIENT_EVENTS:
        raise ProtocolError(
            f"unknown event type {event['type'][:80]!r}; "
            f"this server accepts {', '.join(CLIENT_EVENTS)}",
            "unknown_event",
            "type",
        )
    return event


def _get(session: dict, path: str) -> Any:
    """session[a][b]... for path "a.b"; None when any part is missing."""
    obj, seen = session, "session"
    for key in path.split("."):
        if not isinstance(obj, dict):
            raise ProtocolError(f"{seen} must be an object", param=seen)
        obj, seen = obj.get(key), f"{seen}.{key}"
        if obj is None:
            return None
    return obj


def _number(value: Any, param: str, kind: type = float) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise ProtocolError(
            f"{param} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
            param=param,
        )
    return kind(value)


def _rate(fmt: Any, param: str) -> int | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
        raise ProtocolError(
            f'{param}: only {{"type": "audio/pcm"}} (16-bit PCM) is supported', param=param
        )
    return None if fmt.get("rate") is None else _number(fmt["rate"], f"{param}.rate", int)


def session_changes(session: Any, current: SessionSettings) -> SessionSettings:
    """A session.update's `session` object applied to the current settings."""
    if not isinstance(session, dict):
        raise ProtocolError('session.update needs a "session" object', param="session")
    changes: dict[str, Any] = {}
    for param in ("temperature", "top_p", "repetition_penalty"):
        if session.get(param) is not None:
            changes[param] = _number(session[param], f"session.{param}")
    if "chunk_size" in session:
        omega = session["chunk_size"]
        changes["chunk_size"] = (
            None if omega in (None, "inf") else _number(omega, "session.chunk_size", int)
        )
    if session.get("max_output_tokens") is not None:
        limit = session["max_output_tokens"]
        changes["max_new_tokens"] = (
            current.max_new_tokens
            if limit == "inf"
            else _number(limit, "session.max_output_tokens", int)
        )
    if session.get("output_modalities") is not None:
        changes["audio"] = _modalities(session["output_modalities"], "session.output_modalities")
    rates = {"input_rate": "audio.input.format", "output_rate": "audio.output.format"}
    for field, path in rates.items():
        rate = _rate(_get(session, path), f"session.{path}")
        if rate is not None:
            changes[field] = rate
    audio_input = _get(session, "audio.input")
    if isinstance(audio_input, dict) and "turn_detection" in audio_input:
        changes["turn_detection"] = _turn_detection(audio_input["turn_detection"])
    try:
        return current.replace(**changes)
    except ValueError as err:
        raise ProtocolError(str(err), param="session") from err


def _modalities(value: Any, param: str) -> bool:
    """output_modalities -> whether to speak. Text is always produced (it drives speech)."""
    if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
        raise ProtocolError(f'{param} must be a non-empty list of "text" / "audio"', param=param)
    return "audio" in value


def _turn_detection(value: Any) -> TurnDetection | None:
    if value is None:
        return None
    param = "session.audio.input.turn_detection"
    if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
        raise ProtocolError(
            f'{param}: only null or {{"type": "server_vad", ...}} are supported', param=param
        )
    fields = {
        "threshold": ("threshold", float),
        "silence_duration_ms": ("silence_ms", int),
        "prefix_padding_ms": ("prefix_padding_ms", int),
    }
    kwargs: dict[str, Any] = {
        name: _number(value[key], f"{param}.{key}", kind)
        for key, (name, kind) in fields.items()
        if value.get(key) is not None
    }
    for flag in ("create_response", "interrupt_response"):
        if value.get(flag) is not None:
            if not isinstance(value[flag], bool):
                raise ProtocolError(
                    f"{param}.{flag} must be true or false", param=f"{param}.{flag}"
                )
            kwargs[flag] = value[flag]
    try:
        return TurnDetection(**kwargs)
    except ValueError as err:
        raise ProtocolError(str(err), param=param) from err


def response_overrides(event: dict, current: SessionSettings) -> SessionSettings:
    """response.create's optional `response` object (max_output_tokens, output_modalities)."""
    response = event.get("response")
    if response is None:
        return current
    if not isinstance(response, dict):
        raise ProtocolError('"response" must be an object', param="response")
    picked = {k: response[k] for k in ("max_output_tokens", "output_modalities") if k in response}
    return session_changes(picked, current)


def session_object(session_id: str, settings: SessionSettings) -> dict[str, Any]:
    """The session as session.created / session.updated report it."""
    vad = settings.turn_detection
    return {
        "id": session_id,
        "object": "realtime.session",
        "type": "realtime",
        "model": "llama-omni",
        "output_modalities": ["audio"] if settings.audio else ["text"],
        "max_output_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,  # null: the model's own
        "chunk_size": "inf" if settings.chunk_size is None else settings.chunk_size,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": settings.input_rate},
                "turn_detection": None
                if vad is None
                else {
                    "type": "server_vad",
                    "threshold": vad.threshold,
                    "silence_duration_ms": vad.silence_ms,
                    "prefix_padding_ms": vad.prefix_padding_ms,
                    "create_response": vad.create_response,
                    "interrupt_response": vad.interrupt_response,
                },
            },
            "output": {"format": {"type": "audio/pcm", "rate": settings.output_rate}},
        },
    }


class EventIds:
    """Unique ids for server events, responses and items of one connection."""

    def __init__(self):
        self._serial = itertools.count(1)

    def __call__(self, prefix: str) -> str:
        return f"{prefix}_{next(self._serial)}"


def error_event(
    event_id: str,
    err: ProtocolError | str,
    code: str = "invalid_value",
    client_event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    message = str(err)
    param = getattr(err, "param", None)
    code = getattr(err, "code", code)
    return {
        "type": "error",
        "event_id": event_id,
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
    }


def http_error(status: int, code: str, message: str) -> JSONResponse:
    """An HTTP error response: {"error": {"code", "message"}}."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
