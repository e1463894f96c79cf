"""Speech -> discrete units: features of one encoder layer, nearest k-means centroid, merge.

A units model is a directory: `units.json` ({"source", "layer", "num_units"}) and
`kmeans.safetensors` (the centroids). The shipped one is `llama_omni/weights/units-whisper-base`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_omni.configbase import ConfigBase, require
from llama_omni.units.features import FeatureExtractor, feature_extractor
from llama_omni.units.kmeans import KMeansCodebook

CONFIG_NAME = "units.json"
KMEANS_NAME = "kmeans.safetensors"
DEFAULT_UNITS_DIR = Path(__file__).resolve().parent.parent / "weights" / "units-whisper-base"


@dataclass
class UnitsConfig(ConfigBase):
    source: str = "packaged:whisper-base"  # load_encoder source, or "hubert:<dir>"
    layer: int = 4
    num_units: int = 500

    def __post_init__(self) -> None:
        require(self.num_units >= 2, f"UnitsConfig.num_units must be >= 2, got {self.num_units}")
        require(self.layer >= 0, f"UnitsConfig.layer must be >= 0, got {self.layer}")


def merge_repeats(ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame ids [N] -> (units [U], durations [U]): runs of one id become one unit + run length."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return ids, ids.copy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # [U]
    durations = np.diff(np.r_[starts, ids.size])  # [U]
    return ids[starts], durations


class UnitExtractor:
    """Audio -> frame ids, or merged units with durations (run lengths in 20 ms frames)."""

    def __init__(self, config: UnitsConfig, codebook: KMeansCodebook,
                 features: FeatureExtractor | None = None, device="cpu",
                 dtype=torch.float32):
        require(codebook.num_units == config.num_units,
                f"k-means has {codebook.num_units} centroids, units.json says {config.num_units}")
        self.config, self.codebook = config, codebook
        self.features = features or feature_extractor(config.source, config.layer, device, dtype)
        require(self.features.dim == codebook.dim,
                f"k-means centroids have dimension {codebook.dim}, but layer {config.layer} "
                f"of {config.source} gives {self.features.dim}")

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_UNITS_DIR, device="cpu",
             dtype=torch.float32) -> UnitExtractor:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no units model at {directory}: expected {CONFIG_NAME} + "
                                    f"{KMEANS_NAME} (train one with `llama-omni units train`)")
        config = UnitsConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        return cls(config, KMeansCodebook.load(directory / KMEANS_NAME), device=device,
                   dtype=dtype)

    def save(self, directory: str | Path) -> None:
        save_units_model(self.config, self.codebook, directory)

    def frame_ids(self, audio: np.ndarray) -> np.ndarray:
        """[T] 16 kHz float32 -> [N] unit id per 20 ms frame."""
        return self.codebook.assign(self.features.frames(audio)).numpy()

    def __call__(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[T] 16 kHz float32 -> (units [U], durations [U]) after merging repeats."""
        return merge_repeats(self.frame_ids(audio))


def save_units_model(config: UnitsConfig, codebook: KMeansCodebook,
                     directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    codebook.save(directory / KMEANS_NAME)
    tmp = directory / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tmp.replace(directory / CONFIG_NAME)
