"""Measures of what units keep: ASR word error rate (faster-whisper, the same ASR and
word normalization as the evaluation harness) and DNSMOS (speechmos)."""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path

import numpy as np

from llama_omni.data.normalize import normalize_english


def words_to_score(text: str) -> list[str]:
    """The words that ASR-WER compares (`normalize_english`: the evaluation harness's)."""
    return normalize_english(text).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference words) after `words_to_score`."""
    ref, hyp = words_to_score(reference), words_to_score(hypothesis)
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


def median_wer(references: list[str], hypotheses: list[str]) -> float:
    """Median over pairs of each pair's WER in percent: one transcript that loops (Whisper
    can repeat a phrase far past the audio) cannot dominate it as it can `corpus_wer`."""
    rates = [100.0 * e / n for e, n in (word_errors(r, h) for r, h in
                                        zip(references, hypotheses, strict=True)) if n]
    return float(np.median(rates)) if rates else 0.0


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
