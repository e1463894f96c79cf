"""Measures of what units keep: the ASR (faster-whisper) whose transcripts every ASR-WER
of the project scores (`llama_omni.eval.wer`), and DNSMOS (speechmos)."""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path

import numpy as np


class ASR:
    """English transcription with faster-whisper, greedy and without context, so a score
    does not depend on earlier items. model_dir: a CTranslate2 Whisper directory (default
    the packaged Whisper base; large-v3 where a user has it)."""

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu",
                 compute_type: str = "int8", threads: int = 1, beam_size: int = 1):
        self.model_dir, self.device, self.compute_type = model_dir, device, compute_type
        self.threads, self.beam_size = threads, beam_size

    @cached_property
    def _model(self):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise ImportError("ASR scoring needs faster-whisper: `pip install faster-whisper`") from None
        from llama_omni.packaged import whisper_base_dir

        return WhisperModel(str(self.model_dir or whisper_base_dir()), device=self.device,
                            compute_type=self.compute_type, cpu_threads=self.threads)

    @property
    def name(self) -> str:
        return Path(self.model_dir).name if self.model_dir else "whisper-base (packaged)"

    def __call__(self, audio: np.ndarray) -> str:
        """16 kHz mono float32 -> text ("" for silence or empty audio)."""
        if len(audio) == 0:
            return ""
        segments, _ = self._model.transcribe(
            np.asarray(audio, dtype=np.float32), language="en", beam_size=self.beam_size,
            temperature=0.0, condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


def dnsmos(audio: np.ndarray, sample_rate: int = 16000) -> dict[str, float]:
    """DNSMOS P.835 (sig, bak, ovrl) and P.808 scores of one 16 kHz utterance."""
    audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    scores = _dnsmos_scorer()(audio, sample_rate, False)
    return {k: float(scores[k]) for k in ("ovrl_mos", "sig_mos", "bak_mos", "p808_mos")}


@functools.lru_cache(maxsize=1)
def _dnsmos_scorer():
    """speechmos's DNSMOS scorer with single-threaded, non-spinning ONNX sessions.

    Its own sessions use every core with spin-waiting threads, which on a shared CPU is
    many times slower than one thread.
    """
    try:
        import onnxruntime as ort
        from speechmos import dnsmos as speechmos_dnsmos
    except ImportError:
        raise ImportError("DNSMOS needs speechmos: `pip install speechmos==0.0.1.1 librosa "
                          "onnxruntime`") from None
    models = Path(speechmos_dnsmos.__file__).parent / "dnsmos_models"
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")

    def session(name: str):
        return ort.InferenceSession(str(models / name), options,
                                    providers=["CPUExecutionProvider"])

    scorer = speechmos_dnsmos.DNSMOS(str(models / "sig_bak_ovr.onnx"), str(models / "model_v8.onnx"))
    scorer.onnx_sess, scorer.p808_onnx_sess = session("sig_bak_ovr.onnx"), session("model_v8.onnx")
    return scorer
