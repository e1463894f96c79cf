"""Chunked vocoding of a growing unit sequence (stage V while the answer streams).

Two modes:
- "independent" (the paper's): every chunk of units is vocoded on its own, durations
  included. Cheap, but each chunk starts and ends without context: audible seams at
  small chunk sizes.
- "seamless" (default): the stream keeps every unit and its duration, and vocodes each
  new stretch of frames together with `left_context_frames` frames already played. The
  last `lookahead_frames` frames are computed but withheld; the next call recomputes them
  with more right context and, over their first `crossfade_frames`, blends from the
  withheld estimate (continuous with what was played) into the new one. Durations are
  fixed once, with the duration predictor's full context: the last `reach` units of a
  chunk wait for their right neighbours. When the context and the lookahead cover the
  generator's receptive field the result equals whole-utterance vocoding (tested); the
  withheld frames delay the end of a chunk's audio, not its start (unless the chunk is
  shorter than the lookahead).

Use it as a streaming module: `with stream.streaming(n):` gives n independent streams,
`stream.push(i, units)` returns the new audio of stream i, `final=True` flushes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from llama_omni.configbase import require
from llama_omni.model.vocoder import UnitVocoder
from llama_omni.streaming import StreamingModule

VOCODER_MODES = ("seamless", "independent")


@dataclass(frozen=True)
class VocoderStreamOptions:
    mode: str = "seamless"
    left_context_frames: int = 16  # frames already played, fed again as left context
    lookahead_frames: int = 8  # frames withheld until more units arrive
    crossfade_frames: int = 2  # start of the withheld frames blended old -> new

    def __post_init__(self) -> None:
        require(
            self.mode in VOCODER_MODES, f"vocoder mode {self.mode!r}: choose one of {VOCODER_MODES}"
        )
        require(
            min(self.left_context_frames, self.lookahead_frames, self.crossfade_frames) >= 0,
            "left_context_frames, lookahead_frames and crossfade_frames must be >= 0",
        )
        require(
            self.crossfade_frames <= self.lookahead_frames,
            f"crossfade_frames ({self.crossfade_frames}) must not exceed lookahead_frames "
            f"({self.lookahead_frames}): only withheld frames can be cross-faded",
        )


@dataclass
class _Stream:
    units: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)  # fixed so far (a prefix of units)
    frames_done: int = 0  # frames whose audio has been returned
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # withheld estimate


@dataclass
class VocoderStreamState:
    batch_size: int
    streams: list[_Stream]


class StreamingVocoder(StreamingModule[VocoderStreamState]):
    """A UnitVocoder fed unit chunks; each call returns only the new samples."""

    def __init__(self, vocoder: UnitVocoder, options: VocoderStreamOptions | None = None):
        super().__init__()
        self.vocoder = vocoder.eval()
        self.options = options or VocoderStreamOptions()
        cfg = vocoder.config
        # Two 'same' convolutions of kernel k: a duration depends on k - 1 units each side.
        self.reach = cfg.dur_kernel - 1 if vocoder.dur_predictor is not None else 0
        self.hop = cfg.hop_length
        self.sample_rate = cfg.sample_rate
        self.postfilter = vocoder.make_postfilter()  # a child: its state is this stream's

    def _init_streaming_state(self, batch_size: int) -> VocoderStreamState:
        return VocoderStreamState(batch_size, [_Stream() for _ in range(batch_size)])

    @torch.inference_mode()
    def push(self, index: int, units: list[int], final: bool = False) -> np.ndarray:
        """Add units to stream `index`; return its new audio [T] float32 (maybe empty)."""
        if self.options.mode == "independent":
            audio = self._independent(units)
        else:
            audio = self._seamless(self.streaming_state.streams[index], units, final)
        if self.postfilter is None or not len(audio):
            return audio
        return self.postfilter.push(index, audio)  # the filter's state runs on with the stream

    def _seamless(self, stream: _Stream, units: list[int], final: bool) -> np.ndarray:
        stream.units.extend(units)
        n_fixed = len(stream.units) if final else len(stream.units) - self.reach
        self._fix_durations(stream, n_fixed)
        total = sum(stream.durations)
        emit_to = total if final else max(stream.frames_done, total - self.options.lookahead_frames)
        if emit_to == stream.frames_done:
            return _empty()
        return self._vocode_until(stream, total, emit_to)

    def _independent(self, units: list[int]) -> np.ndarray:
        if not units:
            return _empty()
        ids = torch.tensor([units], device=self.vocoder.device)  # [1, U]
        return self.vocoder(ids)[0, 0].float().cpu().numpy()

    def _fix_durations(self, stream: _Stream, n_fixed: int) -> None:
        """Predict durations of units[len(durations):n_fixed] with `reach` units each side."""
        done = len(stream.durations)
        if n_fixed <= done:
            return
        if self.vocoder.dur_predictor is None:
            stream.durations.extend([1] * (n_fixed - done))
            return
        lo, hi = max(0, done - self.reach), min(len(stream.units), n_fixed + self.reach)
        window = torch.tensor([stream.units[lo:hi]], device=self.vocoder.device)  # [1, W]
        predicted = self.vocoder.predict_durations(window)[0]  # [W]
        stream.durations.extend(predicted[done - lo : n_fixed - lo].tolist())

    def _vocode_until(self, stream: _Stream, total: int, emit_to: int) -> np.ndarray:
        """Vocode frames [frames_done - context, total); return samples up to emit_to."""
        start = max(0, stream.frames_done - self.options.left_context_frames)
        n_units = len(stream.durations)
        ids = torch.tensor(stream.units[:n_units], device=self.vocoder.device)  # [U]
        durations = torch.tensor(stream.durations, device=self.vocoder.device)  # [U]
        unit_of_frame = ids.repeat_interleave(durations)[start:total]  # [F]
        x = self.vocoder.dict(unit_of_frame).T[None]  # [1, C, F]
        wave = self.vocoder.generate_from_embeddings(x)[0, 0].float().cpu().numpy()  # [F * hop]
        new = wave[(stream.frames_done - start) * self.hop :]
        _crossfade_into(new, stream.tail[: self.options.crossfade_frames * self.hop])
        cut = (emit_to - stream.frames_done) * self.hop
        stream.tail = new[cut:].copy()
        stream.frames_done = emit_to
        return new[:cut].copy()


def _crossfade_into(new: np.ndarray, previous: np.ndarray) -> None:
    """Blend the start of `new` from `previous` (an older estimate of the same samples)."""
    n = min(len(previous), len(new))
    if n == 0:
        return
    ramp = 0.5 - 0.5 * np.cos(math.pi * (np.arange(n) + 0.5) / n)  # 0 -> 1, raised cosine
    new[:n] = previous[:n] * (1 - ramp) + new[:n] * ramp


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)
