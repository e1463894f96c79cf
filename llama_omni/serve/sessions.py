"""Per-session state (settings, input buffer, multi-turn history) and the server's limits.

A session is one WebSocket connection (or one HTTP request). Its history keeps, per
finished exchange, the user's speech embeddings and the answer text, plus the LLM cache
of the conversation (kvcache.py). Each new turn's prompt is rebuilt from the
exchanges, and only the part the cache does not hold is fed to the model. When the
prompt would not fit the context with max_new_tokens, the oldest exchanges are left
out of it (the cache then keeps only what still matches: the system prompt).
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from llama_omni.audio import SAMPLE_RATE, AudioError
from llama_omni.configbase import require
from llama_omni.inference.engine import EngineOptions, Request
from llama_omni.inference.sampling import SamplingOptions
from llama_omni.inference.session import PositionKey, position_keys, prompt_length
from llama_omni.model.omni import OmniModel
from llama_omni.model.prompt import Turn
from llama_omni.serve.audio_io import STREAM_RATES, StreamResampler, check_length
from llama_omni.serve.kvcache import CacheSlot, SessionCache


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server. Refusals are errors, never crashes."""

    max_sessions: int = 16
    max_upload_bytes: int = 10 * 2**20
    max_audio_seconds: float = 30.0  # also capped by the speech encoder's context
    max_message_bytes: int = 2 * 2**20  # one WebSocket message
    max_new_tokens: int = 1024
    max_history: int = 16  # exchanges kept per session
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_upload_bytes", "max_message_bytes", "max_new_tokens"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1")
        require(self.max_audio_seconds > 0, "max_audio_seconds must be > 0")
        require(self.max_history >= 0, "max_history must be >= 0")


@dataclass(frozen=True)
class TurnDetection:
    """Server-side end-of-turn detection (the Realtime API's "server_vad")."""

    threshold: float = 0.5  # speech probability that starts speech
    silence_ms: int = 500  # silence that ends the turn
    prefix_padding_ms: int = 300  # audio kept before the detected start
    create_response: bool = True  # answer as soon as the turn ends
    interrupt_response: bool = True  # barge-in: speech cancels the answer being given

    def __post_init__(self) -> None:
        require(0 < self.threshold < 1, f"threshold must lie in (0, 1), got {self.threshold}")
        require(
            32 <= self.silence_ms <= 10000,
            f"silence_duration_ms must lie in [32, 10000], got {self.silence_ms}",
        )
        require(
            0 <= self.prefix_padding_ms <= 5000,
            f"prefix_padding_ms must lie in [0, 5000], got {self.prefix_padding_ms}",
        )


@dataclass(frozen=True)
class SessionSettings:
    """What a client can change with session.update; defaults are the paper demo's."""

    input_rate: int = SAMPLE_RATE
    output_rate: int = SAMPLE_RATE
    temperature: float = 0.0
    top_p: float = 0.7
    repetition_penalty: float | None = None  # None: the model's own
    max_new_tokens: int = 512
    chunk_size: int | None = 40  # Omega; None vocodes once at the end
    audio: bool = True  # False: text (and no speech decoding)
    turn_detection: TurnDetection | None = None  # None: the client commits turns itself

    def __post_init__(self) -> None:
        for name in ("input_rate", "output_rate"):
            rate = getattr(self, name)
            require(rate in STREAM_RATES, f"{name} {rate} Hz: choose one of {STREAM_RATES}")
        self.engine_options()  # validates the sampling options, max_new_tokens, chunk_size

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            sampling=SamplingOptions(
                self.temperature, self.top_p, repetition_penalty=self.repetition_penalty
            ),
            max_new_tokens=self.max_new_tokens,
            chunk_size=self.chunk_size,
            speech=self.audio,
        )

    def replace(self, **changes) -> SessionSettings:
        return replace(self, **changes)


@dataclass
class Exchange:
    uid: int  # names the speech positions in cache keys
    speech: torch.Tensor  # [N, D] the user's speech embeddings
    answer: str


@dataclass
class History:
    """The finished exchanges of one session, newest last, at most `limit` of them.

    Only the session's own turn touches it: the worker reads it while the turn is
    decoded, the session adds the exchange when the answer is complete.
    """

    limit: int
    exchanges: list[Exchange] = field(default_factory=list)
    next_uid: int = 0
    _cache: SessionCache | None = None
    _slot: CacheSlot | None = None  # the last turn's cache, filled when its batch ends

    def add(self, speech: torch.Tensor, answer: str, slot: CacheSlot | None = None) -> None:
        """Record a finished turn; `slot` receives its cache (the turn's Job.cache_slot)."""
        self.exchanges.append(Exchange(self.next_uid, speech, answer))
        del self.exchanges[: max(0, len(self.exchanges) - self.limit)]
        self.next_uid += 1
        self._slot = slot

    @property
    def cache(self) -> SessionCache | None:
        """The newest cache of this conversation (a cache of an earlier turn is still a
        valid prefix when the last one is not there)."""
        if self._slot is not None and self._slot.value is not None:
            self._cache, self._slot = self._slot.value, None
        return self._cache

    def request(
        self, model: OmniModel, speech: torch.Tensor, max_new_tokens: int
    ) -> tuple[Request, list[PositionKey]]:
        """The prompt for a new turn (as many recent exchanges as fit the context) and
        what each of its positions holds."""
        context = model.llm.model.config.get_text_config().max_position_embeddings
        kept = list(self.exchanges)
        while True:
            turns = [t for e in kept for t in (Turn.user(), Turn.assistant(e.answer))]
            ids = model.prompt_ids(turns + [Turn.user()])
            segments = [e.speech for e in kept] + [speech]
            length = prompt_length(ids, segments)
            if length + max_new_tokens <= context:
                uids = [e.uid for e in kept] + [self.next_uid]
                return Request(ids, segments), position_keys(ids, uids, segments)
            if not kept:
                raise AudioError(
                    f"this turn needs {length} prompt positions + max_new_tokens {max_new_tokens}, "
                    f"more than the model's context {context}; send shorter audio"
                )
            kept.pop(0)


class InputBuffer:
    """Audio appended by the client, kept at 16 kHz, bounded in length."""

    def __init__(self, rate: int, max_seconds: float):
        self.rate = rate
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self._resampler = StreamResampler(rate, SAMPLE_RATE)
        self._chunks: list[np.ndarray] = []
        self.samples = 0  # at 16 kHz

    def append(self, audio: np.ndarray) -> np.ndarray:
        """Add input audio at the session rate; returns the new 16 kHz samples."""
        if (self.samples + len(audio) * SAMPLE_RATE / self.rate) > self.max_samples:
            raise AudioError(
                f"the input audio buffer would exceed {self.max_samples / SAMPLE_RATE:g} s; "
                "commit (or clear) it before appending more"
            )
        new = self._resampler.push(audio)
        self._chunks.append(new)
        self.samples += len(new)
        return new

    def take(self, start: int = 0) -> np.ndarray:
        """Everything buffered from 16 kHz sample `start` on; the buffer is then empty."""
        self._chunks.append(self._resampler.flush())
        audio = np.concatenate(self._chunks)[start:]
        self.clear()
        return audio

    def drop_before(self, keep: int) -> int:
        """Forget all but the last `keep` samples (leading silence); returns how many went."""
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        gone = max(0, len(audio) - keep)
        self._chunks, self.samples = [audio[gone:]], len(audio) - gone
        return gone

    def clear(self) -> None:
        self._resampler.flush()
        self._chunks, self.samples = [], 0


class Session:
    """One client's state. `pending` is committed audio not answered yet (16 kHz)."""

    def __init__(
        self, session_id: str, limits: ServerLimits, settings: SessionSettings | None = None
    ):
        self.id = session_id
        self.limits = limits
        self.settings = settings or SessionSettings()
        self.history = History(limits.max_history)
        self.buffer = InputBuffer(self.settings.input_rate, limits.max_audio_seconds)
        self.pending: np.ndarray | None = None

    def update(self, settings: SessionSettings) -> None:
        require(
            settings.max_new_tokens <= self.limits.max_new_tokens,
            f"max_output_tokens {settings.max_new_tokens} exceeds this server's limit "
            f"{self.limits.max_new_tokens}",
        )
        if settings.input_rate != self.settings.input_rate:
            self.buffer = InputBuffer(settings.input_rate, self.limits.max_audio_seconds)
        self.settings = settings

    def commit(self) -> np.ndarray:
        """Move the input buffer into the pending user turn; returns the committed audio."""
        audio = self.buffer.take()
        if audio.size == 0:
            raise AudioError("the input audio buffer is empty: append audio before committing")
        return self.add_turn(audio)

    def add_turn(self, audio: np.ndarray) -> np.ndarray:
        """Add 16 kHz audio to the pending user turn (commits before an answer join up)."""
        turn = audio if self.pending is None else np.concatenate([self.pending, audio])
        self.pending = check_length(turn, self.limits.max_audio_seconds)
        return audio


class SessionRegistry:
    """The open sessions, at most limits.max_sessions of them."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self._serial = itertools.count(1)

    def open(self) -> Session:
        if len(self.sessions) >= self.limits.max_sessions:
            raise SessionLimit(
                f"the server already has {len(self.sessions)} sessions open (its limit); "
                "try again later"
            )
        session_id = f"sess_{next(self._serial)}_{secrets.token_hex(4)}"
        session = self.sessions[session_id] = Session(session_id, self.limits)
        return session

    def close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)


class SessionLimit(RuntimeError):
    """No room for another session."""
