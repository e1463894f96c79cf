"""The speech side of one decoding step: answer states c_i -> units -> audio chunks.

For every new text token the engine hands over c_i, the final-layer state that
predicted it. The speech decoder D turns it into units (incrementally: lambda new
positions per token on a KV cache; or, for comparison, the published way: a rerun over
the whole prefix), units accumulate per request, and whenever a chunk is ready (Omega
new units, optionally cut at a word end) the streaming vocoder turns it into audio.
A decoder with one token of lookahead gives the units of the token before the new one,
and, when a request's answer ends, those of its last token too.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from llama_omni.inference.events import AudioChunk, Clock, Event, Units
from llama_omni.inference.vocoder_stream import StreamingVocoder
from llama_omni.model.speech_decoder import SpeechDecoder

DECODER_MODES = ("incremental", "recompute")


class IncrementalUnits:
    """Units of each new token from the decoder's KV cache (lambda positions per token)."""

    def __init__(self, decoder: SpeechDecoder):
        if not decoder.is_streaming:
            raise RuntimeError("IncrementalUnits needs the decoder inside `decoder.streaming(B)`")
        self.decoder = decoder

    def __call__(self, states: torch.Tensor, finals: list[bool]) -> list[list[int]]:
        """[B, D] states of the new token -> new units per row (rows in `finals` end here)."""
        log_probs, _ = self.decoder(states[:, None, :])  # [B, lambda, K+1] (lookahead: 0 at first)
        units = self.decoder.greedy_units(log_probs)
        if self.decoder.config.lookahead and any(finals):
            last = self.decoder.units_if_ended()
            units = [u + tail if final else u for u, tail, final in zip(units, last, finals)]
        return units


class RecomputeUnits:
    """The published behaviour: run the decoder on the whole prefix again at every token.

    Because the decoder is causal, the units of the prefix never change; the new units
    are what the collapsed sequence gained (with lookahead, the last token's units wait
    until the next token or the end). Kept to test and benchmark against.
    """

    def __init__(self, decoder: SpeechDecoder, batch_size: int):
        self.decoder = decoder
        self.states: list[torch.Tensor] = []  # [B, D] per token
        self.counts = [0] * batch_size

    def __call__(self, states: torch.Tensor, finals: list[bool]) -> list[list[int]]:
        self.states.append(states)
        hidden = torch.stack(self.states, dim=1)  # [B, M, D]
        log_probs, lengths = self.decoder(hidden)  # [B, T, K+1], [B]
        if self.decoder.config.lookahead:  # the last token's units wait for its next one
            lam = self.decoder.config.upsample
            waiting = torch.tensor([0 if final else lam for final in finals], device=lengths.device)
            lengths = lengths - waiting
        units = self.decoder.greedy_units(log_probs, lengths)
        new = [row[count:] for row, count in zip(units, self.counts)]
        self.counts = [len(row) for row in units]
        return new


@dataclass
class _Track:
    """Per request: its units and how far they were handed to the vocoder."""

    units: list[int] = field(default_factory=list)
    sent: int = 0  # units given to the vocoder
    word_end: int = 0  # unit count at the last known word boundary


class SpeechPath:
    """Units and audio for a batch; use as a context manager around the decoding loop.

    chunk_size: Omega, the new units that trigger a vocoder call (None: only at the end).
    cut_at_word_ends: a chunk ends at the last word boundary (the units of the tokens
    before a token that starts a new word) instead of wherever Omega units are reached.
    """

    def __init__(
        self,
        decoder: SpeechDecoder,
        vocoder: StreamingVocoder | None,
        batch_size: int,
        clock: Clock,
        *,
        chunk_size: int | None = 40,
        cut_at_word_ends: bool = False,
        decoder_mode: str = "incremental",
    ):
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode {decoder_mode!r}: choose one of {DECODER_MODES}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size (Omega) must be >= 1 or None (inf), got {chunk_size}")
        self.decoder, self.vocoder, self.clock = decoder, vocoder, clock
        self.batch_size, self.chunk_size, self.cut_at_word_ends = (
            batch_size,
            chunk_size,
            cut_at_word_ends,
        )
        self.decoder_mode = decoder_mode
        self.tracks = [_Track() for _ in range(batch_size)]
        self.done_steps = 0  # steps whose events are out (all of them, in-process)
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        if self.decoder_mode == "incremental":
            self._stack.enter_context(self.decoder.streaming(self.batch_size))
            self.units_of = IncrementalUnits(self.decoder)
        else:
            self.units_of = RecomputeUnits(self.decoder, self.batch_size)
        if self.vocoder is not None:
            self._stack.enter_context(self.vocoder.streaming(self.batch_size))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @torch.inference_mode()
    def step(
        self,
        states: torch.Tensor,
        alive: list[bool],
        word_starts: list[bool],
        finals: list[bool],
    ) -> list[Event]:
        """Take the states [B, D] of one new token per row; return the new events.

        alive: rows still decoding (the others' outputs are ignored); word_starts: the
        token begins a new word; finals: the token is the row's last one (flush).
        """
        states = states.to(self.decoder.input_proj.weight.dtype)
        new_units = self.units_of(states, finals)
        lookahead = self.decoder.config.lookahead  # new units: the previous token's
        events: list[Event] = []
        for b in range(self.batch_size):
            if not alive[b]:
                continue
            track = self.tracks[b]
            if word_starts[b] and not lookahead:
                track.word_end = len(track.units)
            if new_units[b]:
                track.units.extend(new_units[b])
                events.append(Units(b, self.clock.ms(), tuple(new_units[b])))
            if word_starts[b] and lookahead:
                track.word_end = len(track.units)
            events.extend(self._audio(b, track, final=finals[b]))
        self.done_steps += 1
        return events

    def wait(self, future: Future | Any) -> Generator[Event, None, Any]:
        """The result of the LLM's next step (the same call as RemoteSpeechPath's)."""
        return future.result()
        yield  # a generator, like RemoteSpeechPath.wait: nothing arrives in-process

    def finish(self) -> Iterator[Event]:
        return iter(())

    def _audio(self, b: int, track: _Track, final: bool) -> list[Event]:
        if self.vocoder is None:
            return []
        if final:
            cut = len(track.units)
        elif self.chunk_size is None:
            return []
        else:
            cut = track.word_end if self.cut_at_word_ends else len(track.units)
            if cut - track.sent < self.chunk_size:
                return []
        audio = self.vocoder.push(b, track.units[track.sent : cut], final=final)
        track.sent = cut
        if len(audio) == 0:
            return []
        return [AudioChunk(b, self.clock.ms(), audio, self.vocoder.sample_rate)]
