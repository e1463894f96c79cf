"""Encoder features of a whole corpus, stored once per layer for k-means and unit extraction.

Layout of a features directory: `layer<L>.npy` ([N_total, D] float16, every utterance's
frames concatenated in manifest order) and `index.json` ({"ids": [...], "offsets": [...]}),
so utterance i owns rows offsets[i]:offsets[i+1].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from llama_omni.train.voice_corpus import Utterance
from llama_omni.units.features import WhisperLayerFeatures


def extract_corpus_features(root: Path, utterances: list[Utterance], out_dir: Path,
                            layers: list[int], source: str = "packaged:whisper-base") -> None:
    """Run the encoder once per utterance and keep the requested layers' hidden states."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = WhisperLayerFeatures(source, layer=max(layers))
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    offsets = [0]
    for utt in tqdm(utterances, desc="features", unit="utt"):
        audio, _ = sf.read(utt.wav_path(root), dtype="float32")
        hidden = extractor.all_layers(audio)  # n_layers x [N, D]
        for layer in layers:
            per_layer[layer].append(hidden[layer - 1].to(torch.float16).numpy())
        offsets.append(offsets[-1] + hidden[0].shape[0])
    for layer in layers:
        tmp = out_dir / f".layer{layer}.tmp.npy"
        np.save(tmp, np.concatenate(per_layer[layer]))
        tmp.replace(out_dir / f"layer{layer}.npy")
    index = {"source": source, "ids": [u.id for u in utterances], "offsets": offsets}
    (out_dir / "index.json").write_text(json.dumps(index))


class CorpusFeatures:
    """Read side of a features directory: per-layer arrays (memory-mapped) and row ranges."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / "index.json").read_text())
        self.ids: list[str] = index["ids"]
        self.offsets = np.asarray(index["offsets"])
        self.rows = {i: (int(a), int(b)) for i, a, b in
                     zip(self.ids, self.offsets[:-1], self.offsets[1:])}

    def layer(self, layer: int) -> np.ndarray:
        return np.load(self.directory / f"layer{layer}.npy", mmap_mode="r")  # [N_total, D]

    def sample(self, layer: int, ids: list[str], max_frames: int, seed: int) -> np.ndarray:
        """Up to max_frames random frames (float32) of the given utterances."""
        data = self.layer(layer)
        rows = np.concatenate([np.arange(*self.rows[i]) for i in ids])
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(rows, size=min(max_frames, rows.size), replace=False))
        return np.asarray(data[pick], dtype=np.float32)
