"""Stage A: the speech adaptor (frame concatenation by k, then a two-layer MLP).

Whisper gives 50 frames per second; concatenating every k=5 consecutive frames along the
feature axis gives 10 embeddings per second, which an MLP maps to the LLM's width.
Frames left over at the end (fewer than k) are dropped, as in the published model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llama_omni.configbase import ConfigBase, require


@dataclass
class AdaptorConfig(ConfigBase):
    encoder_width: int
    llm_width: int
    downsample: int = 5
    hidden: int = 2048  # 2048 in the published model, whatever the LLM width

    def __post_init__(self) -> None:
        for name in ("encoder_width", "llm_width", "downsample", "hidden"):
            require(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                f"AdaptorConfig.{name} must be a positive integer, got {getattr(self, name)!r}",
            )


class SpeechAdaptor(nn.Module):
    def __init__(self, config: AdaptorConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        k, width = config.downsample, config.encoder_width
        self.linear1 = nn.Linear(k * width, config.hidden, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(config.hidden, config.llm_width, device=device, dtype=dtype)

    def output_lengths(self, encoder_lengths: torch.Tensor) -> torch.Tensor:
        return encoder_lengths // self.config.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, De] encoder frames -> [B, N // k, Dl] speech embeddings."""
        k = self.config.downsample
        batch, frames, width = x.shape
        if width != self.config.encoder_width:
            raise ValueError(
                f"adaptor expects encoder width {self.config.encoder_width}, got {width}"
            )
        kept = frames - frames % k
        x = x[:, :kept].reshape(batch, kept // k, k * width)  # [B, N/k, k*De]
        return self.linear2(self.relu(self.linear1(x)))  # [B, N/k, Dl]
