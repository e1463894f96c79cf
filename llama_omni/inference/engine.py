"""The streaming inference engine (SPEC section 3): speech in, events out.

One decoding loop of our own over `SpeechLLM.forward` with the backbone's KV cache: a
prefill over the prompts (speech spliced in, left-padded), then one token per step for
the whole batch, each request stopping on its own stop token or at max_new_tokens.
Each step's final-layer state c_i (the state that chose token i, the stop token's
included, as in the published model) goes to the speech path at once, which turns it
into units and, every Omega units, into audio. Everything comes out as typed events.
By default (options.overlap) the LLM computes the next token on a helper thread while
the speech path works on the current one, so speech adds little to the decode time
when a second core is free. With options.speech_process the speech path runs in a child
process instead of the engine's thread (the default on CPU): no GIL shared with the LLM,
and a chunk's vocoder call never holds the loop back.

Audio length policy: an input must give at least one speech embedding (about 0.1 s)
and last at most the encoder's context (30 s for Whisper). Longer inputs are refused
with an error rather than trimmed (the published code silently cut them at 30 s).
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llama_omni.audio import HOP_LENGTH, SAMPLE_RATE, AudioError
from llama_omni.configbase import require
from llama_omni.inference.events import Answer, Clock, End, Event, TextDelta, collect
from llama_omni.inference.runner import StepRunner
from llama_omni.inference.sampling import SamplingOptions, TokenSelector
from llama_omni.inference.speech_path import DECODER_MODES, SpeechPath
from llama_omni.inference.speech_worker import RemoteSpeechPath, SpeechWorker
from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.llm import LLMOutput
from llama_omni.model.omni import OmniModel
from llama_omni.model.prompt import Turn
from llama_omni.model.vocoder import UnitVocoder


@dataclass(frozen=True)
class EngineOptions:
    """How to decode. chunk_size is Omega (None: vocode once, after the last token)."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_new_tokens: int = 512
    chunk_size: int | None = 40
    cut_at_word_ends: bool = False
    vocoder: VocoderStreamOptions = field(default_factory=VocoderStreamOptions)
    speech: bool = True  # False: text only (no speech decoder, no vocoder)
    ignore_eos: bool = False  # decode exactly max_new_tokens tokens (benchmarks)
    decoder_mode: str = "incremental"  # or "recompute" (the published per-token rerun)
    overlap: bool = True  # next LLM step on a helper thread while the speech path runs
    # The speech path in a child process (speech_worker.py). None: on CPU under POSIX, once
    # the child has started (requests before that, or while it is busy, run in-process);
    # True: always, waiting for it.
    speech_process: bool | None = None

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(
            self.chunk_size is None or self.chunk_size >= 1,
            f"chunk_size (Omega) must be >= 1 or None (inf), got {self.chunk_size}",
        )
        require(self.decoder_mode in DECODER_MODES, f"decoder_mode: choose one of {DECODER_MODES}")


@dataclass
class Request:
    """A prompt with SPEECH_TOKEN_INDEX slots and one [N, D] speech segment per slot."""

    prompt_ids: list[int]
    speech: list[torch.Tensor]


@dataclass
class Decoded:
    """What a finished decoding loop leaves behind (the generator's return value)."""

    token_ids: list[list[int]]  # per request, the stop token included
    cache: Any  # LLM KV cache over the inputs and every generated token but the last
    attention_mask: torch.Tensor  # [B, cached length]


def vocoder_mismatch(model: OmniModel, vocoder: UnitVocoder | None) -> str | None:
    """Why `vocoder` cannot voice this model's units, or None when it can."""
    units = model.config.speech_decoder.unit_vocab
    if vocoder is None:
        return "no vocoder was given and the model names none (pass --vocoder DIR)"
    if vocoder.config.num_units != units:
        return (
            f"the vocoder reads {vocoder.config.num_units} unit ids but the model's speech "
            f"decoder produces {units}; use a vocoder trained on this model's units"
        )
    return None


class Detokenizer:
    """Token ids -> text deltas; waits while the text ends inside a multi-byte character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


class Engine:
    def __init__(
        self,
        model: OmniModel,
        vocoder: UnitVocoder | None = None,
        options: EngineOptions | None = None,
    ):
        self.model = model.eval()
        self.options = options or EngineOptions()
        self.vocoder = None
        if vocoder is not None:
            problem = vocoder_mismatch(model, vocoder)
            require(problem is None, f"vocoder does not fit the model: {problem}")
            self.vocoder = StreamingVocoder(vocoder, self.options.vocoder)
        if self.options.speech and self.speech_in_child_process:
            _ = self.speech_worker  # starts it now, so it is ready by the first answer

    @property
    def speech_in_child_process(self) -> bool:
        choice = self.options.speech_process
        if choice is None:
            device = next(self.model.speech_decoder.parameters()).device
            return device.type == "cpu" and os.name == "posix"
        return choice

    @property
    def speech_worker(self) -> SpeechWorker:
        """The child process of this model's speech decoder and vocoder (started on demand)."""
        vocoder = self.vocoder.vocoder if self.vocoder else None
        return SpeechWorker.shared(self.model.speech_decoder, vocoder)

    # -- requests from audio ---------------------------------------------------------------
    @property
    def max_audio_seconds(self) -> float:
        """The encoder's context: n_ctx frames after its stride-2 conv, 10 ms mel hop."""
        return self.model.config.encoder.n_ctx * 2 * HOP_LENGTH / SAMPLE_RATE

    def encode(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono waveforms -> one [N_i, D] speech segment each (policy: module doc)."""
        for i, audio in enumerate(audios):
            if audio.ndim != 1:
                raise AudioError(f"audio {i}: expected mono samples [T], got shape {audio.shape}")
            if audio.size == 0:
                raise AudioError(f"audio {i} is empty")
            seconds = audio.size / SAMPLE_RATE
            if seconds > self.max_audio_seconds:
                raise AudioError(
                    f"audio {i} lasts {seconds:.1f} s but the speech encoder accepts at most "
                    f"{self.max_audio_seconds:.0f} s; cut it into shorter questions"
                )
        speech = self.model.encode_speech(audios)
        for i, segment in enumerate(speech):
            if segment.shape[0] == 0:
                raise AudioError(
                    f"audio {i} ({audios[i].size / SAMPLE_RATE * 1000:.0f} ms) is too short: "
                    "it gives no speech embedding; give at least 0.1 s of speech"
                )
        return speech

    def requests(self, audios: Sequence[np.ndarray]) -> list[Request]:
        """One single-turn request per waveform, with the model's default prompt."""
        prompt = self.model.prompt_ids([Turn.user()])
        return [Request(list(prompt), [segment]) for segment in self.encode(audios)]

    # -- decoding --------------------------------------------------------------------------
    def stream(
        self, audios: Sequence[np.ndarray] | Sequence[Request], clock: Clock | None = None
    ) -> Iterator[Event]:
        """Answer a batch (waveforms or prepared requests); events as they are ready.

        The clock starts now unless given: pass Clock(t_end) when the input audio ended
        at perf_counter() time t_end.
        """
        clock = clock or Clock()
        requests = [r for r in audios if isinstance(r, Request)]
        if len(requests) != len(audios):
            requests = self.requests(audios)
        ids = [r.prompt_ids for r in requests]
        speech = [s for r in requests for s in r.speech]
        embeds, mask, positions = self.model.llm.embed_prompt(ids, speech, padding_side="left")
        yield from self.decode(embeds, mask, positions, clock)

    def answer(self, audios: Sequence[np.ndarray] | Sequence[Request]) -> list[Answer]:
        """Run `stream` to the end and gather one Answer per request."""
        return collect(self.stream(audios), len(audios))

    @torch.inference_mode()
    def decode(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        clock: Clock,
        cache: Any = None,
    ) -> Generator[Event, None, Decoded]:
        """The decoding loop from input embeddings [B, L, D].

        With `cache`, embeds and positions cover only the positions not cached yet and
        attention_mask covers all. Returns (as the generator's value) the Decoded state.
        With options.overlap the LLM computes token i+1 on a helper thread while this
        thread turns token i's state into units and audio.
        """
        llm, opts = self.model.llm, self.options
        batch = embeds.shape[0]
        sampling = opts.sampling.for_model(self.model.config.llm.repetition_penalty)
        select = TokenSelector(sampling, batch, embeds.device)
        stop_ids = torch.tensor(sorted(llm.stop_token_ids), device=embeds.device)
        pad_id = llm.pad_token_id if llm.pad_token_id is not None else int(stop_ids[0])
        texts = [Detokenizer(llm.tokenizer) for _ in range(batch)]
        alive = torch.ones(batch, dtype=torch.bool, device=embeds.device)  # [B]
        ends: list[tuple[int, int, str]] = []  # (step, request, reason), in step order
        out = llm(embeds, attention_mask, positions, past_key_values=cache, use_cache=True)
        with self._speech_path(batch, clock) as speech, StepRunner(opts.overlap) as runner:
            for step in range(opts.max_new_tokens):
                logits, states = out.logits[:, -1], out.hidden[:, -1]  # [B, V], [B, D]
                tokens = select(logits).masked_fill(~alive, pad_id)  # [B]
                stopped = alive & torch.isin(tokens, stop_ids)  # [B]
                if opts.ignore_eos:
                    stopped.zero_()
                finals = stopped | (alive & (step + 1 == opts.max_new_tokens))
                word_starts = [False] * batch
                for b in alive.nonzero().flatten().tolist():
                    delta = texts[b].add(int(tokens[b]))
                    word_starts[b] = delta[:1].isspace()
                    yield TextDelta(b, clock.ms(), delta, (int(tokens[b]),))
                was_alive, alive = alive.tolist(), alive & ~finals
                if alive.any():
                    attention_mask = torch.cat(
                        [attention_mask, attention_mask.new_ones(batch, 1)], 1
                    )
                    positions = positions[:, -1:] + 1  # [B, 1]
                    following = runner.submit(self._step, tokens, attention_mask, positions, out)
                ends.extend(
                    (step, b, "stop" if stopped[b] else "length")
                    for b in finals.nonzero().flatten().tolist()
                )
                if speech is not None:
                    inputs = self.model.decoder_inputs(states, tokens)  # [B, Din]
                    yield from speech.step(inputs, was_alive, word_starts, finals.tolist())
                yield from self._ends(ends, speech, clock)
                if not alive.any():
                    break
                if speech is None:
                    out = following.result()
                else:
                    out = yield from speech.wait(following)  # events arrive meanwhile
                    yield from self._ends(ends, speech, clock)
            if speech is not None:
                yield from speech.finish()
                yield from self._ends(ends, speech, clock)
        return Decoded([t.ids for t in texts], out.past_key_values, attention_mask)

    @staticmethod
    def _ends(ends: list[tuple[int, int, str]], speech, clock: Clock) -> Iterator[End]:
        """End events of the requests whose last step's speech is out; `ends` shrinks."""
        done = math.inf if speech is None else speech.done_steps
        while ends and ends[0][0] < done:
            _, b, reason = ends.pop(0)
            yield End(b, clock.ms(), reason)

    def _step(
        self, tokens: torch.Tensor, attention_mask, positions, previous: LLMOutput
    ) -> LLMOutput:
        """One cached LLM step: feed tokens [B] at positions [B, 1]."""
        llm = self.model.llm
        return llm(
            llm.embed_tokens(tokens[:, None]),
            attention_mask,
            positions,
            past_key_values=previous.past_key_values,
            use_cache=True,
        )

    def _speech_path(self, batch: int, clock: Clock) -> SpeechPath | RemoteSpeechPath | nullcontext:
        opts = self.options
        if not opts.speech:
            return nullcontext(None)
        path_options = {
            "chunk_size": opts.chunk_size,
            "cut_at_word_ends": opts.cut_at_word_ends,
            "decoder_mode": opts.decoder_mode,
        }
        if self.speech_in_child_process:
            worker = self.speech_worker
            if worker.take(wait=opts.speech_process is True):
                return worker.path(batch, clock, opts.vocoder, **path_options)
        return SpeechPath(self.model.speech_decoder, self.vocoder, batch, clock, **path_options)
