"""Training examples for the unit vocoder: (frame-level unit ids, aligned wave segment).

Units run at 50 frames/s and the vocoder makes `hop` = 320 samples per frame, so frame i
of an utterance covers samples [320 i, 320 (i + 1)). Every batch is a pure function of
(seed, step): resuming at a step needs no sampler state and gives the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from llama_omni.train.voice_corpus import read_manifest
from llama_omni.units.extract import merge_repeats


@dataclass
class Batch:
    units: torch.Tensor  # [B, F] frame-level unit ids
    wave: torch.Tensor  # [B, 1, F * hop] float32
    dur_units: torch.Tensor  # [B, U] merged units of whole utterances (0-padded)
    dur_targets: torch.Tensor  # [B, U] their run lengths in frames (0 = padding)


def save_frame_units(path: Path, frame_ids: dict[str, np.ndarray]) -> None:
    """One npz with an int16 array of frame ids per utterance id."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **{k: v.astype(np.int16) for k, v in frame_ids.items()})
    tmp.replace(path)


def load_frame_units(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k].astype(np.int64) for k in data.files}


class VocoderData:
    """All training audio (int16, in memory) with its frame-level units.

    Utterances missing from the units file are skipped (counted in `skipped`), so training
    can start on the part of a corpus whose units are extracted.
    """

    def __init__(self, corpus: str | Path, units_file: str | Path, split: str = "train",
                 hop: int = 320, max_duration_units: int = 200):
        corpus = Path(corpus)
        frame_units = load_frame_units(Path(units_file))
        self.hop, self.max_duration_units = hop, max_duration_units
        self.ids, self.units, self.waves = [], [], []
        utterances = read_manifest(corpus, split)
        self.skipped = sum(u.id not in frame_units for u in utterances)  # not extracted yet
        for utt in tqdm(utterances, desc=f"load {split}", unit="utt"):
            if utt.id not in frame_units:
                continue
            wave, _ = sf.read(utt.wav_path(corpus), dtype="int16")
            units = frame_units[utt.id]
            self.ids.append(utt.id)
            self.units.append(units)
            self.waves.append(np.pad(wave, (0, max(0, len(units) * hop - len(wave)))))
        if not self.ids:
            raise ValueError(f"none of the {split} utterances of {corpus} has units in "
                             f"{units_file}: extract them with `llama-omni units extract`")

    def batch(self, seed: int, step: int, batch_size: int, frames: int) -> Batch:
        """Random segments of `frames` unit frames, drawn by an RNG keyed on (seed, step)."""
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(len(self.ids), size=batch_size)
        units, waves, merged = [], [], []
        for i in picks:
            u, w = self.units[i], self.waves[i]
            start = int(rng.integers(max(1, len(u) - frames + 1)))
            seg = np.pad(u[start:start + frames], (0, max(0, start + frames - len(u))), mode="edge")
            units.append(seg)
            wav = w[start * self.hop:(start + frames) * self.hop].astype(np.float32) / 32768.0
            waves.append(np.pad(wav, (0, frames * self.hop - len(wav))))
            # Duration targets: the utterance's first units (a prefix of frames is enough
            # to yield max_duration_units runs; merging all of a long utterance is waste).
            merged.append(merge_repeats(u[:self.max_duration_units * 4]))
        return Batch(
            units=torch.from_numpy(np.stack(units)),
            wave=torch.from_numpy(np.stack(waves))[:, None, :],
            dur_units=_pad([m[0][:self.max_duration_units] for m in merged]),
            dur_targets=_pad([m[1][:self.max_duration_units] for m in merged]),
        )


def _pad(rows: list[np.ndarray]) -> torch.Tensor:
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)
