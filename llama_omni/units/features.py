"""Frame features that units are quantized from: a layer of a speech encoder, 50 frames/s.

Two sources: a hidden layer of a Whisper encoder (the packaged Whisper base by default,
the only speech encoder with weights on our machines) and a HuBERT layer through
transformers (the paper's source, for users who have mHuBERT / HuBERT weights). Both give
one feature vector per 20 ms (320 samples at 16 kHz), the step of the unit vocoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from llama_omni.audio import SAMPLE_RATE, log_mel_spectrogram

FRAME_SAMPLES = 320  # 20 ms at 16 kHz: one unit step
MAX_SECONDS = 30
MIN_SAMPLES = 400  # shortest chunk worth encoding (25 ms, one mel window)


class FeatureExtractor(ABC):
    """16 kHz mono audio -> [N, D] float32 features, N = ceil(samples / 320)-ish."""

    dim: int
    layer: int

    @abstractmethod
    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """[T] float32 waveform -> [N, D] features on the CPU."""

    def frames(self, audio: np.ndarray) -> torch.Tensor:
        """Features of any length of audio, in chunks of at most 30 s."""
        step = MAX_SECONDS * SAMPLE_RATE
        chunks = [audio[i:i + step] for i in range(0, len(audio), step)]
        chunks = [c for c in chunks if len(c) > MIN_SAMPLES] or [audio]  # drop a tiny tail
        return torch.cat([self(c) for c in chunks])  # [N, D]


class WhisperLayerFeatures(FeatureExtractor):
    """The hidden state after block `layer` of a Whisper encoder, on the unpadded input.

    The encoder runs without the 30 s padding, so features depend only on the audio itself.
    """

    def __init__(self, source: str = "packaged:whisper-base", layer: int = 4,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from llama_omni.model.encoder_loaders import load_encoder

        self.source = source
        self.config, self.encoder = load_encoder(source, pad_to_30s=False, device=device,
                                                 dtype=dtype)
        if not 1 <= layer <= self.config.n_layers:
            raise ValueError(f"layer must lie in 1..{self.config.n_layers} for {source}, "
                             f"got {layer}")
        self.layer, self.dim, self.device = layer, self.config.width, torch.device(device)

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        mel = log_mel_spectrogram(audio, self.config.n_mels, device=self.device)  # [M, T]
        hidden = self.encoder(mel[None], output_layer=self.layer)  # [1, N, D]
        return hidden[0].float().cpu()

    @torch.inference_mode()
    def all_layers(self, audio: np.ndarray) -> list[torch.Tensor]:
        """[N, D] features after every block (1..n_layers), from one pass of the encoder."""
        captured: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
                 for block in self.encoder.blocks]
        try:
            mel = log_mel_spectrogram(audio, self.config.n_mels, device=self.device)
            self.encoder(mel[None], output_layer=self.config.n_layers)
        finally:
            for hook in hooks:
                hook.remove()
        return [h.float().cpu() for h in captured]


class HubertLayerFeatures(FeatureExtractor):
    """A HuBERT hidden layer through transformers (`hidden_states[layer]`, 0 = CNN output).

    `path` is a local Hugging Face HuBERT directory (e.g. a converted mHuBERT-147 or
    facebook/hubert-base-ls960). LLaMA-Omni's units come from mHuBERT layer 11.
    """

    def __init__(self, path: str, layer: int = 11, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import HubertModel

        self.model = HubertModel.from_pretrained(path, dtype=dtype).to(device).eval()
        n_layers = self.model.config.num_hidden_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer must lie in 0..{n_layers} for {path}, got {layer}")
        self.source, self.layer = path, layer
        self.dim, self.device = self.model.config.hidden_size, torch.device(device)
        self.normalize = bool(getattr(self.model.config, "feat_extract_norm", "") == "layer")

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        wave = torch.from_numpy(np.asarray(audio, dtype=np.float32)).to(self.device)
        if self.normalize:  # large HuBERT models were trained on normalized waveforms
            wave = (wave - wave.mean()) / (wave.std() + 1e-7)
        out = self.model(wave[None].to(self.model.dtype), output_hidden_states=True)
        return out.hidden_states[self.layer][0].float().cpu()  # [N, D]


def feature_extractor(source: str, layer: int, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> FeatureExtractor:
    """`hubert:<dir>` for HuBERT, anything else is a Whisper source for `load_encoder`."""
    if source.startswith("hubert:"):
        return HubertLayerFeatures(source.removeprefix("hubert:"), layer, device, dtype)
    return WhisperLayerFeatures(source, layer, device, dtype)
