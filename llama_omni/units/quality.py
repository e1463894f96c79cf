"""Measures of what units keep: ASR word error rate (faster-whisper) and DNSMOS (speechmos)."""

from __future__ import annotations

import functools
import re
from functools import cached_property
from pathlib import Path

import numpy as np

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize_text(text: str) -> list[str]:
    """Lower case, punctuation and hyphens to spaces, quote marks dropped: the words to score."""
    text = _NOT_WORD.sub(" ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference words) after `normalize_text`."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate in percent over all pairs (errors summed, then divided)."""
    pairs = [word_errors(r, h) for r, h in zip(references, hypotheses, strict=True)]
    return 100.0 * sum(e for e, _ in pairs) / max(1, sum(n for _, n in pairs))


class Transcriber:
    """English greedy transcription with faster-whisper on the packaged Whisper base model."""

    def __init__(self, model_dir: str | None = None, threads: int = 2):
        self.model_dir, self.threads = model_dir, threads

    @cached_property
    def _model(self):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise ImportError("ASR scoring needs faster-whisper: `pip install faster-whisper`") from None
        from llama_omni.packaged import whisper_base_dir

        return WhisperModel(str(self.model_dir or whisper_base_dir()), device="cpu",
                            compute_type="int8", cpu_threads=self.threads)

    def __call__(self, audio: np.ndarray) -> str:
        segments, _ = self._model.transcribe(np.asarray(audio, dtype=np.float32), language="en",
                                             beam_size=1, temperature=0.0,
                                             condition_on_previous_text=False,
                                             without_timestamps=True, max_new_tokens=128,
                                             vad_filter=False)
        return " ".join(s.text.strip() for s in segments)


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
        raise ImportError("DNSMOS needs speechmos: `pip install speechmos==0.0.1.1 librosa`") from None
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
