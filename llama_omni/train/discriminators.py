"""HiFi-GAN's adversarial side: multi-period + multi-scale discriminators and the losses.

Channel widths are parameters: HiFi-GAN's own (`width=1.0`: up to 1024 channels) cost far
more than a small generator, so CPU training uses a fraction of them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from llama_omni.audio import SAMPLE_RATE

SLOPE = 0.1
Features = list[torch.Tensor]


def _scaled(channels: tuple[int, ...], width: float, multiple: int = 1) -> list[int]:
    return [max(multiple, int(round(c * width / multiple)) * multiple) for c in channels]


class PeriodDiscriminator(nn.Module):
    """Folds the wave into [T / p, p] columns and runs 2-D convs along time (kernel 5 x 1)."""

    def __init__(self, period: int, width: float):
        super().__init__()
        self.period = period
        chans = [1] + _scaled((32, 128, 512, 1024, 1024), width)
        strides = (3, 3, 3, 3, 1)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(cin, cout, (5, 1), (s, 1), padding=(2, 0)))
            for cin, cout, s in zip(chans[:-1], chans[1:], strides)
        )
        self.post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, Features]:
        """[B, 1, T] -> (scores [B, N], feature maps)."""
        b, c, t = wave.shape
        if t % self.period:
            wave = F.pad(wave, (0, self.period - t % self.period), mode="reflect")
        return _run_stack(self.convs, self.post, wave.view(b, c, -1, self.period))  # [B, 1, T/p, p]


class ScaleDiscriminator(nn.Module):
    """Strided grouped 1-D convs over the wave (or an average-pooled copy of it)."""

    def __init__(self, width: float):
        super().__init__()
        chans = [1] + _scaled((128, 128, 256, 512, 1024, 1024, 1024), width, multiple=16)
        kernels = (15, 41, 41, 41, 41, 41, 5)
        strides = (1, 2, 2, 4, 4, 1, 1)
        groups = (1, 4, 16, 16, 16, 16, 1)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(cin, cout, k, s, groups=g, padding=k // 2))
            for cin, cout, k, s, g in zip(chans[:-1], chans[1:], kernels, strides, groups)
        )
        self.post = weight_norm(nn.Conv1d(chans[-1], 1, 3, padding=1))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, Features]:
        return _run_stack(self.convs, self.post, wave)


def _run_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    """Leaky-ReLU conv stack, then the scoring conv: (flattened scores, every feature map)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), SLOPE)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class Discriminators(nn.Module):
    """MPD (periods 2, 3, 5, 7, 11) + MSD (raw, /2, /4 average-pooled) as one module."""

    def __init__(self, width: float = 0.25, periods: tuple[int, ...] = (2, 3, 5, 7, 11),
                 scales: int = 3):
        super().__init__()
        self.period = nn.ModuleList(PeriodDiscriminator(p, width) for p in periods)
        self.scale = nn.ModuleList(ScaleDiscriminator(width) for _ in range(scales))

    def forward(self, wave: torch.Tensor) -> list[tuple[torch.Tensor, Features]]:
        """[B, 1, T] -> one (scores, feature maps) per sub-discriminator."""
        outputs = [d(wave) for d in self.period]
        for i, d in enumerate(self.scale):
            pooled = wave if i == 0 else F.avg_pool1d(wave, 2 ** i * 2, 2 ** i, padding=2 ** i)
            outputs.append(d(pooled))
        return outputs


def discriminator_loss(real: list, fake: list) -> torch.Tensor:
    """LSGAN: real scores towards 1, generated towards 0."""
    return sum(((1 - r) ** 2).mean() + (f ** 2).mean() for (r, _), (f, _) in zip(real, fake))


def generator_adversarial_loss(fake: list) -> torch.Tensor:
    return sum(((1 - f) ** 2).mean() for f, _ in fake)


def feature_matching_loss(real: list, fake: list) -> torch.Tensor:
    """L1 between the discriminators' feature maps on real and generated audio."""
    return sum(F.l1_loss(f, r.detach()) for (_, rs), (_, fs) in zip(real, fake)
               for r, f in zip(rs, fs))


@functools.lru_cache(maxsize=None)
def _mel_basis(n_fft: int, n_mels: int) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                           min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                           sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank.T).float()  # [M, F]


def log_mel(wave: torch.Tensor, n_fft: int, hop: int, n_mels: int) -> torch.Tensor:
    """[B, 1, T] -> [B, M, frames] natural-log magnitude mel (HiFi-GAN's loss features)."""
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave.squeeze(1).float(), n_fft, hop, window=window,
                      return_complex=True).abs()  # [B, F, frames]
    mel = _mel_basis(n_fft, n_mels).to(wave.device) @ spec  # [B, M, frames]
    return torch.log(mel.clamp(min=1e-5))


MEL_RESOLUTIONS = ((1024, 256, 80), (512, 128, 64), (256, 64, 32))


def mel_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mean L1 between log-mels at three resolutions (long windows for pitch, short for timing)."""
    return sum(F.l1_loss(log_mel(fake, *r), log_mel(real, *r))
               for r in MEL_RESOLUTIONS) / len(MEL_RESOLUTIONS)
