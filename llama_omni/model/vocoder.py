"""Stage V: the unit vocoder (unit HiFi-GAN with a duration predictor), units -> 16 kHz wave.

Compatible with fairseq's CodeHiFiGAN (`CodeGenerator`), which the published LLaMA-Omni
uses: the parameter names below are fairseq's, so its checkpoints load after folding the
weight-norm pairs into plain weights. Each unit is embedded, repeated for its duration
(predicted from the embeddings unless given), and the embedding sequence goes through a
HiFi-GAN generator that upsamples every step by `hop_length` (320) samples.

Optional (our extension, off for fairseq configs): an iSTFT output head as in iSTFTNet.
The last layer then predicts a log-magnitude and a phase spectrum, and an inverse STFT
does the final `istft_hop` x upsampling, so the costly high-rate layers are dropped; this
is what lets a vocoder train on a few CPU cores in hours. Its frame rate leaves steady
tones at multiples of sample_rate / istft_hop; `hop_notch_width` > 0 notches them out of the
output, and `pitch_comb_gain` > 0 adds a pitch (long-term) post-filter that lowers the
noise between the voice's harmonics (`postfilter.py`; both applied by `vocode` and the
streaming vocoder, not in training).

Two weight formats load here: fairseq's (a `g_*` torch pickle holding {"generator": state
dict} next to its `config.json`) and ours (`vocoder.json` + `vocoder.safetensors`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llama_omni.configbase import ConfigBase, require
from llama_omni.model.postfilter import HarmonicNotch, OutputFilter, PitchPostfilter

CONFIG_NAME = "vocoder.json"
WEIGHTS_NAME = "vocoder.safetensors"
FAIRSEQ_CONFIG_NAME = "config.json"


@dataclass
class VocoderConfig(ConfigBase):
    num_units: int = 1000
    embed_dim: int = 128
    upsample_rates: tuple[int, ...] = (5, 4, 4, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 8, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    has_duration_predictor: bool = True
    dur_hidden: int = 128
    dur_kernel: int = 3
    dur_dropout: float = 0.5
    sample_rate: int = 16000
    lrelu_slope: float = 0.1
    final_lrelu_slope: float = 0.01  # fairseq: F.leaky_relu's default slope before conv_post
    istft_n_fft: int = 0  # > 0: iSTFT output head with this FFT size (0: waveform head)
    istft_hop: int = 0  # hop of the iSTFT head, the upsampling it adds
    hop_notch_width: float = 0.0  # > 0: notches this many Hz wide at k * sample_rate / istft_hop
    pitch_comb_gain: float = 0.0  # > 0: pitch post-filter with this gain (postfilter.py)
    pitch_comb_taps: int = 3  # its delayed taps, 1 to 8 (more: narrower harmonic peaks)
    pitch_comb_voicing: float = 0.7  # its autocorrelation below which a frame is not voiced

    def __post_init__(self) -> None:
        self.upsample_rates = tuple(self.upsample_rates)
        self.upsample_kernel_sizes = tuple(self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(self.resblock_kernel_sizes)
        self.resblock_dilation_sizes = tuple(tuple(d) for d in self.resblock_dilation_sizes)
        for name in ("num_units", "embed_dim", "upsample_initial_channel", "dur_hidden",
                     "dur_kernel", "sample_rate"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0,
                    f"VocoderConfig.{name} must be a positive integer, got {value!r}")
        self._validate_upsampling()
        self._validate_resblocks()
        require(self.dur_kernel % 2 == 1,
                f"VocoderConfig.dur_kernel must be odd to keep one duration per unit, "
                f"got {self.dur_kernel}")
        require(0.0 <= self.dur_dropout < 1.0,
                f"VocoderConfig.dur_dropout must be in [0, 1), got {self.dur_dropout}")
        require(self.lrelu_slope >= 0 and self.final_lrelu_slope >= 0,
                "VocoderConfig.lrelu_slope and final_lrelu_slope must be >= 0")
        require((self.istft_n_fft == 0) == (self.istft_hop == 0)
                and self.istft_n_fft % 2 == 0 and self.istft_hop <= self.istft_n_fft // 2,
                f"VocoderConfig: istft_n_fft ({self.istft_n_fft}) and istft_hop "
                f"({self.istft_hop}) must be both 0 (waveform head) or an even FFT size with "
                "0 < hop <= n_fft / 2 (Hann windows must overlap for the inverse STFT)")
        require(self.hop_notch_width == 0 or 0 < self.hop_notch_width * self.istft_hop
                < self.sample_rate, f"VocoderConfig.hop_notch_width ({self.hop_notch_width}) "
                "must be 0, or with an iSTFT head (the notches sit at its frame rate) between "
                "0 and sample_rate / istft_hop")
        require(0.0 <= self.pitch_comb_gain <= 1.0 and 1 <= self.pitch_comb_taps <= 8
                and 0.0 <= self.pitch_comb_voicing < 1.0,
                f"VocoderConfig: pitch_comb_gain ({self.pitch_comb_gain}) must be in [0, 1] "
                f"(0 = off), pitch_comb_taps ({self.pitch_comb_taps}) in 1..8 and "
                f"pitch_comb_voicing ({self.pitch_comb_voicing}) in [0, 1)")

    OUTPUT_FILTER_FIELDS = ("hop_notch_width", "pitch_comb_gain", "pitch_comb_taps",
                            "pitch_comb_voicing")

    def with_output_filter_of(self, other: VocoderConfig) -> VocoderConfig:
        """This config with `other`'s output filter (no trained weights depend on it)."""
        return self.replace(**{name: getattr(other, name) for name in self.OUTPUT_FILTER_FIELDS})

    def _validate_upsampling(self) -> None:
        rates, kernels = self.upsample_rates, self.upsample_kernel_sizes
        require(len(rates) > 0 and len(rates) == len(kernels),
                f"VocoderConfig.upsample_rates {rates} and upsample_kernel_sizes {kernels} "
                "must be non-empty and of the same length")
        for u, k in zip(rates, kernels):
            # A transposed conv with padding (k - u) // 2 gives exactly u outputs per input
            # only when k - u is even and non-negative.
            require(u > 0 and k >= u and (k - u) % 2 == 0,
                    f"VocoderConfig: upsample kernel {k} with rate {u} must satisfy "
                    "kernel >= rate and kernel - rate even")
        require(self.upsample_initial_channel % 2 ** len(rates) == 0,
                f"VocoderConfig.upsample_initial_channel ({self.upsample_initial_channel}) "
                f"must be divisible by 2**{len(rates)} (channels halve at every upsampling)")

    def _validate_resblocks(self) -> None:
        kernels, dilations = self.resblock_kernel_sizes, self.resblock_dilation_sizes
        require(len(kernels) > 0 and len(kernels) == len(dilations),
                f"VocoderConfig.resblock_kernel_sizes {kernels} and resblock_dilation_sizes "
                f"{dilations} must be non-empty and of the same length")
        require(all(k > 0 and k % 2 == 1 for k in kernels),
                f"VocoderConfig.resblock_kernel_sizes must be odd positive sizes, got {kernels}")
        require(all(len(d) > 0 and all(x > 0 for x in d) for d in dilations),
                f"VocoderConfig.resblock_dilation_sizes must be non-empty lists of positive "
                f"dilations, got {dilations}")

    @property
    def hop_length(self) -> int:
        """Output samples per (duration-expanded) unit step."""
        return math.prod(self.upsample_rates) * max(1, self.istft_hop)

    @classmethod
    def preset(cls, name: str) -> VocoderConfig:
        """Named configs: "codehifigan-1000" (the published mHuBERT-1000 LJSpeech vocoder),
        "tiny-test" (same rates, small widths, for tests), "istft-256" (the small
        iSTFT-head vocoder trained on CPU for the default voice), "istft-hop4" (its variant
        with a 4-sample iSTFT hop), "tiny-istft-test"."""
        if name not in _PRESETS:
            raise ValueError(f"unknown vocoder preset {name!r}; known presets: {sorted(_PRESETS)}")
        return cls(**_PRESETS[name])

    @classmethod
    def from_fairseq(cls, cfg: Mapping[str, Any]) -> VocoderConfig:
        """Read a fairseq CodeHiFiGAN `config.json`; refuse the variants not implemented here."""
        _refuse_unsupported_fairseq(cfg)
        embed_dim = _fairseq_key(cfg, "embedding_dim")
        model_in_dim = cfg.get("model_in_dim", 80)  # fairseq's default
        require(model_in_dim == embed_dim,
                f"fairseq vocoder config: model_in_dim ({model_in_dim}) differs from "
                f"embedding_dim ({embed_dim}); extra conditioning features are not supported")
        fields: dict[str, Any] = dict(
            num_units=_fairseq_key(cfg, "num_embeddings"),
            embed_dim=embed_dim,
            upsample_rates=_fairseq_key(cfg, "upsample_rates"),
            upsample_kernel_sizes=_fairseq_key(cfg, "upsample_kernel_sizes"),
            upsample_initial_channel=_fairseq_key(cfg, "upsample_initial_channel"),
            resblock_kernel_sizes=_fairseq_key(cfg, "resblock_kernel_sizes"),
            resblock_dilation_sizes=_fairseq_key(cfg, "resblock_dilation_sizes"),
            sample_rate=cfg.get("sampling_rate", 16000),
            has_duration_predictor=bool(cfg.get("dur_predictor_params")),
        )
        if fields["has_duration_predictor"]:
            fields.update(_fairseq_duration_fields(cfg["dur_predictor_params"], embed_dim))
        return cls(**fields)


_ISTFT_256: dict[str, Any] = dict(
    upsample_rates=(5, 4),
    upsample_kernel_sizes=(11, 8),
    upsample_initial_channel=256,
    istft_n_fft=64,
    istft_hop=16,
    hop_notch_width=250.0,  # chosen by DNSMOS on the voice corpus's dev sentences
    pitch_comb_gain=1.0,  # with taps 3, voicing 0.7: chosen the same way (vocoder-hibari card)
)

_PRESETS: dict[str, dict[str, Any]] = {
    "codehifigan-1000": {},
    "tiny-test": dict(
        num_units=32,
        embed_dim=16,
        upsample_initial_channel=32,
        resblock_kernel_sizes=(3, 5),
        resblock_dilation_sizes=((1, 3), (1, 3)),
        dur_hidden=16,
    ),
    "istft-256": _ISTFT_256,
    # istft-256 with a third upsampling layer and a 4-sample iSTFT hop: the last convolution
    # runs at 4 kHz instead of 1 kHz, room for the voice's harmonics (see vocoder-hibari's
    # model card); same GAN step cost on CPU, not trained yet; the notch moves to 4 kHz
    "istft-hop4": _ISTFT_256 | dict(
        upsample_rates=(5, 4, 4),
        upsample_kernel_sizes=(11, 8, 8),
        istft_n_fft=16,
        istft_hop=4,
    ),
    "tiny-istft-test": dict(
        num_units=32,
        embed_dim=16,
        upsample_rates=(5, 4),
        upsample_kernel_sizes=(11, 8),
        upsample_initial_channel=32,
        resblock_kernel_sizes=(3, 5),
        resblock_dilation_sizes=((1, 3), (1, 3)),
        dur_hidden=16,
        istft_n_fft=32,
        istft_hop=16,
    ),
}

# fairseq config keys that switch on inputs this module does not implement.
_UNSUPPORTED_FAIRSEQ_KEYS = {
    "multispkr": "multi-speaker conditioning",
    "embedder_params": "speaker-embedder conditioning",
    "multistyle": "style conditioning",
    "num_style_tokens": "style tokens",
    "f0": "F0 conditioning",
    "f0_quant_num_bin": "quantized F0 conditioning",
}


def _refuse_unsupported_fairseq(cfg: Mapping[str, Any]) -> None:
    for key, what in _UNSUPPORTED_FAIRSEQ_KEYS.items():
        require(not cfg.get(key),
                f"fairseq vocoder config sets {key}={cfg.get(key)!r} ({what}); this vocoder "
                "implements only the single-speaker unit vocoder without F0")
    resblock = str(cfg.get("resblock", "1"))
    require(resblock == "1",
            f"fairseq vocoder config uses resblock type {resblock!r}; only type '1' is implemented")


def _fairseq_key(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"fairseq vocoder config lacks the required key {key!r}")
    return cfg[key]


def _fairseq_duration_fields(params: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    in_dim = _fairseq_key(params, "encoder_embed_dim")
    require(in_dim == embed_dim,
            f"fairseq vocoder config: dur_predictor_params.encoder_embed_dim ({in_dim}) must "
            f"equal embedding_dim ({embed_dim})")
    return dict(
        dur_hidden=_fairseq_key(params, "var_pred_hidden_dim"),
        dur_kernel=_fairseq_key(params, "var_pred_kernel_size"),
        dur_dropout=_fairseq_key(params, "var_pred_dropout"),
    )


def durations_from_log(log_durations: torch.Tensor) -> torch.Tensor:
    """fairseq's rule: predicted log(1 + frames) -> round(exp(d) - 1), at least one frame."""
    return torch.clamp(torch.round(torch.exp(log_durations.float()) - 1).long(), min=1)


class DurationPredictor(nn.Module):
    """Two conv + ReLU + LayerNorm + dropout layers, then a linear to one log-duration."""

    def __init__(self, config: VocoderConfig, device=None, dtype=None):
        super().__init__()
        c, k = config.dur_hidden, config.dur_kernel
        factory = dict(device=device, dtype=dtype)
        self.conv1 = nn.Sequential(
            nn.Conv1d(config.embed_dim, c, k, padding=(k - 1) // 2, **factory), nn.ReLU()
        )
        self.ln1 = nn.LayerNorm(c, **factory)
        self.dropout = nn.Dropout(config.dur_dropout)
        self.conv2 = nn.Sequential(nn.Conv1d(c, c, k, padding=(k - 1) // 2, **factory), nn.ReLU())
        self.ln2 = nn.LayerNorm(c, **factory)
        self.proj = nn.Linear(c, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, U, C] unit embeddings -> [B, U] log-durations."""
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)  # [B, U, H]
        x = self.dropout(self.ln1(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)  # [B, U, H]
        x = self.dropout(self.ln2(x))
        return self.proj(x).squeeze(-1)  # [B, U]


class ResBlock(nn.Module):
    """HiFi-GAN residual block (type 1): per dilation, x += conv(lrelu(dilated_conv(lrelu(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: Sequence[int], slope: float,
                 device=None, dtype=None):
        super().__init__()
        self.slope = slope

        def conv(dilation: int) -> nn.Conv1d:
            padding = dilation * (kernel - 1) // 2  # 'same' length for odd kernels
            return nn.Conv1d(channels, channels, kernel, dilation=dilation, padding=padding,
                             device=device, dtype=dtype)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T]
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class UnitVocoder(nn.Module):
    """Units (+ durations) -> waveform; parameter names follow fairseq's CodeGenerator."""

    def __init__(self, config: VocoderConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        ch = config.upsample_initial_channel
        self.dict = nn.Embedding(config.num_units, config.embed_dim, **factory)
        self.dur_predictor = (
            DurationPredictor(config, **factory) if config.has_duration_predictor else None
        )
        self.conv_pre = nn.Conv1d(config.embed_dim, ch, 7, padding=3, **factory)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2,
                               **factory)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, d, config.lrelu_slope, **factory)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        post_channels = config.istft_n_fft + 2 if config.istft_n_fft else 1
        self.conv_post = nn.Conv1d(ch // 2 ** len(self.ups), post_channels, 7, padding=3,
                                   **factory)

    @property
    def device(self) -> torch.device:
        return self.dict.weight.device

    def make_postfilter(self) -> OutputFilter | None:
        """A fresh output filter for the config's `hop_notch_width` and `pitch_comb_*` (None
        when both are off). Not a child module: a vocoder shared by several streams must not
        share one filter state."""
        c = self.config
        stages: list[HarmonicNotch | PitchPostfilter] = []
        if c.hop_notch_width:
            stages.append(HarmonicNotch(c.sample_rate / c.istft_hop, c.sample_rate,
                                        c.hop_notch_width))
        if c.pitch_comb_gain:
            stages.append(PitchPostfilter(c.sample_rate, c.pitch_comb_gain,
                                          taps=c.pitch_comb_taps, voicing=c.pitch_comb_voicing))
        return OutputFilter(stages) if stages else None

    def predict_durations(self, units: torch.Tensor) -> torch.Tensor:
        """[B, U] unit ids -> [B, U] frames per unit (>= 1)."""
        if self.dur_predictor is None:
            raise ValueError("this vocoder has no duration predictor: pass durations explicitly")
        self._check_units(units)
        return durations_from_log(self.dur_predictor(self.dict(units)))

    def forward(self, units: torch.Tensor, durations: torch.Tensor | None = None) -> torch.Tensor:
        """[B, U] unit ids, optional [B, U] durations -> [B, 1, sum(durations) * hop] wave.

        Without durations they are predicted (or one frame per unit when the vocoder has no
        predictor). Every row must share one duration sequence, so in practice B = 1 unless
        the caller gives identical durations.
        """
        self._check_units(units)
        if durations is None and self.dur_predictor is not None:
            durations = self.predict_durations(units)
        elif durations is None:
            durations = torch.ones_like(units)
        repeats = self._shared_durations(units, durations)  # [U]
        x = self.dict(units).repeat_interleave(repeats, dim=1)  # [B, T, C]
        return self.generate_from_embeddings(x.transpose(1, 2))

    def generate_from_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The HiFi-GAN body on an already duration-expanded sequence: [B, C, T] -> [B, 1, T*hop].

        Kept separate from `forward` so chunked (streaming) vocoding can feed windows of the
        expanded sequence with left context.
        """
        slope = self.config.lrelu_slope
        kernels = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(x)  # [B, ch, T]
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, slope))  # [B, ch / 2**(i+1), T * prod(rates[:i+1])]
            blocks = self.resblocks[i * kernels:(i + 1) * kernels]
            x = torch.stack([block(x) for block in blocks]).mean(dim=0)
        x = self.conv_post(F.leaky_relu(x, self.config.final_lrelu_slope))
        if not self.config.istft_n_fft:
            return torch.tanh(x)  # [B, 1, T*hop]
        return self._istft(x)

    def _istft(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_fft + 2, T'] log-magnitudes and phases -> [B, 1, T' * istft_hop] wave.

        Magnitudes are capped (exp of at most 100) and phases squashed to [-pi, pi] by a
        sine, as iSTFTNet does; the wave is clamped to [-1, 1] like the tanh head's.
        """
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop
        bins = n_fft // 2 + 1
        x = x.float()
        magnitude = torch.exp(x[:, :bins]).clamp(max=100.0)  # [B, F, T']
        phase = math.pi * torch.sin(x[:, bins:])  # [B, F, T']
        spec = torch.polar(magnitude, phase)  # [B, F, T'] complex
        window = torch.hann_window(n_fft, device=x.device)
        wave = torch.istft(spec, n_fft, hop, win_length=n_fft, window=window, center=True,
                           length=x.shape[-1] * hop)  # [B, T' * hop]
        return wave.clamp(-1.0, 1.0)[:, None, :]

    def vocode(self, units: Sequence[int] | torch.Tensor,
               durations: Sequence[int] | torch.Tensor | None = None) -> np.ndarray:
        """One unit sequence -> float32 wave [sum(durations) * hop] at `config.sample_rate`."""
        units_t = self._as_row(units, "units")
        durations_t = None if durations is None else self._as_row(durations, "durations")
        with torch.inference_mode():
            wave = self(units_t, durations_t)[0, 0].float().cpu().numpy()  # [T]
        postfilter = self.make_postfilter()
        return wave if postfilter is None else postfilter.apply(wave)

    def _as_row(self, values: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
        """A sequence, [U] or [1, U] tensor of integers -> LongTensor [1, U] on our device."""
        t = torch.as_tensor(values, device=self.device)
        one_row = t.dim() < 2 or (t.dim() == 2 and t.shape[0] == 1)
        if not one_row or (t.numel() and t.dtype.is_floating_point):
            raise ValueError(f"{name} must be one sequence of integers, got {t.dtype} "
                             f"of shape {tuple(t.shape)}")
        return t.long().reshape(1, -1)

    def _check_units(self, units: torch.Tensor) -> None:
        if units.dim() != 2 or units.dtype.is_floating_point:
            raise ValueError(f"units must be an integer tensor [B, U], got {units.dtype} "
                             f"of shape {tuple(units.shape)}")
        if units.numel() == 0:
            raise ValueError("cannot vocode an empty unit sequence")
        bad = units[(units < 0) | (units >= self.config.num_units)]
        if bad.numel():
            raise ValueError(f"unit id {int(bad[0])} is outside the vocoder's vocabulary "
                             f"[0, {self.config.num_units}) of {self.config.num_units} units")

    @staticmethod
    def _shared_durations(units: torch.Tensor, durations: torch.Tensor) -> torch.Tensor:
        if durations.shape != units.shape or durations.dtype.is_floating_point:
            raise ValueError(f"durations must be integers of the units' shape "
                             f"{tuple(units.shape)}, got {durations.dtype} of shape "
                             f"{tuple(durations.shape)}")
        if bool((durations < 1).any()):
            raise ValueError("every duration must be at least 1 frame")
        if bool((durations != durations[:1]).any()):
            raise ValueError("rows of a batch have different durations: vocode one sequence "
                             "at a time (batch size 1)")
        return durations[0]


# --- loading and saving ---------------------------------------------------------------------


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every `X.weight_g` / `X.weight_v` pair by `X.weight = g * v / ||v||`.

    The norm runs over all dims but 0, as torch.nn.utils.weight_norm(dim=0) computes it for
    Conv1d and ConvTranspose1d alike.
    """
    pair_suffixes = (".weight_g", ".weight_v")
    folded = {k: v for k, v in state_dict.items() if not k.endswith(pair_suffixes)}
    bases = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(pair_suffixes)}
    for base in sorted(bases):
        g, v = state_dict.get(f"{base}.weight_g"), state_dict.get(f"{base}.weight_v")
        if g is None or v is None:
            raise ValueError(f"incomplete weight-norm pair: {base}.weight_g and "
                             f"{base}.weight_v must both be present")
        folded[f"{base}.weight"] = _weight_from_norm(g, v)
    return folded


def _weight_from_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v32 = v.float()
    norm = torch.linalg.vector_norm(v32, dim=tuple(range(1, v.dim())), keepdim=True)  # [O,1,..]
    return (g.float().reshape(norm.shape) * v32 / norm).to(v.dtype)


def load_fairseq_codehifigan(checkpoint_path: str | Path, config_path: str | Path,
                             device=None, dtype=None,
                             trust_pickle: bool = False) -> UnitVocoder:
    """Load a fairseq CodeHiFiGAN generator (`g_00500000` + `config.json`), in eval mode.

    The checkpoint is read with torch.load(weights_only=True). A file that needs full
    unpickling is refused unless trust_pickle=True, since unpickling can run arbitrary code.
    """
    config = VocoderConfig.from_fairseq(json.loads(Path(config_path).read_text()))
    checkpoint = _torch_load(Path(checkpoint_path), trust_pickle)
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{checkpoint_path}: expected a fairseq vocoder checkpoint holding a "
                         f"'generator' state dict, found {found}")
    return _build(config, fold_weight_norm(checkpoint["generator"]), device, dtype)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds more than tensors and cannot be loaded safely "
                f"(weights_only=True failed: {err}). If the file comes from a source you "
                "trust, pass trust_pickle=True to unpickle it fully."
            ) from err
        warnings.warn(f"{path}: loading with full unpickling (trust_pickle=True)", stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False)


def save_vocoder(model: UnitVocoder, directory: str | Path) -> None:
    """Write `vocoder.json` (config) and `vocoder.safetensors` (plain weights), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def load_vocoder(path: str | Path, device=None, dtype=None) -> UnitVocoder:
    """Load a vocoder in eval mode from our format or a fairseq CodeHiFiGAN directory.

    `path` is a directory holding `vocoder.json` + `vocoder.safetensors` (ours) or a `g_*`
    checkpoint + `config.json` (fairseq), or one of those weight files directly.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    names_ours = path.is_dir() or path.name in (CONFIG_NAME, WEIGHTS_NAME)
    if names_ours and (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
        config = VocoderConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        return _build(config, load_file(str(directory / WEIGHTS_NAME)), device, dtype)
    if path.is_dir():
        checkpoints = sorted(p for p in directory.glob("g_*") if p.is_file())
    else:
        checkpoints = [path] if path.name.startswith("g_") and path.is_file() else []
    if checkpoints and (directory / FAIRSEQ_CONFIG_NAME).is_file():
        # fairseq names checkpoints g_<zero-padded step>: the latest sorts last.
        return load_fairseq_codehifigan(checkpoints[-1], directory / FAIRSEQ_CONFIG_NAME,
                                        device, dtype)
    raise FileNotFoundError(
        f"no vocoder found at {path}: expected a directory with {CONFIG_NAME} + {WEIGHTS_NAME} "
        f"(llama-omni format) or a fairseq CodeHiFiGAN checkpoint g_* + {FAIRSEQ_CONFIG_NAME}"
    )


def _build(config: VocoderConfig, state_dict: Mapping[str, torch.Tensor],
           device, dtype) -> UnitVocoder:
    """Build on the meta device, then take the checkpoint tensors as the parameters."""
    model = UnitVocoder(config, device="meta")
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
                 for k, shape in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != shape]
    if missing or unexpected or misshaped:
        raise ValueError(f"vocoder weights do not match the config: missing {missing}, "
                         f"unexpected {unexpected}, mis-shaped {misshaped}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
