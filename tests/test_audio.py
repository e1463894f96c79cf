"""Audio front end: file loading errors, resampling, and whisper-exact log-mel features."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni.audio import (
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel_spectrogram,
    pad_or_trim,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """Real read speech, 16 kHz (Debian pocketsphinx-testdata)."""
    wavs = sorted(LIBRIVOX.glob("*.wav"))
    if not wavs:
        pytest.skip("install Debian pocketsphinx-testdata for real speech")
    return [load_audio(w) for w in wavs[:2]]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_matches_transformers_whisper_feature_extractor(speech, n_mels):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    for audio in speech:
        ref = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        ours = log_mel_spectrogram(pad_or_trim(audio), n_mels=n_mels)
        assert ours.shape == (n_mels, 3000) and ours.dtype == torch.float32
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_an_independent_librosa_port(n_mels):
    """faster-whisper computes librosa's slaney filters its own way: same numbers."""
    feature_extractor = pytest.importorskip("faster_whisper.feature_extractor")
    from llama_omni.audio import _mel_filters

    ref = feature_extractor.FeatureExtractor(feature_size=n_mels).mel_filters  # [M, F]
    np.testing.assert_allclose(_mel_filters(n_mels).numpy(), ref, atol=1e-7, rtol=0)


def test_mel_batch_uses_each_items_own_peak(speech):
    n = min(len(a) for a in speech)
    quiet = speech[1][:n] * 0.01
    batch = log_mel_spectrogram(np.stack([speech[0][:n], quiet]))  # [2, 80, T]
    assert batch.shape == (2, 80, n // 160)
    torch.testing.assert_close(batch[0], log_mel_spectrogram(speech[0][:n]))
    torch.testing.assert_close(batch[1], log_mel_spectrogram(quiet))


def test_mel_is_float32_whatever_the_input_dtype_and_padding_appends(speech):
    audio = speech[0][:16000]
    from_f64 = log_mel_spectrogram(audio.astype(np.float64), padding=800)
    from_torch = log_mel_spectrogram(torch.from_numpy(np.pad(audio, (0, 800))))
    assert from_f64.dtype == torch.float32 and from_f64.shape == (80, 105)
    torch.testing.assert_close(from_f64, from_torch)


def test_mel_of_too_short_audio_says_what_to_do():
    with pytest.raises(ValueError, match="pad_or_trim"):
        log_mel_spectrogram(np.zeros(100, dtype=np.float32))


def test_pad_or_trim_numpy_and_torch():
    x = np.ones((2, 5), dtype=np.float32)
    assert pad_or_trim(x, 8).shape == (2, 8) and pad_or_trim(x, 8)[:, 5:].sum() == 0
    assert pad_or_trim(x, 3).shape == (2, 3)
    t = torch.ones(5)
    assert pad_or_trim(t, 8).tolist() == [1] * 5 + [0] * 3
    assert pad_or_trim(t, 2).shape == (2,)
    assert pad_or_trim(np.zeros(10)).shape == (N_SAMPLES,)


def test_load_audio_reads_paths_and_bytes(tmp_path, speech):
    path = tmp_path / "a.flac"
    sf.write(path, speech[0], SAMPLE_RATE)
    from_path = load_audio(path)
    assert from_path.dtype == np.float32 and from_path.shape == speech[0].shape
    np.testing.assert_allclose(from_path, speech[0], atol=1e-4)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)


def test_load_audio_resamples_and_downmixes_44k1_stereo(tmp_path):
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone, np.zeros_like(tone)], axis=1), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.ndim == 1 and len(audio) == int(seconds * SAMPLE_RATE)
    middle = audio[4000:-4000]  # away from the resampling filter's edges
    assert abs(np.abs(middle).max() - 0.25) < 0.01  # the average of the two channels


def test_load_audio_of_espeak_speech_at_22k05(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello world"], check=True)
    samples, rate = sf.read(path)
    audio = load_audio(path)
    assert rate != SAMPLE_RATE and abs(len(audio) - len(samples) * SAMPLE_RATE / rate) <= 1
    assert np.abs(audio).max() > 0.05


def test_load_audio_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(missing)


def test_load_audio_rejects_bytes_that_are_not_audio(tmp_path):
    with pytest.raises(AudioError, match="not audio.*WAV, FLAC"):
        load_audio(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "notes.wav"
    text.write_text("this is not a sound file\n")
    with pytest.raises(AudioError, match="notes.wav is not audio"):
        load_audio(text)


def test_load_audio_rejects_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(path)
