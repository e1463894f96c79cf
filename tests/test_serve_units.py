"""Serving parts on their own: streaming resampler, PCM16, uploads, batching scheduler, CLI."""

import io
import queue
import shutil

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly
from serve_fixtures import (  # noqa: F401 (fixtures)
    one_thread_fixture,
    serve_model_fixture,
    serve_vocoder_fixture,
    tone,
)

from llama_omni.audio import AudioError
from llama_omni.inference.engine import Engine, EngineOptions
from llama_omni.inference.events import Answer, End, TextDelta
from llama_omni.serve.audio_io import StreamResampler, decode_upload, pcm16_decode, pcm16_encode
from llama_omni.serve.scheduler import Failure, Job, QueueFull, Scheduler
from llama_omni.serve.sessions import History


@pytest.mark.parametrize("rates", [(16000, 24000), (24000, 16000), (16000, 16000)])
def test_stream_resampler_equals_one_shot(rates):
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(12345).astype(np.float32)
    resampler = StreamResampler(*rates)
    cuts = np.sort(rng.integers(0, audio.size, size=30))
    pieces = [resampler.push(p) for p in np.split(audio, cuts)] + [resampler.flush()]
    g = np.gcd(*rates)
    whole = resample_poly(audio, rates[1] // g, rates[0] // g)
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)
    again = np.concatenate([resampler.push(audio), resampler.flush()])  # reusable after a flush
    np.testing.assert_allclose(again, whole, atol=1e-6)


def test_pcm16_round_trip():
    audio = np.linspace(-1, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(pcm16_decode(pcm16_encode(audio)), audio, atol=1 / 32768)  # +1 clips


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3", "WEBM"])
def test_uploads_in_each_format(fmt, tmp_path):
    rate = 44100 if fmt == "MP3" else 48000
    question = (0.5 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)  # 1 s
    if fmt == "WEBM":
        if shutil.which("ffmpeg") is None:
            pytest.skip("ffmpeg is not installed")
        import subprocess

        sf.write(tmp_path / "q.wav", question, rate)
        subprocess.run(
            [
                "ffmpeg",
                "-loglevel",
                "error",
                "-i",
                str(tmp_path / "q.wav"),
                "-c:a",
                "libopus",
                str(tmp_path / "q.webm"),
            ],
            check=True,
        )
        data = (tmp_path / "q.webm").read_bytes()
    else:
        out = io.BytesIO()
        sf.write(out, np.stack([question, question], 1), rate, format=fmt)
        data = out.getvalue()
    audio = decode_upload(data, 30)
    assert abs(audio.size - 16000) < 1600 and audio.dtype == np.float32  # codecs pad a little
    assert 0.3 < np.abs(audio).max() < 0.7


def test_upload_over_the_length_limit_is_refused():
    out = io.BytesIO()
    sf.write(out, tone(3.0), 16000, format="FLAC")
    with pytest.raises(AudioError, match="at most 2 s"):
        decode_upload(out.getvalue(), 2)


def _job(audio, options, history=None):
    events = queue.Queue()
    return Job(audio, history or History(4), options, emit=events.put), events


def _drain(events):
    out = []
    while not out or not isinstance(out[-1], (End, Failure)):
        out.append(events.get(timeout=60))
    return out


def test_turns_of_different_sessions_share_a_batch_and_match_solo_answers(
    serve_model, serve_vocoder
):
    options = EngineOptions(max_new_tokens=6, chunk_size=4)
    solo = [
        a.text
        for a in Engine(serve_model, serve_vocoder, options).answer(
            [tone(1.0, hz) for hz in (200, 300)]
        )
    ]
    scheduler = Scheduler(serve_model, serve_vocoder, max_batch=4)
    jobs = [_job(tone(1.0, hz), options) for hz in (200, 300)]
    for job, _ in jobs:
        scheduler.submit(job)
    scheduler.start()  # both are queued before the worker looks: one batch
    try:
        answers = [Answer() for _ in jobs]
        for answer, (_, events) in zip(answers, jobs, strict=True):
            for event in _drain(events):
                answer.add(event)
    finally:
        scheduler.stop()
    assert scheduler.batches == 1 and scheduler.batched_jobs == 2
    assert [a.text for a in answers] == solo
    assert all(job.speech is not None for job, _ in jobs)


def test_bad_turn_fails_alone_and_queue_is_bounded(serve_model):
    scheduler = Scheduler(serve_model, None, max_queue=2)
    options = EngineOptions(max_new_tokens=3, speech=False)
    good, good_events = _job(tone(), options)
    bad, bad_events = _job(np.zeros(50, np.float32), options)
    scheduler.submit(bad)
    scheduler.submit(good)
    with pytest.raises(QueueFull, match="busy"):
        scheduler.submit(_job(tone(), options)[0])
    scheduler.start()
    try:
        assert isinstance(_drain(bad_events)[-1], Failure)
        good_out = _drain(good_events)
    finally:
        scheduler.stop()
    assert isinstance(good_out[-1], End) and any(isinstance(e, TextDelta) for e in good_out)


def test_cli_help_lists_serve_and_gradio():
    from typer.testing import CliRunner

    from llama_omni.cli.main import app

    runner = CliRunner()
    for command, words in (
        ("serve", ["--host", "--api-key", "--max-sessions"]),
        ("gradio", ["--port"]),
    ):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and all(w in result.output for w in words), result.output


def test_batched_multi_turn_with_session_caches_matches_conversations(serve_model, serve_vocoder):
    """Two sessions, two turns each, decoded together with their caches reused, give the
    answers that each conversation gives alone (inference/session.py, greedy)."""
    from llama_omni.inference.session import Conversation

    options = EngineOptions(max_new_tokens=5, chunk_size=3)
    questions = [[tone(0.6, 200), tone(0.8, 500)], [tone(0.7, 300), tone(0.5, 700)]]
    alone = []
    for turns in questions:
        conversation = Conversation(Engine(serve_model, serve_vocoder, options))
        answers = []
        for audio in turns:
            answer = Answer()
            for event in conversation.ask(audio):
                answer.add(event)
            answers.append(answer.text)
        alone.append(answers)
    scheduler = Scheduler(serve_model, serve_vocoder, max_batch=2)
    histories = [History(4), History(4)]
    together = [[], []]
    scheduler.start()
    try:
        for turn in range(2):
            jobs = [_job(questions[s][turn], options, histories[s]) for s in range(2)]
            for job, _ in jobs:
                scheduler.submit(job)
            for s, (job, events) in enumerate(jobs):
                answer = Answer()
                for event in _drain(events):
                    answer.add(event)
                together[s].append(answer.text)
                histories[s].add(job.speech, answer.text, job.cache_slot)
    finally:
        scheduler.stop()
    assert together == alone
    assert scheduler.batched_jobs == 4
    assert scheduler.positions_reused > scheduler.positions_fed / 2  # turn 2 reused turn 1
    cache = histories[0].cache
    assert cache is not None and len(cache.keys) == cache.layers[0][0].shape[1]
