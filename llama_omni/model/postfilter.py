"""The vocoder's output post-filters (end of stage V): notches at the iSTFT head's frame
rate, and a pitch post-filter that brings back the voice's harmonic structure.

An iSTFT output head overlap-adds one short frame every `istft_hop` samples. Whatever
consecutive frames share repeats at that rate and is heard as steady tones at multiples
of sample_rate / istft_hop (1, 2, ..., 7 kHz for the 16 kHz, hop-16 default vocoder:
35-56 dB above their neighbourhood in its silences). Second-order notches of one -3 dB
width at those frequencies remove them (a constant width rather than a constant Q keeps
the upper harmonics of the voice between the notches). The filter is causal, so a stream
filtered chunk by chunk (its state carried in `NotchState`) equals the whole signal
filtered at once. The same holds for the pitch post-filter (`PitchPostfilter`) and for
their chain (`OutputFilter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import iirnotch, sosfilt, tf2sos
from torch import nn

from llama_omni.streaming import StreamingModule


@dataclass
class NotchState:
    zi: list[np.ndarray]  # per stream: [sections, 2] filter memory


class HarmonicNotch(StreamingModule[NotchState]):
    """Notches `width_hz` wide at every multiple of `base_hz` below the Nyquist frequency."""

    def __init__(self, base_hz: float, sample_rate: int, width_hz: float):
        super().__init__()
        if not (0 < base_hz < sample_rate / 2 and 0 < width_hz < base_hz):
            raise ValueError(f"HarmonicNotch: need 0 < base_hz ({base_hz}) < sample_rate / 2 "
                             f"({sample_rate / 2}) and 0 < width_hz ({width_hz}) < base_hz")
        harmonics = np.arange(base_hz, sample_rate / 2, base_hz)  # [S] notch frequencies
        self.sos = np.concatenate(  # [S, 6] one biquad per notch, quality f / width
            [tf2sos(*iirnotch(f, f / width_hz, fs=sample_rate)) for f in harmonics])

    def _init_streaming_state(self, batch_size: int) -> NotchState:
        return NotchState([np.zeros((len(self.sos), 2)) for _ in range(batch_size)])

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """A whole signal [T] -> filtered [T] float32 (the filter starts at rest)."""
        return sosfilt(self.sos, audio).astype(np.float32)

    def push(self, index: int, audio: np.ndarray) -> np.ndarray:
        """The next samples [T] of stream `index` -> filtered [T] float32."""
        state = self.streaming_state
        out, state.zi[index] = sosfilt(self.sos, audio, zi=state.zi[index])
        return out.astype(np.float32)


@dataclass
class PitchStream:
    history: np.ndarray  # [H] the last `PitchPostfilter.history` input samples
    position: int = 0  # samples filtered so far
    previous: tuple[float, float] = (1.0, 0.0)  # (lag, gain) of the frame before
    current: tuple[float, float] = (1.0, 0.0)  # (lag, gain) of this frame


@dataclass
class PitchState:
    streams: list[PitchStream]


class PitchPostfilter(StreamingModule[PitchState]):
    """A long-term (pitch) post-filter, as speech codecs use after a low-rate decoder.

    The vocoder keeps the voice's fundamental but smears its upper harmonics into noise
    (the units carry little pitch). A comb y[n] = sum_k g^k x[n - k T] / sum_k g^k
    (k = 0..taps), with T the pitch period, passes the harmonics of 1 / T and lowers what
    lies between them. Every `frame` samples the lag T is the best normalized
    autocorrelation lag of the `window` input samples before the frame (causal: only past
    input), searched between the periods of `max_hz` and `min_hz`, and the gain is `gain`
    scaled by how voiced that window is (correlation `voicing` -> 0, 1 -> full gain); the
    outputs of the previous and the new (T, g) are cross-faded over the frame, so no clicks.
    Frames sit on a fixed grid from the first sample, so a stream filtered chunk by chunk
    equals the whole signal filtered at once.
    """

    def __init__(self, sample_rate: int, gain: float, frame_ms: float = 10.0,
                 window_ms: float = 24.0, min_hz: float = 60.0, max_hz: float = 400.0,
                 voicing: float = 0.7, taps: int = 3):
        super().__init__()
        if not (0 < gain <= 1 and taps >= 1 and 0 < min_hz < max_hz < sample_rate / 2
                and 0 <= voicing < 1):
            raise ValueError(f"PitchPostfilter: need 0 < gain ({gain}) <= 1, taps ({taps}) "
                             f">= 1, 0 < min_hz ({min_hz}) < max_hz ({max_hz}) < "
                             f"sample_rate / 2, 0 <= voicing ({voicing}) < 1")
        self.gain, self.voicing, self.taps = gain, voicing, taps
        self.frame = round(sample_rate * frame_ms / 1000)
        self.window = round(sample_rate * window_ms / 1000)
        self.lags = np.arange(int(sample_rate / max_hz), int(np.ceil(sample_rate / min_hz)) + 1)
        self.history = self.window + taps * int(self.lags[-1])

    def _new_stream(self) -> PitchStream:
        return PitchStream(np.zeros(self.history, np.float32))

    def _init_streaming_state(self, batch_size: int) -> PitchState:
        return PitchState([self._new_stream() for _ in range(batch_size)])

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """A whole signal [T] -> filtered [T] float32 (the filter starts at rest)."""
        return self._run(self._new_stream(), audio)

    def push(self, index: int, audio: np.ndarray) -> np.ndarray:
        """The next samples [T] of stream `index` -> filtered [T] float32."""
        return self._run(self.streaming_state.streams[index], audio)

    def _run(self, stream: PitchStream, audio: np.ndarray) -> np.ndarray:
        h = self.history
        x = np.concatenate([stream.history, np.asarray(audio, np.float32)])  # [H + T]
        out = np.empty(len(audio), np.float32)
        done = 0
        while done < len(audio):
            offset = (stream.position + done) % self.frame  # where in its frame this sample is
            if offset == 0:  # a new frame: its lag from the input before it
                stream.previous, stream.current = stream.current, self._pitch(x[: h + done])
            n = min(self.frame - offset, len(audio) - done)
            fade = 1.0 - (np.arange(offset, offset + n) + 0.5) / self.frame  # [n] old -> new
            at = h + done  # where these n samples start in x
            old = self._comb(x, at, n, *stream.previous)
            new = self._comb(x, at, n, *stream.current)
            out[done:done + n] = fade * old + (1.0 - fade) * new
            done += n
        stream.history = x[-h:]
        stream.position += len(audio)
        return out

    def _comb(self, x: np.ndarray, at: int, n: int, lag: float, gain: float) -> np.ndarray:
        """The comb's output for x[at:at + n]."""
        if gain == 0.0:  # unvoiced: the input passes unchanged
            return x[at:at + n]
        weights = gain ** np.arange(self.taps + 1)  # [K + 1] 1, g, g^2, ...
        return sum(w * _delayed(x, at, n, k * lag) for k, w in enumerate(weights)) / weights.sum()

    def _pitch(self, past: np.ndarray) -> tuple[float, float]:
        """(lag, gain) from the last `window` samples of `past` and the lags before them.
        The lag is refined between whole samples (a parabola through the correlation
        peak): voice periods are not whole samples, and with a rounded lag the taps drift
        out of phase at the upper harmonics."""
        w = self.window
        past = past[-(w + int(self.lags[-1])):]  # [W + max lag] all that the search reads
        current = past[-w:]  # [W]
        starts = len(past) - w - self.lags  # [L] start of each lagged window
        dots = np.correlate(past, current, "valid")[starts]  # [L] <lagged window, current>
        power = np.concatenate([[0.0], np.cumsum(past.astype(np.float64) ** 2)])
        energy = float(current @ current) * (power[starts + w] - power[starts])  # [L]
        corr = dots / np.sqrt(np.maximum(energy, 1e-12))  # [L]
        # A multiple of the period correlates as well as the period itself: take the
        # shortest lag that comes within 5 % of the best (its comb keeps every harmonic).
        best = int(np.argmax(corr >= 0.95 * corr.max()))
        while best + 1 < len(corr) and corr[best + 1] > corr[best]:
            best += 1  # climb to that lag's peak
        shift = 0.0
        if 0 < best < len(corr) - 1:
            left, mid, right = corr[best - 1:best + 2]
            curvature = left - 2 * mid + right
            if curvature < 0:
                shift = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
        voiced = np.clip((corr[best] - self.voicing) / (1.0 - self.voicing), 0.0, 1.0)
        return float(self.lags[best] + shift), float(self.gain * voiced)


def _delayed(x: np.ndarray, at: int, n: int, delay: float) -> np.ndarray:
    """x[at - delay : at - delay + n] for a fractional delay: cubic Lagrange interpolation
    over the 4 samples around each point."""
    whole = int(np.floor(delay))
    base = at - whole  # x[base - d + i] for i < n, d in [0, 1)
    t = whole - delay  # -d: position relative to base
    if t == 0.0:
        return x[base:base + n]
    c = (-t * (t - 1) * (t - 2) / 6, (t + 1) * (t - 1) * (t - 2) / 2,
         -(t + 1) * t * (t - 2) / 2, (t + 1) * t * (t - 1) / 6)  # at -1, 0, 1, 2 from base
    return sum(ci * x[base + j:base + j + n] for ci, j in zip(c, (-1, 0, 1, 2)))


class OutputFilter(StreamingModule[int]):
    """Filters applied one after the other; each child keeps its own stream state."""

    def __init__(self, stages: list[HarmonicNotch | PitchPostfilter]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def _init_streaming_state(self, batch_size: int) -> int:
        return batch_size  # the state lives in the stages

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """A whole signal [T] -> filtered [T] float32 (every filter starts at rest)."""
        for stage in self.stages:
            audio = stage.apply(audio)
        return audio

    def push(self, index: int, audio: np.ndarray) -> np.ndarray:
        """The next samples [T] of stream `index` -> filtered [T] float32."""
        for stage in self.stages:
            audio = stage.push(index, audio)
        return audio
