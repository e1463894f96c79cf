"""One model worker thread that answers the turns of every session, batched.

Sessions submit `Job`s into a bounded queue (full: `QueueFull`, which clients see as
"server busy"). The worker takes the oldest job plus every queued job with the same
decoding options (up to max_batch) and decodes them as one batch in the engine; jobs
that arrive meanwhile form the next batch. The engine cannot add rows to a running
batch, so the worker waits up to `gather_ms` after a job's arrival for others: the
sessions of one batch all finish together and send their next turns moments apart.
Events go to each job's `emit` callback from the worker thread. A cancelled job gets no
more events; its row stops costing anything once the whole batch is cancelled (a batch
is not split mid-answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from llama_omni.inference.engine import Decoded, Engine, EngineOptions
from llama_omni.inference.events import AudioChunk, Clock, End, TextDelta, Units
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder
from llama_omni.serve.kvcache import CacheSlot, build_batch, split_row
from llama_omni.serve.sessions import History

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The scheduler's queue holds its maximum of waiting turns."""


@dataclass(frozen=True)
class Failure:
    """A job that could not be answered: `code` is machine-readable, `message` for people."""

    code: str
    message: str


JobEvent = TextDelta | Units | AudioChunk | End | Failure


@dataclass
class Job:
    """One turn to answer. `t_end`: perf_counter() time the user's audio ended."""

    audio: np.ndarray  # [T] float32 at 16 kHz
    history: History
    options: EngineOptions
    emit: Callable[[JobEvent], None]
    t_end: float = field(default_factory=time.perf_counter)
    submitted: float = 0.0  # perf_counter() time it entered the queue
    speech: torch.Tensor | None = None  # [N, D] set once encoded (for the session's history)
    cache_slot: CacheSlot = field(default_factory=CacheSlot)  # set once the batch is decoded
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(
        self,
        model: OmniModel,
        vocoder: UnitVocoder | None,
        max_queue: int = 32,
        max_batch: int = 8,
        gather_ms: float = 50.0,
    ):
        self.model = model
        self.vocoder = vocoder
        self.max_queue, self.max_batch, self.gather_s = max_queue, max_batch, gather_ms / 1000
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._engines: OrderedDict[EngineOptions, Engine] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.active = 0  # jobs in the batch being decoded
        self.batches = 0
        self.batched_jobs = 0
        self.positions_reused = 0  # prompt positions found in the sessions' caches
        self.positions_fed = 0  # prompt positions computed

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            for job in self._pending:
                job.cancel()
            self._pending.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- submitting --------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> Job:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._pending)} turns are waiting; try again shortly"
                )
            job.submitted = time.perf_counter()
            self._pending.append(job)
            self._wake.notify()
        return job

    # -- the worker --------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait()
            deadline = self._pending[0].submitted + self.gather_s if self._pending else 0
            while len(self._pending) < self.max_batch and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.wait(left)
            if self._stopping:
                return None
            head = self._pending.popleft()
            batch = [head]
            for job in list(self._pending):
                if len(batch) == self.max_batch:
                    break
                if job.options == head.options:
                    self._pending.remove(job)
                    batch.append(job)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.active = len(batch)
            try:
                self._decode([job for job in batch if not job.cancelled.is_set()])
            except Exception as err:  # a bug must not kill the worker: fail the batch, go on
                log.exception("decoding a batch failed")
                for job in batch:
                    job.emit(
                        Failure("server_error", f"decoding failed: {type(err).__name__}: {err}")
                    )
            finally:
                self.active = 0

    def _engine(self, options: EngineOptions) -> Engine:
        engine = self._engines.pop(options, None) or Engine(self.model, self.vocoder, options)
        self._engines[options] = engine  # most recently used last
        while len(self._engines) > 8:
            self._engines.popitem(last=False)
        return engine

    def _decode(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        engine = self._engine(jobs[0].options)
        prompts, ready = [], []
        for job in jobs:  # one at a time, so that a bad input fails only its own job
            try:
                job.speech = engine.encode([job.audio])[0]
                prompts.append(
                    job.history.request(self.model, job.speech, job.options.max_new_tokens)
                )
                ready.append(job)
            except ValueError as err:  # AudioError, or the front end refusing a too-short input
                job.emit(Failure("invalid_audio", str(err)))
        if not ready:
            return
        self.batches += 1
        self.batched_jobs += len(ready)
        with torch.inference_mode():
            batch = build_batch(
                self.model.llm,
                [r for r, _ in prompts],
                [k for _, k in prompts],
                [job.history.cache for job in ready],
            )
        self.positions_reused += sum(batch.reused)
        self.positions_fed += sum(len(k) for k in batch.keys) - sum(batch.reused)
        events = engine.decode(
            batch.embeds, batch.attention_mask, batch.positions, Clock(), batch.cache
        )
        decoded = self._route(events, ready)
        if decoded is not None:
            with torch.inference_mode():
                for row, job in enumerate(ready):
                    job.cache_slot.value = split_row(decoded, batch, row)

    @staticmethod
    def _route(events: Generator[JobEvent, None, Decoded], jobs: list[Job]) -> Decoded | None:
        """Hand each event to its job; the decoding's result, or None if all were cancelled."""
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as finished:
                    return finished.value
                job = jobs[event.request]
                if not job.cancelled.is_set():
                    job.emit(event)
                if all(j.cancelled.is_set() for j in jobs):
                    return None
        finally:
            events.close()
