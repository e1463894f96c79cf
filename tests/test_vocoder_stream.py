"""Chunked vocoding against whole-utterance vocoding, and where chunks are cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_fixtures import one_thread_fixture, tiny_omni_fixture  # noqa: F401 (fixtures)

from llama_omni.inference.events import AudioChunk, Clock, Units
from llama_omni.inference.speech_path import SpeechPath
from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig
from llama_omni.streaming import StreamingModule

UNITS = np.random.default_rng(0).integers(0, 32, 60).tolist()


@pytest.fixture(scope="module")
def sensitive_vocoder() -> UnitVocoder:
    """A random tiny vocoder with amplified convolutions: its output depends strongly on
    about 7 frames of context either side, so missing context shows (seams)."""
    torch.manual_seed(1)
    vocoder = UnitVocoder(VocoderConfig.preset("tiny-test")).eval()
    with torch.no_grad():
        for name, p in vocoder.named_parameters():
            if name.startswith(("conv_pre", "ups", "resblocks")) and p.dim() > 1:
                p.mul_(2.0)
    return vocoder


def chunked(vocoder, options, chunk=10) -> np.ndarray:
    stream = StreamingVocoder(vocoder, options)
    with stream.streaming(1):
        parts = [stream.push(0, UNITS[i : i + chunk]) for i in range(0, len(UNITS), chunk)]
        parts.append(stream.push(0, [], final=True))
    return np.concatenate(parts)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def test_seamless_equals_whole_utterance_when_context_covers_the_receptive_field(sensitive_vocoder):
    whole = sensitive_vocoder.vocode(UNITS)
    wide = chunked(
        sensitive_vocoder, VocoderStreamOptions(left_context_frames=64, lookahead_frames=32)
    )
    np.testing.assert_allclose(wide, whole, atol=1e-5)


def test_default_seamless_is_close_to_whole_and_far_better_than_no_context(sensitive_vocoder):
    whole = sensitive_vocoder.vocode(UNITS)
    default = chunked(sensitive_vocoder, VocoderStreamOptions())
    bare = chunked(
        sensitive_vocoder,
        VocoderStreamOptions(left_context_frames=0, lookahead_frames=0, crossfade_frames=0),
    )
    assert default.shape == bare.shape == whole.shape  # durations are fixed as in one shot
    assert relative_error(default, whole) < 0.01
    assert relative_error(bare, whole) > 0.1  # what the context removes: seams
    for chunk in (3, 25):  # any chunking gives the same durations and nearly the same wave
        assert (
            relative_error(chunked(sensitive_vocoder, VocoderStreamOptions(), chunk), whole) < 0.05
        )


def test_durations_are_fixed_with_full_context(sensitive_vocoder):
    stream = StreamingVocoder(sensitive_vocoder)
    with stream.streaming(2):
        for i in range(0, len(UNITS), 7):
            stream.push(1, UNITS[i : i + 7])
        stream.push(1, [], final=True)
        durations = stream.streaming_state.streams[1].durations
    expected = sensitive_vocoder.predict_durations(torch.tensor([UNITS]))[0].tolist()
    assert durations == expected


def test_independent_mode_vocodes_each_chunk_alone(sensitive_vocoder):
    out = chunked(sensitive_vocoder, VocoderStreamOptions(mode="independent"), chunk=20)
    expected = np.concatenate(
        [sensitive_vocoder.vocode(UNITS[i : i + 20]) for i in range(0, 60, 20)]
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_options_are_validated():
    with pytest.raises(ValueError, match="mode"):
        VocoderStreamOptions(mode="magic")
    with pytest.raises(ValueError, match="crossfade_frames"):
        VocoderStreamOptions(lookahead_frames=1, crossfade_frames=2)


class RecordingVocoder(StreamingModule[list]):
    """Stands in for StreamingVocoder: records which units each push carries."""

    sample_rate = 16000

    def _init_streaming_state(self, batch_size: int) -> list:
        return [[] for _ in range(batch_size)]

    def push(self, index: int, units: list[int], final: bool = False) -> np.ndarray:
        self.streaming_state[index].append((list(units), final))
        return np.ones(len(units), np.float32)


@pytest.mark.parametrize("cut_at_word_ends", [False, True])
def test_chunks_are_cut_at_omega_or_at_word_ends(tiny_omni, cut_at_word_ends):
    decoder = tiny_omni.speech_decoder
    recorder = RecordingVocoder()
    word_starts = [t % 3 == 0 for t in range(20)]  # a word every 3 tokens
    torch.manual_seed(0)
    states = torch.randn(20, 1, decoder.config.input_width)  # [M, B, D]
    events, bounds = [], []  # bounds: unit count before each word-starting token
    path = SpeechPath(
        decoder, recorder, 1, Clock(), chunk_size=5, cut_at_word_ends=cut_at_word_ends
    )
    with path:
        for t in range(20):
            if word_starts[t]:
                bounds.append(len(path.tracks[0].units))
            events += path.step(states[t], [True], [word_starts[t]], [t == 19])
        pushes = recorder.streaming_state[0]
    units = [u for e in events if isinstance(e, Units) for u in e.units]
    assert [u for chunk, _ in pushes for u in chunk] == units
    assert sum(isinstance(e, AudioChunk) for e in events) == len(pushes)
    ends = np.cumsum([len(chunk) for chunk, _ in pushes])
    assert all(len(chunk) >= 5 for chunk, final in pushes if not final)
    if cut_at_word_ends:
        assert all(end in bounds for end, (_, final) in zip(ends, pushes) if not final)
    assert pushes[-1][1] and len(pushes) > 2
