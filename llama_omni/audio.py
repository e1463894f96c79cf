"""Audio front end of the speech encoder: file loading and Whisper's log-mel features.

`log_mel_spectrogram` reproduces openai-whisper's features exactly (16 kHz, 25 ms Hann
window, 10 ms hop, slaney mel filters, whisper's log / clamp / rescale), because the
published encoder only understands features computed that way.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples: the published model's input length
DYNAMIC_RANGE = 8.0  # log10 units kept below each input's peak


class AudioError(ValueError):
    """The input is not usable audio (unreadable format, no samples)."""


def load_audio(source: str | Path | bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a sound file (path or encoded bytes) as float32 mono at `sample_rate`.

    Several channels are averaged; other sampling rates are resampled with a polyphase
    filter. Any format libsndfile reads works (WAV, FLAC, OGG, ...).
    """
    if isinstance(source, bytes):
        name, handle = "the given bytes", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}")
        name, handle = str(path), path
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # [T, C]
    except sf.SoundFileError as err:
        raise AudioError(
            f"{name} is not audio that soundfile can read ({err}). Readable formats include "
            f"WAV, FLAC, OGG (Vorbis/Opus) and MP3 (libsndfile {sf.__libsndfile_version__}); "
            "convert other files first, e.g. `ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav`."
        ) from err
    if data.shape[0] == 0:
        raise AudioError(f"{name} contains no audio samples")
    mono = data.mean(axis=1)  # [T]
    return resample(mono, rate, sample_rate)


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """[T] audio at `rate` Hz -> float32 at `target` Hz (polyphase filter)."""
    if rate != target:
        g = math.gcd(rate, target)
        audio = resample_poly(audio, target // g, rate // g)
    return audio.astype(np.float32, copy=False)


def pad_or_trim(array: np.ndarray | torch.Tensor, length: int = N_SAMPLES):
    """Zero-pad or cut the last axis to `length` (numpy array or torch tensor)."""
    size = array.shape[-1]
    if size > length:
        return array[..., :length]
    if size == length:
        return array
    if isinstance(array, torch.Tensor):
        return torch.nn.functional.pad(array, (0, length - size))
    widths = [(0, 0)] * (array.ndim - 1) + [(0, length - size)]
    return np.pad(array, widths)


@functools.cache
def _mel_filters(n_mels: int) -> torch.Tensor:
    """Slaney-scale, slaney-normalised mel filters: the numbers whisper ships (librosa's)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )  # [F, M]
    return torch.from_numpy(bank.T.astype(np.float32))  # [M, F]


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Whisper log-mel features of 16 kHz audio [T] or [B, T] -> [..., n_mels, T // 160].

    `padding` zeros are appended first. Computed in float32 whatever the input dtype; for a
    batch the dynamic-range clamp uses each item's own peak, as if run one at a time.
    """
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(audio)
    audio = audio.to(device=device, dtype=torch.float32)
    if padding > 0:
        audio = torch.nn.functional.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(
            f"audio has {audio.shape[-1]} samples; log-mel features need more than "
            f"{N_FFT // 2} (12.5 ms): pad it first (pad_or_trim)"
        )
    window = torch.hann_window(N_FFT, device=audio.device)  # periodic
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # [..., F, T+1]
    power = stft[..., :-1].abs() ** 2  # [..., F, T]
    mel = _mel_filters(n_mels).to(audio.device) @ power  # [..., M, T]
    log = mel.clamp(min=1e-10).log10()
    peak = log.amax(dim=(-2, -1), keepdim=True)  # [..., 1, 1]
    log = torch.maximum(log, peak - DYNAMIC_RANGE)
    return (log + 4.0) / 4.0
