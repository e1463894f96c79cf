"""End-of-turn detection with Silero VAD (the Realtime API's "server_vad" mode).

The detector reads a session's 16 kHz input as it arrives, in Silero's 512-sample
(32 ms) frames, and reports where speech started (minus the prefix padding) and where
it ended once `silence_ms` of silence followed. The caller commits the audio between
the two as the user's turn and, when speech starts during an answer, cancels the
answer (barge-in). Each session gets its own ONNX model instance: the model carries
the stream's recurrent state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llama_omni.audio import SAMPLE_RATE
from llama_omni.serve.sessions import TurnDetection

FRAME = 512  # samples per Silero VAD step at 16 kHz


def _silero():
    """Import silero_vad lazily; its import sets torch's thread count to 1, undone here."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
    except ImportError as err:
        raise RuntimeError(
            "server-side turn detection needs silero-vad: pip install silero-vad==6.2.3"
        ) from err
    finally:
        torch.set_num_threads(threads)
    return silero_vad


@dataclass(frozen=True)
class SpeechEdge:
    """kind "start" or "stop" at a sample index counted from the detector's first input."""

    kind: str
    sample: int

    @property
    def ms(self) -> int:
        return self.sample * 1000 // SAMPLE_RATE


class TurnDetector:
    def __init__(self, settings: TurnDetection):
        silero = _silero()
        self.settings = settings
        self._vad = silero.VADIterator(
            silero.load_silero_vad(onnx=True),
            threshold=settings.threshold,
            sampling_rate=SAMPLE_RATE,
            min_silence_duration_ms=settings.silence_ms,
            speech_pad_ms=settings.prefix_padding_ms,
        )
        self._rest = np.zeros(0, dtype=np.float32)  # samples short of a whole frame
        self.position = 0  # samples fed to the model so far
        self.received = 0  # samples given to `feed` so far (position + a partial frame)
        self.speaking = False

    def feed(self, audio: np.ndarray) -> list[SpeechEdge]:
        """New 16 kHz samples -> the speech starts and stops they complete."""
        self.received += len(audio)
        data = np.concatenate([self._rest, audio.astype(np.float32, copy=False)])
        whole = len(data) // FRAME * FRAME
        self._rest = data[whole:]
        edges = []
        with torch.inference_mode():
            for frame in data[:whole].reshape(-1, FRAME):
                found = self._vad(torch.from_numpy(frame.copy()))
                self.position += FRAME
                if found and "start" in found:
                    self.speaking = True
                    edges.append(SpeechEdge("start", int(found["start"])))
                elif found and "end" in found:
                    self.speaking = False
                    edges.append(SpeechEdge("stop", min(int(found["end"]), self.position)))
        return edges
