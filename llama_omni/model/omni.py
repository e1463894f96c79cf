"""The assembled model: speech encoder E -> adaptor A -> LLM M -> speech decoder D.

The vocoder V is loaded separately (`llama_omni.model.vocoder`): it belongs to a unit
vocabulary, not to one model, and several models can share one. `OmniConfig` holds one
typed config per component plus where the frozen pretrained parts come from; it is
saved with every checkpoint and rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from llama_omni.configbase import ConfigBase, require
from llama_omni.model.adaptor import AdaptorConfig, SpeechAdaptor
from llama_omni.model.encoder import EncoderConfig, WhisperEncoder, encode_audio
from llama_omni.model.llm import LLMConfig, SpeechLLM
from llama_omni.model.prompt import Turn, build_prompt_ids
from llama_omni.model.speech_decoder import SpeechDecoder, SpeechDecoderConfig


@dataclass
class OmniConfig(ConfigBase):
    encoder: EncoderConfig
    adaptor: AdaptorConfig
    llm: LLMConfig
    speech_decoder: SpeechDecoderConfig
    # "embedded" (weights in the checkpoint), "packaged:whisper-base", or a path the
    # encoder loaders accept (openai-whisper .pt, Hugging Face dir, CTranslate2 dir).
    encoder_source: str = "embedded"
    # Default vocoder for this model's units (a directory), or None.
    vocoder_source: str | None = None

    def __post_init__(self) -> None:
        require(
            self.adaptor.encoder_width == self.encoder.width,
            f"adaptor.encoder_width {self.adaptor.encoder_width} != encoder.width {self.encoder.width}",
        )
        require(
            self.adaptor.llm_width == self.llm.hidden_size,
            f"adaptor.llm_width {self.adaptor.llm_width} != llm.hidden_size {self.llm.hidden_size}",
        )
        width = self.llm.hidden_size * (2 if self.speech_decoder.token_input else 1)
        require(
            self.speech_decoder.input_width == width,
            f"speech_decoder.input_width {self.speech_decoder.input_width} != {width} "
            f"(llm.hidden_size {self.llm.hidden_size}"
            f"{', x2 for token_input' if self.speech_decoder.token_input else ''})",
        )

    @classmethod
    def preset(cls, name: str) -> "OmniConfig":
        """Named configurations: the paper's 8B model, the small CPU model, a tiny test model."""
        if name == "llama-omni-8b":
            return cls(
                encoder=EncoderConfig.preset("whisper-large-v3").replace(pad_to_30s=True),
                adaptor=AdaptorConfig(encoder_width=1280, llm_width=4096),
                llm=LLMConfig(
                    source="embedded", hidden_size=4096, prompt_style="llama3-omni",
                    stop_token_ids=(128001, 128008, 128009), pad_token_id=128004,
                ),
                speech_decoder=SpeechDecoderConfig.preset("llama-omni-8b"),
            )
        if name == "small":
            return cls(
                encoder=EncoderConfig.preset("whisper-base").replace(pad_to_30s=False),
                adaptor=AdaptorConfig(encoder_width=512, llm_width=576, hidden=2048),
                llm=LLMConfig(
                    source="packaged:smollm2-135m-instruct", hidden_size=576,
                    prompt_style="chat-template",
                ),
                speech_decoder=SpeechDecoderConfig(
                    input_width=576, n_layers=2, width=512, n_heads=8, ffn=1536,
                    upsample=25, unit_vocab=500, rope_theta=100000.0,
                ),
                encoder_source="packaged:whisper-base",
            )
        if name == "tiny-test":
            return cls(
                encoder=EncoderConfig.preset("tiny-test").replace(pad_to_30s=False),
                adaptor=AdaptorConfig(encoder_width=64, llm_width=64, hidden=128),
                llm=LLMConfig(source="embedded", hidden_size=64, prompt_style="llama3-omni"),
                speech_decoder=SpeechDecoderConfig.preset("tiny-test"),
            )
        raise ValueError(f"unknown model preset {name!r}; known: llama-omni-8b, small, tiny-test")


class OmniModel(nn.Module):
    def __init__(
        self,
        config: OmniConfig,
        encoder: WhisperEncoder,
        llm: SpeechLLM,
        adaptor: SpeechAdaptor | None = None,
        speech_decoder: SpeechDecoder | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.adaptor = adaptor or SpeechAdaptor(config.adaptor)
        self.llm = llm
        self.speech_decoder = speech_decoder or SpeechDecoder(config.speech_decoder)

    @classmethod
    def initialize(cls, config: OmniConfig, *, base_dir=None, device=None, dtype=None) -> "OmniModel":
        """A model to train: pretrained encoder and LLM from their sources, fresh A and D.

        An "embedded" encoder starts random (for tests); an "embedded" LLM is read from
        `base_dir`/llm.
        """
        from llama_omni.model.encoder_loaders import load_encoder

        if config.encoder_source == "embedded":
            encoder = WhisperEncoder(config.encoder)
        else:
            _, encoder = load_encoder(config.encoder_source, pad_to_30s=config.encoder.pad_to_30s)
        llm = SpeechLLM.load(config.llm, base_dir=base_dir)
        return cls(config, encoder, llm).to(device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.adaptor.linear1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adaptor.linear1.weight.dtype

    @torch.no_grad()
    def encode_speech(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz waveforms -> one [N_i, D_llm] speech-embedding sequence per item (E then A)."""
        features, lengths = encode_audio(self.encoder, list(audios), self.config.encoder)
        embeddings = self.adaptor(features.to(self.dtype))  # [B, N/k, D]
        counts = self.adaptor.output_lengths(lengths)
        return [embeddings[i, : int(counts[i])] for i in range(len(audios))]

    def answer_states(
        self,
        speech: Sequence[torch.Tensor],
        prompt_ids: Sequence[list[int]],
        answer_ids: Sequence[list[int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over prompt + answer: (logits [B, M, V], c [B, M, Din], M_i [B]).

        c_i is the final-layer state at the position that predicted answer token i, so the
        sequence fed is prompt + answer[:-1]; c is what the speech decoder reads
        (`decoder_inputs`).
        """
        sequences = [list(p) + list(a[:-1]) for p, a in zip(prompt_ids, answer_ids)]
        embeds, mask, positions = self.llm.embed_prompt(sequences, list(speech), padding_side="right")
        out = self.llm(embeds, mask, positions)
        real = mask.sum(-1)  # [B]
        counts = torch.tensor([len(a) for a in answer_ids], device=real.device)
        width = int(counts.max())
        index = (real - counts)[:, None] + torch.arange(width, device=real.device)[None, :]
        index = index.clamp(max=embeds.shape[1] - 1)  # [B, M]; positions past M_i are padding
        hidden = torch.gather(out.hidden, 1, index[..., None].expand(-1, -1, out.hidden.shape[-1]))
        logits = torch.gather(out.logits, 1, index[..., None].expand(-1, -1, out.logits.shape[-1]))
        padded = torch.zeros(len(answer_ids), width, dtype=torch.long, device=real.device)
        for b, ids in enumerate(answer_ids):
            padded[b, : len(ids)] = torch.tensor(list(ids), device=real.device)
        return logits, self.decoder_inputs(hidden, padded), counts

    def decoder_inputs(self, states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return decoder_inputs(self.llm, self.config.speech_decoder, states, token_ids)

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        cfg = self.config.llm
        return build_prompt_ids(
            self.llm.tokenizer, list(turns), style=cfg.prompt_style,
            system_prompt=cfg.system_prompt, instruction=cfg.instruction,
        )

    def parameter_counts(self) -> dict[str, int]:
        return {
            name: sum(p.numel() for p in module.parameters())
            for name, module in [
                ("encoder", self.encoder), ("adaptor", self.adaptor),
                ("llm", self.llm), ("speech_decoder", self.speech_decoder),
            ]
        }


def decoder_inputs(
    llm: SpeechLLM, config: SpeechDecoderConfig, states: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """What the speech decoder reads for answer tokens: states [..., D] and the ids [...]
    of the tokens they predicted -> c_i, or [c_i ; embedding of token i] with token_input."""
    if not config.token_input:
        return states  # [..., D]
    return torch.cat([states, llm.embed_tokens(token_ids).to(states.dtype)], -1)  # [..., 2D]
