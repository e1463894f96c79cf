"""The iSTFT vocoder's notch post-filter: what it removes, and streamed == whole."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.postfilter import HarmonicNotch
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig

RATE = 16000


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(int(RATE * seconds)) / RATE).astype(np.float32)


def level_db(audio: np.ndarray) -> float:
    steady = audio[len(audio) // 2:]  # after the filter has settled
    return 10 * np.log10(np.mean(steady**2))


def test_notches_remove_the_frame_rate_harmonics_and_keep_what_lies_between():
    notch = HarmonicNotch(1000.0, RATE, width_hz=250.0)
    assert len(notch.sos) == 7  # 1, 2, ..., 7 kHz (8 kHz is the Nyquist frequency)
    for hz in (1000, 3000, 7000):
        assert level_db(notch.apply(tone(hz))) - level_db(tone(hz)) < -40
    for hz in (1500, 2500, 4500, 6500):  # halfway between two notches
        assert abs(level_db(notch.apply(tone(hz))) - level_db(tone(hz))) < 1.0
    with pytest.raises(ValueError, match="base_hz"):
        HarmonicNotch(9000.0, RATE, width_hz=250.0)


def test_filtering_chunk_by_chunk_equals_filtering_at_once():
    notch = HarmonicNotch(1000.0, RATE, width_hz=250.0)
    audio = np.random.default_rng(0).normal(size=RATE).astype(np.float32)
    with notch.streaming(2):
        cuts = [0, 1, 17, 320, 5000, RATE]
        parts = [notch.push(1, audio[a:b]) for a, b in pairwise(cuts)]
    np.testing.assert_allclose(np.concatenate(parts), notch.apply(audio), atol=1e-6)


def test_config_validates_the_notch():
    with pytest.raises(ValueError, match="hop_notch_width"):
        VocoderConfig.preset("tiny-test").replace(hop_notch_width=250.0)  # no iSTFT head
    with pytest.raises(ValueError, match="hop_notch_width"):
        VocoderConfig.preset("tiny-istft-test").replace(hop_notch_width=-1.0)
    assert VocoderConfig.preset("istft-256").hop_notch_width > 0  # the default voice's vocoder


def test_streamed_vocoding_with_the_notch_equals_whole_vocoding():
    torch.manual_seed(0)
    config = VocoderConfig.preset("tiny-istft-test").replace(hop_notch_width=250.0)
    vocoder = UnitVocoder(config).eval()
    units = np.random.default_rng(1).integers(0, config.num_units, 50).tolist()
    whole = vocoder.vocode(units)
    raw = UnitVocoder(config.replace(hop_notch_width=0.0)).eval()
    raw.load_state_dict(vocoder.state_dict())
    assert np.abs(whole - raw.vocode(units)).max() > 1e-4  # the filter is on
    stream = StreamingVocoder(vocoder, VocoderStreamOptions(left_context_frames=64,
                                                           lookahead_frames=32))
    with stream.streaming(1):
        parts = [stream.push(0, units[i:i + 10]) for i in range(0, len(units), 10)]
        parts.append(stream.push(0, [], final=True))
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


def test_hop4_preset_keeps_20ms_unit_frames_and_notches_its_4khz_tone():
    config = VocoderConfig.preset("istft-hop4")
    assert config.hop_length == 320  # one unit frame = 20 ms at 16 kHz, like istft-256
    vocoder = UnitVocoder(config.replace(num_units=20)).eval()
    wave = vocoder.vocode(np.arange(5), np.full(5, 2))
    assert wave.shape == (10 * 320,)
    assert len(vocoder.make_postfilter().sos) == 1  # 4 kHz only (8 kHz is the Nyquist frequency)
