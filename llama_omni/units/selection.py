"""Pick the encoder layer and K by a cheap resynthesis test that needs no trained vocoder.

For each (layer, K): fit k-means on training frames, then predict every held-out frame's
log-mel as the mean log-mel of its unit over the training frames (a lookup-table
"vocoder" without context), turn it into audio with Griffin-Lim and transcribe it with
Whisper base. The ASR-WER ranks how much of the spoken content the units keep; the
unquantized log-mel through the same Griffin-Lim gives the floor of the measure.
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from llama_omni.audio import log_mel_spectrogram
from llama_omni.eval.wer import corpus_wer
from llama_omni.train.voice_corpus import Utterance
from llama_omni.units.corpus_features import CorpusFeatures
from llama_omni.units.extract import merge_repeats
from llama_omni.units.kmeans import train_kmeans
from llama_omni.units.quality import ASR

MEL_PER_FRAME = 2  # log-mel frames (10 ms) per encoder frame (20 ms)


def frame_mels(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """[n_frames, 2 * 80]: the two 10 ms log-mel frames under each 20 ms encoder frame."""
    mel = log_mel_spectrogram(audio, 80).numpy().T  # [T, 80]
    need = n_frames * MEL_PER_FRAME
    mel = np.pad(mel, ((0, max(0, need - len(mel))), (0, 0)), mode="edge")[:need]
    return mel.reshape(n_frames, -1)


def griffin_lim(frames: np.ndarray) -> np.ndarray:
    """[N, 160] whisper-scaled log-mel -> 16 kHz audio by Griffin-Lim (librosa).

    The mel filters are inverted by their pseudo-inverse (librosa's exact NNLS inversion is
    far slower and changes nothing that matters for a ranking).
    """
    import librosa

    log_mel = frames.reshape(-1, 80).T  # [80, 2N]
    power = 10.0 ** (4.0 * log_mel - 4.0)  # undo whisper's (log10 + 4) / 4
    basis = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)  # [80, 201]
    magnitude = np.sqrt(np.maximum(np.linalg.pinv(basis) @ power, 0.0))  # [201, 2N]
    audio = librosa.griffinlim(magnitude, n_iter=32, hop_length=160, n_fft=400)
    return (0.9 * audio / max(1e-6, np.abs(audio).max())).astype(np.float32)


def compare(root, features: CorpusFeatures, train: list[Utterance], dev: list[Utterance],
            candidates: list[tuple[int, int]], fit_frames: int = 100_000,
            seed: int = 0) -> list[dict]:
    """One row per (layer, K) plus the unquantized floor: ASR-WER and merged units per second."""
    asr = ASR(threads=2)
    audio = {u.id: sf.read(u.wav_path(root), dtype="float32")[0] for u in train + dev}
    n = {u.id: features.rows[u.id][1] - features.rows[u.id][0] for u in train + dev}
    mels = {i: frame_mels(audio[i], n[i]) for i in tqdm(audio, desc="log-mel")}
    texts = [u.text for u in dev]
    floor = [asr(griffin_lim(mels[u.id])) for u in tqdm(dev, desc="floor")]
    rows = [dict(layer=None, k=None, gl_wer=corpus_wer(texts, floor))]
    for layer, k in candidates:
        data = features.layer(layer)
        codebook = train_kmeans(features.sample(layer, [u.id for u in train], fit_frames, seed),
                                k, seed=seed, n_init=1, max_iter=30)

        def ids_of(utt_id: str) -> np.ndarray:
            a, b = features.rows[utt_id]
            return codebook.assign(torch.from_numpy(np.asarray(data[a:b], np.float32))).numpy()

        table = np.zeros((k, MEL_PER_FRAME * 80))
        counts = np.zeros(k)
        for u in train:
            ids = ids_of(u.id)
            np.add.at(table, ids, mels[u.id])
            np.add.at(counts, ids, 1)
        table /= np.maximum(counts, 1)[:, None]
        dev_ids = [ids_of(u.id) for u in dev]
        hyps = [asr(griffin_lim(table[ids])) for ids in tqdm(dev_ids, desc=f"L{layer} K{k}")]
        units = sum(len(merge_repeats(ids)[0]) for ids in dev_ids)
        rows.append(dict(layer=layer, k=k, gl_wer=corpus_wer(texts, hyps),
                         units_per_s=units / (sum(len(i) for i in dev_ids) / 50),
                         used=int((counts > 0).sum())))
        print(rows[-1], flush=True)
    return rows
