"""The speech path in a child process (EngineOptions.speech_process) against in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_omni.inference.events import AudioChunk, Clock, End, Units
from llama_omni.inference.speech_worker import SpeechWorker, SpeechWorkerError
from llama_omni.inference.vocoder_stream import VocoderStreamOptions
from tests.inference_fixtures import (  # noqa: F401 (fixtures)
    engine,
    one_thread_fixture,
    tiny_omni_fixture,
    tiny_vocoder_fixture,
    tone,
    with_stop_ids,
)


@pytest.mark.parametrize("omega", [5, None])
def test_child_process_gives_the_same_answers_as_in_process(tiny_omni, tiny_vocoder, omega):
    audios = [tone(1.0, 220), tone(0.6, 440, seed=1)]
    first, second = (
        engine(tiny_omni, max_new_tokens=20, speech=False).answer([a])[0].token_ids for a in audios
    )
    # Request 0 stops early on a token request 1 never makes: they end at different steps.
    model = with_stop_ids(tiny_omni, (next(t for t in first[4:] if t not in second),))
    local = engine(model, tiny_vocoder, chunk_size=omega, max_new_tokens=20).answer(audios)
    remote_engine = engine(
        model, tiny_vocoder, chunk_size=omega, max_new_tokens=20, speech_process=True
    )
    events = list(remote_engine.stream(audios))
    remote = engine(
        model, tiny_vocoder, chunk_size=omega, max_new_tokens=20, speech_process=True
    ).answer(audios)  # the worker serves a second batch
    assert len({len(a.token_ids) for a in local}) == 2, "the requests should stop apart"
    for mine, theirs in zip(local, remote):
        assert theirs.token_ids == mine.token_ids
        assert theirs.units == mine.units and len(mine.units) > 10
        assert theirs.end_reason == mine.end_reason
        np.testing.assert_allclose(theirs.audio, mine.audio, atol=1e-5)
    assert [e.ms for e in events] == sorted(e.ms for e in events)
    for request in range(2):
        mine = [e for e in events if e.request == request]
        assert isinstance(mine[-1], End) and sum(isinstance(e, End) for e in mine) == 1
        assert any(isinstance(e, Units) for e in mine) and any(
            isinstance(e, AudioChunk) for e in mine
        )
        assert max(e.ms for e in mine) == mine[-1].ms  # the End comes after all the audio


def test_a_failure_in_the_child_is_reported_and_the_worker_recovers(tiny_omni, tiny_vocoder):
    worker = SpeechWorker(tiny_omni.speech_decoder, tiny_vocoder)
    try:
        width = tiny_omni.config.speech_decoder.input_width
        assert worker.take()
        with (
            pytest.raises(SpeechWorkerError, match="speech worker failed"),
            worker.path(1, Clock(), VocoderStreamOptions(), chunk_size=5) as path,
        ):
            path.step(torch.zeros(1, width + 3), [True], [False], [True])  # wrong width
            list(path.finish())
        assert worker.take()
        with worker.path(1, Clock(), VocoderStreamOptions(), chunk_size=5) as path:
            path.step(torch.randn(1, width), [True], [False], [True])
            events = list(path.finish())
        assert any(isinstance(e, AudioChunk) for e in events)
    finally:
        worker.close()
    assert not worker.alive


def test_a_dead_worker_is_a_clear_error_and_is_replaced(tiny_omni, tiny_vocoder):
    events = engine(tiny_omni, tiny_vocoder, speech_process=True).stream([tone(0.8, 300)])
    next(events)  # the first text delta: the worker has its request
    worker = SpeechWorker.shared(tiny_omni.speech_decoder, tiny_vocoder)
    worker._process.kill()
    with pytest.raises(SpeechWorkerError, match="exited"):
        list(events)
    answer = engine(tiny_omni, tiny_vocoder, speech_process=True).answer([tone(0.8, 300)])[0]
    assert answer.audio_seconds > 0
    assert SpeechWorker.shared(tiny_omni.speech_decoder, tiny_vocoder) is not worker
