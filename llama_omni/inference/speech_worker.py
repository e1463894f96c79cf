"""The speech path in a child process (EngineOptions.speech_process).

With the speech path on the engine's own thread, the speech decoder and the vocoder share
the Python interpreter with the LLM's helper thread: they take turns on the GIL, and a
step that ends a chunk (decoder + vocoder) can outlast an LLM step and hold the loop back.
In a child process the speech path has its own interpreter and core: the decoding loop
only sends each token's states [B, D] (a few kB) and picks up the events when they come.
Results are the same as in-process (tested).

One worker process serves every Engine built on the same speech decoder and vocoder
modules; it starts once (a few seconds: a fresh interpreter imports torch) and lives until
`close()` or the end of the parent. It holds a copy of the weights taken at start, so
modules trained after that are not seen.

Protocol (parent -> child): the (decoder, vocoder) specs once, then ("begin", batch, clock start, path options, vocoder options),
then one ("step", states, alive, word_starts, finals) per token, then ("end",). The
child answers the specs with ("ready",), every step with ("events", [...]) in order, "end" with ("ended",), and a
failure with ("error", traceback) after which it ignores steps until "end".
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar, Self

import torch

from llama_omni.inference.events import Clock, Event
from llama_omni.inference.speech_path import SpeechPath
from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.speech_decoder import SpeechDecoder
from llama_omni.model.vocoder import UnitVocoder


class SpeechWorkerError(RuntimeError):
    """The speech worker process failed or died."""


@dataclass(frozen=True)
class _ModuleSpec:
    """What the child needs to rebuild a module: class, config, CPU weights, device, dtype."""

    cls: type
    config: Any
    state: dict[str, torch.Tensor]
    device: str
    dtype: torch.dtype

    @classmethod
    def of(cls, module: torch.nn.Module) -> _ModuleSpec:
        weight = next(module.parameters())
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return cls(type(module), module.config, state, str(weight.device), weight.dtype)

    def build(self) -> torch.nn.Module:
        module = self.cls(self.config, device="meta")
        module.load_state_dict(self.state, strict=True, assign=True)
        return module.to(device=self.device, dtype=self.dtype).eval()


class SpeechWorker:
    """A child process running SpeechPath for the engines of one decoder + vocoder.

    The child is `python -m llama_omni.inference.speech_worker FD` on one end of a socket
    pair (not multiprocessing's spawn, which would import the parent's __main__ again).
    It starts in the background: `ready` says whether it can take a request yet.
    """

    _shared: ClassVar[dict[tuple[int, int], SpeechWorker]] = {}
    _shared_lock = threading.Lock()

    def __init__(self, decoder: SpeechDecoder, vocoder: UnitVocoder | None, threads: int = 1):
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), str(threads)],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        specs = (_ModuleSpec.of(decoder), _ModuleSpec.of(vocoder) if vocoder else None)
        # The child reads the weights once it has imported torch: send them meanwhile.
        self._sending = threading.Thread(target=self._send_quietly, args=(specs,), daemon=True)
        self._sending.start()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._busy = threading.Lock()  # one request batch at a time

    def _send_quietly(self, specs: tuple) -> None:
        try:  # plain pickle: torch's reducers for multiprocessing would share memory instead
            self._conn.send_bytes(pickle.dumps(specs))
        except OSError:  # the child died: recv() reports it
            pass

    @classmethod
    def shared(cls, decoder: SpeechDecoder, vocoder: UnitVocoder | None) -> SpeechWorker:
        """The worker for these modules, started on first use; closed when they are freed."""
        key = (id(decoder), id(vocoder))
        with cls._shared_lock:
            worker = cls._shared.get(key)
            if worker is None or not worker.alive:
                worker = cls._shared[key] = cls(decoder, vocoder)
                for module in (decoder, vocoder) if vocoder is not None else (decoder,):
                    weakref.finalize(module, cls._forget, key)
            return worker

    @classmethod
    def _forget(cls, key: tuple[int, int]) -> None:
        worker = cls._shared.pop(key, None)
        if worker is not None:
            worker.close()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    @property
    def ready(self) -> bool:
        """Whether the child has built its modules (never blocks)."""
        if not self._ready and self.alive and self._conn.poll():
            self.wait_ready()
        return self._ready

    def close(self) -> None:
        """Stop the child: ask it to quit when ready, else (still starting up) kill it."""
        if self.alive and not (self._ready and self._quit()):
            self._process.kill()
            self._process.wait()
        self._conn.close()

    def _quit(self) -> bool:
        try:
            self._conn.send(("quit",))
            self._process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return True

    def send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as error:
            raise self._exited() from error

    def recv(self) -> tuple:
        try:
            message = self._conn.recv()
        except (EOFError, OSError) as error:
            raise self._exited() from error
        if message[0] == "error":
            raise SpeechWorkerError(f"the speech worker failed:\n{message[1]}")
        return message

    def _exited(self) -> SpeechWorkerError:
        try:
            code = self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        return SpeechWorkerError(
            f"the speech worker process exited (code {code}); "
            "run without speech_process to see the error in this process"
        )

    def wait_ready(self) -> None:
        with self._ready_lock:  # one reader of the "ready" message
            if not self._ready:
                if self.recv()[0] != "ready":
                    raise SpeechWorkerError("the speech worker sent something before 'ready'")
                self._ready = True

    def take(self, wait: bool = True) -> bool:
        """Reserve the worker for one request batch (RemoteSpeechPath releases it).

        With wait=False, returns False at once if the worker is still starting or busy.
        """
        if not wait and not self.ready:
            return False
        if not self._busy.acquire(blocking=wait):
            return False
        try:
            self.wait_ready()
        except BaseException:
            self._busy.release()
            raise
        return True

    def path(
        self,
        batch_size: int,
        clock: Clock,
        vocoder_options: VocoderStreamOptions,
        **path_options: Any,
    ) -> RemoteSpeechPath:
        """A speech path for one batch; call after `take()`."""
        return RemoteSpeechPath(self, batch_size, clock, vocoder_options, path_options)


class RemoteSpeechPath:
    """SpeechPath's place in the decoding loop when the path runs in a SpeechWorker.

    `step` sends the states and returns the events that are already back; `wait(future)`
    yields events while the LLM computes; `finish` waits for all of them. `done_steps`
    counts the steps whose events have all been returned. Events are stamped when they
    arrive here, so stamps stay in order with the engine's own events.
    """

    def __init__(
        self,
        worker: SpeechWorker,
        batch_size: int,
        clock: Clock,
        vocoder_options: VocoderStreamOptions,
        path_options: dict[str, Any],
    ):
        self.worker, self.clock = worker, clock
        self.begin = ("begin", batch_size, clock.start, path_options, vocoder_options)
        self.sent = self.done_steps = 0
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)

    def __enter__(self) -> Self:
        try:
            self.worker.send(self.begin)
        except BaseException:
            self.worker._busy.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.worker.alive:
                self.worker.send(("end",))
                while True:  # drop what is still on its way, up to the acknowledgement
                    try:
                        if self.worker.recv()[0] == "ended":
                            break
                    except SpeechWorkerError:
                        if not self.worker.alive:
                            break
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self.worker._busy.release()

    def step(
        self, states: torch.Tensor, alive: list[bool], word_starts: list[bool], finals: list[bool]
    ) -> list[Event]:
        array = states.detach().float().cpu().numpy()  # [B, D]
        self.worker.send(("step", array, alive, word_starts, finals))
        self.sent += 1
        events: list[Event] = []
        while self.worker._conn.poll():
            events.extend(self._receive())
        return events

    def wait(self, future: Future | Any) -> Generator[Event, None, Any]:
        """Yield events from the worker until `future` is done; return its result."""
        if not isinstance(future, Future):  # a step deferred to this thread (no overlap)
            return future.result()
        future.add_done_callback(lambda _: self._wake_w.send_bytes(b""))
        while not future.done():
            ready = wait([self.worker._conn, self._wake_r])
            if self.worker._conn in ready:
                yield from self._receive()
        self._wake_r.recv_bytes()
        return future.result()

    def finish(self) -> Iterator[Event]:
        while self.done_steps < self.sent:
            yield from self._receive()

    def _receive(self) -> list[Event]:
        kind, events = self.worker.recv()
        if kind != "events":
            raise SpeechWorkerError(f"the speech worker sent {kind!r} where events were due")
        self.done_steps += 1
        now = self.clock.ms()  # stamped on arrival: when this process can pass them on
        return [dataclasses.replace(event, ms=now) for event in events]


def _serve(conn: Connection, threads: int) -> None:
    """The child's loop (module doc: protocol)."""
    torch.set_num_threads(threads)
    try:
        decoder_spec, vocoder_spec = pickle.loads(conn.recv_bytes())
        decoder = decoder_spec.build()
        vocoder = vocoder_spec.build() if vocoder_spec else None
    except Exception:  # noqa: BLE001 (any failure goes to the parent)
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready",))
    path, failed = None, False
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        kind = message[0]
        if kind == "quit":
            return
        if kind == "begin":
            _, batch, start, options, vocoder_options = message
            stream = StreamingVocoder(vocoder, vocoder_options) if vocoder else None
            path = SpeechPath(decoder, stream, batch, Clock(start), **options)
            failed = False
            try:
                path.__enter__()
            except Exception:  # noqa: BLE001 (any failure goes to the parent)
                failed = True
                conn.send(("error", traceback.format_exc()))
        elif kind == "step" and not failed:
            _, states, alive, word_starts, finals = message
            try:
                events = path.step(torch.from_numpy(states), alive, word_starts, finals)
                conn.send(("events", events))
            except Exception:  # noqa: BLE001 (any failure goes to the parent)
                failed = True
                conn.send(("error", traceback.format_exc()))
        elif kind == "end":
            if path is not None:
                path.__exit__(None, None, None)
            path = None
            conn.send(("ended",))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
