"""K-means codebooks: training (scikit-learn), our file format, and textless-style joblib files.

A codebook is just its centroids [K, D]; assigning a frame is a nearest-centroid search.
Files: ours is `kmeans.safetensors` ({"centroids": [K, D] float32}); the usual files of
fairseq / textlesslib are joblib pickles of a scikit-learn (MiniBatch)KMeans object.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class KMeansCodebook:
    """Nearest-centroid assignment of [N, D] features to K unit ids."""

    def __init__(self, centroids: torch.Tensor | np.ndarray):
        centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        if centroids.dim() != 2 or centroids.shape[0] < 2:
            raise ValueError(f"centroids must be [K >= 2, D], got {tuple(centroids.shape)}")
        self.centroids = centroids.contiguous()  # [K, D]
        self._norms = (self.centroids ** 2).sum(dim=1)  # [K]

    @property
    def num_units(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def assign(self, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """[N, D] -> [N] int64 ids of the nearest centroid (squared Euclidean distance)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        out = []
        for start in range(0, features.shape[0], batch):
            x = features[start:start + batch].float()  # [n, D]
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
            dist = self._norms[None, :] - 2.0 * x @ self.centroids.T  # [n, K]
            out.append(dist.argmin(dim=1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"centroids": self.centroids}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, trust_pickle: bool = False) -> KMeansCodebook:
        """Our `.safetensors` file, or a joblib/pickle scikit-learn KMeans (needs trust_pickle)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"k-means file not found: {path}")
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            if "centroids" not in tensors:
                raise ValueError(f"{path} has no 'centroids' tensor (found {sorted(tensors)})")
            return cls(tensors["centroids"])
        return cls(_sklearn_centroids(path, trust_pickle))


def _sklearn_centroids(path: Path, trust_pickle: bool) -> np.ndarray:
    """`cluster_centers_` of a pickled scikit-learn KMeans (fairseq's `*.bin` / `km.bin`)."""
    if not trust_pickle:
        raise ValueError(
            f"{path} is a pickle (joblib) k-means file: loading it can run arbitrary code. "
            "If it comes from a source you trust (e.g. fairseq's mHuBERT km1000 file), pass "
            "trust_pickle=True (CLI: --trust-pickle)."
        )
    import joblib

    with warnings.catch_warnings():  # version-mismatch warnings of old sklearn pickles
        warnings.simplefilter("ignore")
        model = joblib.load(path)
    centers = getattr(model, "cluster_centers_", None)
    if centers is None:
        raise ValueError(f"{path} holds a {type(model).__name__}, not a fitted scikit-learn "
                         "KMeans (no cluster_centers_)")
    return np.asarray(centers, dtype=np.float32)


def train_kmeans(features: np.ndarray | torch.Tensor, k: int, seed: int = 0,
                 batch_size: int = 10000, max_iter: int = 30, n_init: int = 1) -> KMeansCodebook:
    """Fit MiniBatchKMeans (k-means++ init) on [N, D] features, as fairseq's HuBERT recipe."""
    from sklearn.cluster import MiniBatchKMeans

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"need [N >= k, D] features to fit {k} clusters, got {x.shape}")
    model = MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=batch_size,
                            max_iter=max_iter, n_init=n_init, random_state=seed,
                            max_no_improvement=10, compute_labels=False)
    model.fit(x)
    return KMeansCodebook(model.cluster_centers_)
