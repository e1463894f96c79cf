"""The vocoder's output post-filters (notches, pitch comb): what they do, streamed == whole."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.postfilter import HarmonicNotch, OutputFilter, PitchPostfilter
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


def test_streamed_vocoding_with_the_output_filters_equals_whole_vocoding():
    torch.manual_seed(0)
    config = VocoderConfig.preset("tiny-istft-test").replace(hop_notch_width=250.0,
                                                             pitch_comb_gain=1.0)
    vocoder = UnitVocoder(config).eval()
    units = np.random.default_rng(1).integers(0, config.num_units, 50).tolist()
    whole = vocoder.vocode(units)
    raw = UnitVocoder(config.replace(hop_notch_width=0.0, pitch_comb_gain=0.0)).eval()
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
    notch, comb = vocoder.make_postfilter().stages
    assert len(notch.sos) == 1  # 4 kHz only (8 kHz is the Nyquist frequency)
    assert isinstance(comb, PitchPostfilter)


def voiced_with_noise(f0: float = 150.0, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A buzz of harmonics of f0 up to 4 kHz plus white noise 20 dB below it."""
    t = np.arange(int(RATE * seconds)) / RATE
    buzz = sum(np.sin(2 * np.pi * k * f0 * t) for k in range(1, int(4000 / f0) + 1))
    buzz = buzz / np.sqrt(np.mean(buzz**2))
    noise = np.random.default_rng(seed).normal(scale=0.1, size=len(t))
    return (buzz + noise).astype(np.float32)


def harmonic_to_noise_db(audio: np.ndarray, f0: float) -> float:
    """Energy at the harmonics of f0 over the energy between them, 1-4 kHz, steady part."""
    steady = audio[len(audio) // 2:]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady)))) ** 2
    hz = np.fft.rfftfreq(len(steady), 1 / RATE)
    band = (hz > 1000) & (hz < 4000)
    distance = np.abs(hz / f0 - np.round(hz / f0)) * f0  # Hz to the nearest harmonic
    return 10 * np.log10(spectrum[band & (distance < 10)].sum()
                         / spectrum[band & (distance > 30)].sum())


def test_pitch_comb_finds_the_period_and_lowers_the_noise_between_harmonics():
    comb = PitchPostfilter(RATE, gain=1.0, taps=3)
    audio = voiced_with_noise(150.0)
    lag, gain = comb._pitch(audio[:4000])
    assert abs(lag - RATE / 150.0) <= 1 and gain > 0.5
    gained = harmonic_to_noise_db(comb.apply(audio), 150.0) - harmonic_to_noise_db(audio, 150.0)
    assert gained > 6.0  # three taps: the noise between harmonics falls by more than 6 dB


def test_pitch_comb_leaves_unvoiced_sound_alone():
    comb = PitchPostfilter(RATE, gain=1.0, taps=3, voicing=0.7)
    noise = np.random.default_rng(3).normal(size=RATE).astype(np.float32)
    out = comb.apply(noise)
    assert np.sqrt(np.mean((out - noise) ** 2)) < 0.05 * np.sqrt(np.mean(noise**2))


def test_pitch_comb_chunk_by_chunk_equals_at_once():
    chain = OutputFilter([HarmonicNotch(1000.0, RATE, width_hz=250.0),
                          PitchPostfilter(RATE, gain=1.0, taps=3)])
    audio = voiced_with_noise(210.0, seed=1)
    with chain.streaming(2):
        cuts = [0, 1, 159, 160, 161, 700, 5003, RATE]  # inside, on and across frame edges
        parts = [chain.push(1, audio[a:b]) for a, b in pairwise(cuts)]
    np.testing.assert_allclose(np.concatenate(parts), chain.apply(audio), atol=1e-6)


def test_config_validates_the_pitch_comb():
    for bad in (dict(pitch_comb_gain=1.5), dict(pitch_comb_gain=-0.1),
                dict(pitch_comb_taps=0), dict(pitch_comb_voicing=1.0)):
        with pytest.raises(ValueError, match="pitch_comb"):
            VocoderConfig.preset("tiny-istft-test").replace(**bad)
    assert VocoderConfig.preset("codehifigan-1000").pitch_comb_gain == 0  # published: off
    assert VocoderConfig.preset("istft-256").pitch_comb_gain > 0  # the default voice's vocoder
