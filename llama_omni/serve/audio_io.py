"""Audio in and out of the server: uploaded files, base64 PCM16, streaming resampling.

Uploads: WAV, FLAC, OGG and MP3 are read by libsndfile (`llama_omni.audio.load_audio`);
anything else (WebM/Opus from browsers' MediaRecorder, M4A, ...) goes through an
`ffmpeg` subprocess, bounded in time and in decoded length. Every refusal is an
`AudioError` whose message says what was wrong and what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import shutil
import struct
import subprocess

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from llama_omni.audio import SAMPLE_RATE, AudioError, load_audio

MIN_RATE = 8000  # below this a file cannot hold intelligible speech
MIN_SECONDS = 0.1  # shorter input gives the speech encoder nothing to work with
STREAM_RATES = (16000, 24000)  # PCM rates a realtime session may choose
FFMPEG_TIMEOUT_S = 30


def decode_upload(data: bytes, max_seconds: float) -> np.ndarray:
    """Encoded audio bytes -> float32 mono at 16 kHz, at most `max_seconds` long."""
    if not data:
        raise AudioError("the upload is empty: send a sound file (WAV, FLAC, OGG, MP3 or WebM)")
    try:
        info = sf.info(io.BytesIO(data))
    except sf.SoundFileError:
        return check_length(_ffmpeg_decode(data, max_seconds), max_seconds)
    if info.samplerate < MIN_RATE:
        raise AudioError(
            f"the file's sample rate is {info.samplerate} Hz; speech needs at least {MIN_RATE} Hz"
        )
    if info.duration > max_seconds:
        raise AudioError(
            f"the audio lasts {info.duration:.1f} s; this server accepts at most {max_seconds:g} s"
        )
    if info.format == "WAV":
        _check_wav_complete(data)
    return check_length(load_audio(data), max_seconds)


def check_length(audio: np.ndarray, max_seconds: float) -> np.ndarray:
    """`audio` (16 kHz) if it lasts between MIN_SECONDS and `max_seconds`, else AudioError."""
    if audio.size < MIN_SECONDS * SAMPLE_RATE:
        raise AudioError(
            f"the audio lasts {audio.size / SAMPLE_RATE:.2f} s; "
            f"ask a question of at least {MIN_SECONDS:g} s"
        )
    if audio.size > max_seconds * SAMPLE_RATE:
        raise AudioError(
            f"the audio lasts longer than {max_seconds:g} s, the most this server accepts"
        )
    return audio


def _check_wav_complete(data: bytes) -> None:
    """Refuse a WAV whose data chunk is shorter than its header says (a cut-off upload).

    Streaming writers leave the size as 0 or 0xFFFFFFFF; those are accepted.
    """
    offset = 12  # past "RIFF", the RIFF size, "WAVE"
    while offset + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, offset)
        if chunk == b"data":
            present = len(data) - offset - 8
            if 0 < size < 0xFFFFFFFF and present < size:
                raise AudioError(
                    f"the WAV file is truncated: its header announces {size} bytes of audio "
                    f"but only {present} arrived; send the whole file"
                )
            return
        offset += 8 + size + (size & 1)


def _ffmpeg_decode(data: bytes, max_seconds: float) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            "the upload is not WAV, FLAC, OGG or MP3, and decoding other formats (WebM, M4A) "
            "needs ffmpeg, which is not installed on the server (apt-get install ffmpeg)"
        )
    command = [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-i",
        "pipe:0",
        # Decode a little past the limit so that too-long input is seen, not cut silently.
        "-t",
        f"{max_seconds + 1:g}",
        "-vn",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "-f",
        "f32le",
        "pipe:1",
    ]
    try:
        done = subprocess.run(
            command, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise AudioError(f"decoding the upload took longer than {FFMPEG_TIMEOUT_S} s") from err
    if done.returncode != 0 or not done.stdout:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        reason = reason[-1].removeprefix("pipe:0: ") if reason else "ffmpeg found no audio stream"
        raise AudioError(
            f"the upload is not a readable sound file (WAV, FLAC, OGG, MP3 or WebM): {reason}"
        )
    return np.frombuffer(done.stdout, dtype="<f4").astype(np.float32)


def pcm16_decode(text: str, what: str = "audio") -> np.ndarray:
    """Base64 little-endian PCM16 -> float32 in [-1, 1]."""
    if not isinstance(text, str):
        raise AudioError(f"{what} must be a base64 string of 16-bit PCM samples")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise AudioError(f"{what} is not valid base64 ({err})") from err
    if len(raw) % 2:
        raise AudioError(f"{what} holds {len(raw)} bytes: 16-bit PCM needs an even count")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def pcm16_encode(audio: np.ndarray) -> str:
    """float32 samples -> base64 little-endian PCM16 (the inverse of pcm16_decode, clipped)."""
    samples = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    return base64.b64encode(samples.tobytes()).decode("ascii")


class StreamResampler:
    """Resamples audio that arrives in pieces, with the same result as resampling it whole.

    `resample_poly`'s filter reaches `margin` input samples either side, so each push
    recomputes over a window holding `margin` already-used samples on the left and
    holds back its last `margin` samples until more input (or `flush`) arrives.
    """

    def __init__(self, rate_in: int, rate_out: int, margin: int = 64):
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.margin = math.ceil(margin / self.down) * self.down  # keeps the window phase-aligned
        self._buffer = np.zeros(0, dtype=np.float32)
        self._start = 0  # absolute input index of _buffer[0], a multiple of `down`
        self._emitted = 0  # absolute output samples returned so far

    def push(self, audio: np.ndarray) -> np.ndarray:
        self._buffer = np.concatenate([self._buffer, audio.astype(np.float32, copy=False)])
        return self._emit(len(self._buffer) - self.margin, final=False)

    def flush(self) -> np.ndarray:
        """The rest of the output; the resampler is then ready for a new stream."""
        out = self._emit(len(self._buffer), final=True)
        self._buffer, self._start, self._emitted = np.zeros(0, dtype=np.float32), 0, 0
        return out

    def _emit(self, ready: int, final: bool) -> np.ndarray:
        """The outputs whose inputs up to buffer index `ready` are final."""
        ready = max(ready, 0)
        if self.up == self.down:
            out, self._buffer = self._buffer[:ready], self._buffer[ready:]
            return out
        out_start = self._start * self.up // self.down
        end = (self._start + ready) * self.up // self.down  # absolute output index
        if final:  # resample_poly's own length for the whole input
            end = out_start + math.ceil(len(self._buffer) * self.up / self.down)
        if end <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        full = resample_poly(self._buffer, self.up, self.down).astype(np.float32)
        out = full[self._emitted - out_start : end - out_start]
        self._emitted = end
        # Keep `margin` inputs before the next output's position as its left context.
        drop = max(0, (end * self.down // self.up - self.margin) - self._start)
        drop -= drop % self.down
        self._buffer, self._start = self._buffer[drop:], self._start + drop
        return out
