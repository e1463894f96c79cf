"""The vocoder's output post-filter: notches at the iSTFT head's frame rate (end of stage V).

An iSTFT output head overlap-adds one short frame every `istft_hop` samples. Whatever
consecutive frames share repeats at that rate and is heard as steady tones at multiples
of sample_rate / istft_hop (1, 2, ..., 7 kHz for the 16 kHz, hop-16 default vocoder:
35-56 dB above their neighbourhood in its silences). Second-order notches of one -3 dB
width at those frequencies remove them (a constant width rather than a constant Q keeps
the upper harmonics of the voice between the notches). The filter is causal, so a stream
filtered chunk by chunk (its state carried in `NotchState`) equals the whole signal
filtered at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import iirnotch, sosfilt, tf2sos

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
