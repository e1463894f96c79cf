"""Stage E: the Whisper speech encoder (log-mel -> 50 frames per second of features).

Parameter names are exactly openai-whisper's `AudioEncoder` ones (`conv1`, `blocks.N.attn.query`,
`ln_post`, ...), so the published checkpoints load 1:1. Besides the published fixed 30 s input,
the encoder runs on variable-length padded batches with a key padding mask. Loaders for
openai `.pt`, Hugging Face and CTranslate2 files are in `encoder_loaders.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llama_omni.audio import log_mel_spectrogram, pad_or_trim
from llama_omni.configbase import ConfigBase, require


@dataclass
class EncoderConfig(ConfigBase):
    """Sizes of a Whisper encoder, plus how its input is framed."""

    n_mels: int = 128
    n_ctx: int = 1500  # audio positions after the stride-2 conv: 30 s at 50 frames/s
    width: int = 1280
    n_heads: int = 20
    n_layers: int = 32
    pad_to_30s: bool = True  # True: pad/trim every input to 30 s like the published model

    def __post_init__(self) -> None:
        for name in ("n_mels", "n_ctx", "width", "n_heads", "n_layers"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"EncoderConfig.{name} must be a positive int, got {value!r}",
            )
        require(
            self.width % self.n_heads == 0,
            f"EncoderConfig.width ({self.width}) must be divisible by n_heads ({self.n_heads})",
        )
        require(
            isinstance(self.pad_to_30s, bool),
            f"EncoderConfig.pad_to_30s must be a bool, got {self.pad_to_30s!r}",
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> EncoderConfig:
        """A named size: whisper-large-v3 (the paper's), whisper-base, whisper-tiny, tiny-test."""
        if name not in _PRESETS:
            raise ValueError(f"unknown encoder preset {name!r}; known presets: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})


_PRESETS = {
    "whisper-large-v3": dict(n_mels=128, n_ctx=1500, width=1280, n_heads=20, n_layers=32),
    "whisper-base": dict(n_mels=80, n_ctx=1500, width=512, n_heads=8, n_layers=6),
    "whisper-tiny": dict(n_mels=80, n_ctx=1500, width=384, n_heads=6, n_layers=4),
    "tiny-test": dict(n_mels=80, n_ctx=1500, width=64, n_heads=4, n_layers=2),
}


def sinusoids(length: int, channels: int, device=None, dtype=None) -> torch.Tensor:
    """Whisper's initial position table: [sin | cos] at geometric timescales 1..10000."""
    half = channels // 2
    rate = math.log(10000) / (half - 1)
    inv_timescales = torch.exp(-rate * torch.arange(half, device=device))  # [C/2]
    angles = torch.arange(length, device=device)[:, None] * inv_timescales  # [L, C/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)  # [L, C]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as whisper does under half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        bias = self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.n_heads = n_heads
        self.query = nn.Linear(width, width, **kw)
        self.key = nn.Linear(width, width, bias=False, **kw)
        self.value = nn.Linear(width, width, **kw)
        self.out = nn.Linear(width, width, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D]; mask [B, 1, 1, T] bool (True = key is real audio) or None."""
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.n_heads, -1).transpose(1, 2)  # [B, H, T, Dh]

        y = F.scaled_dot_product_attention(
            heads(self.query), heads(self.key), heads(self.value), attn_mask=mask
        )  # [B, H, T, Dh]
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class ResidualBlock(nn.Module):
    def __init__(self, width: int, n_heads: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn = SelfAttention(width, n_heads, **kw)
        self.attn_ln = LayerNorm(width, **kw)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, **kw), nn.GELU(), nn.Linear(4 * width, width, **kw)
        )
        self.mlp_ln = LayerNorm(width, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), mask)
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """openai-whisper's AudioEncoder, with variable-length input and a padding mask."""

    def __init__(self, config: EncoderConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        c = config
        self.conv1 = nn.Conv1d(c.n_mels, c.width, kernel_size=3, padding=1, **kw)
        self.conv2 = nn.Conv1d(c.width, c.width, kernel_size=3, stride=2, padding=1, **kw)
        # Part of the state dict: checkpoints store it (rounded to fp16) and it is read from them.
        self.register_buffer("positional_embedding", sinusoids(c.n_ctx, c.width, **kw))
        self.blocks = nn.ModuleList(
            ResidualBlock(c.width, c.n_heads, **kw) for _ in range(c.n_layers)
        )
        self.ln_post = LayerNorm(c.width, **kw)

    @staticmethod
    def output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for each mel length (the stride-2 conv rounds up)."""
        return (mel_lengths + 1) // 2

    def forward(
        self,
        mel: torch.Tensor,
        mel_lengths: torch.Tensor | None = None,
        output_layer: int | None = None,
    ) -> torch.Tensor:
        """mel [B, n_mels, T] -> features [B, ceil(T / 2), width].

        With `mel_lengths` [B], frames past each length are ignored, so every item comes out
        as if run alone (and its padded output frames are zero). `output_layer=k` returns
        the hidden state after block k (1-based), without the final LayerNorm.
        """
        t_out = self._check_input(mel, mel_lengths, output_layer)
        x = mel.to(self.conv1.weight.dtype)  # [B, M, T]
        frame_mask = key_mask = attn_mask = None
        if mel_lengths is not None:
            frame_mask = _length_mask(mel_lengths, mel.shape[-1])[:, None, :]  # [B, 1, T]
            key_mask = _length_mask(self.output_lengths(mel_lengths), t_out)  # [B, T_out]
            attn_mask = key_mask[:, None, None, :]  # [B, 1, 1, T_out]
            x = x * frame_mask
        x = F.gelu(self.conv1(x))  # [B, D, T]
        if frame_mask is not None:
            x = x * frame_mask  # the stride-2 conv must see zeros past the end, as alone
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T_out, D]
        x = (x + self.positional_embedding[:t_out]).to(x.dtype)
        for block in self.blocks[: output_layer or len(self.blocks)]:
            x = block(x, attn_mask)
        if output_layer is None:
            x = self.ln_post(x)
        if key_mask is not None:
            x = x * key_mask[..., None]
        return x  # [B, T_out, D]

    def _check_input(self, mel, mel_lengths, output_layer) -> int:
        """Validate the arguments of forward; return the number of output frames."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"expected mel of shape [B, {c.n_mels}, T], got {tuple(mel.shape)}")
        t_out = (mel.shape[-1] + 1) // 2
        if t_out > c.n_ctx:
            raise ValueError(
                f"the audio is longer than 30 s: {mel.shape[-1]} mel frames give {t_out} encoder "
                f"frames, more than the {c.n_ctx} positions the encoder has. Cut the audio into "
                "chunks of at most 30 s, or trim it with llama_omni.audio.pad_or_trim."
            )
        if mel_lengths is not None:
            if mel_lengths.shape != (mel.shape[0],):
                raise ValueError(
                    f"mel_lengths must have shape [{mel.shape[0]}], got {tuple(mel_lengths.shape)}"
                )
            if bool((mel_lengths < 1).any()) or bool((mel_lengths > mel.shape[-1]).any()):
                raise ValueError(
                    f"mel_lengths must lie in 1..{mel.shape[-1]}, got {mel_lengths.tolist()}"
                )
        if output_layer is not None and not 1 <= output_layer <= c.n_layers:
            raise ValueError(f"output_layer must lie in 1..{c.n_layers}, got {output_layer}")
        return t_out


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B] lengths -> [B, size] bool, True where the position is inside the item."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


@torch.no_grad()
def encode_audio(
    encoder: WhisperEncoder,
    audios: list[np.ndarray],
    config: EncoderConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode 16 kHz mono waveforms as one batch -> (features [B, N, D], lengths [B]).

    With `config.pad_to_30s` (the published model's behaviour) every input is padded or
    trimmed to 30 s and all N = n_ctx frames are valid. Otherwise each input keeps its own
    length, the batch is zero-padded and masked, and frames past `lengths` are zero.
    `config` defaults to the encoder's own.
    """
    config = config or encoder.config
    device = encoder.conv1.weight.device
    if not audios:
        raise ValueError("encode_audio needs at least one waveform")
    if config.pad_to_30s:
        mel = torch.stack(
            [log_mel_spectrogram(pad_or_trim(a), config.n_mels, device=device) for a in audios]
        )  # [B, M, 3000]
        features = encoder(mel)  # [B, N, D]
        lengths = torch.full((len(audios),), features.shape[1], device=device)
        return features, lengths
    mels = [log_mel_spectrogram(a, config.n_mels, device=device) for a in audios]  # [M, T_i]
    mel_lengths = torch.tensor([m.shape[-1] for m in mels], device=device)
    batch = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True)  # [B, T, M]
    features = encoder(batch.transpose(1, 2), mel_lengths)  # [B, N, D]
    return features, encoder.output_lengths(mel_lengths)
