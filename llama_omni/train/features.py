"""Content-keyed tensor cache: frozen-encoder features (and stage-2 LLM states).

Frozen parts give the same output for the same input, so their outputs are computed once
and stored. An entry's key is a hash of its input's content; the cache namespace is a
hash of the frozen weights and config that produced it. Changing an audio file changes
its key, changing the encoder changes the namespace: a stale entry is never read.
Entries are single safetensors files written atomically (temp file + rename), so a
killed run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from llama_omni.audio import N_SAMPLES, SAMPLE_RATE, AudioError, load_audio
from llama_omni.model.encoder import EncoderConfig, WhisperEncoder, encode_audio

DIGEST_SIZE = 16


def file_digest(path: str | Path) -> str:
    """Hash of a file's bytes (not its name or time stamp)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_digest(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=DIGEST_SIZE).hexdigest()


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of named tensors' names, shapes, dtypes and values (a weight fingerprint)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


class TensorCache:
    """Files `root/<namespace>/<key[:2]>/<key>.safetensors`, each a dict of tensors."""

    def __init__(self, root: str | Path, namespace: str):
        self.root = Path(root) / namespace

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"cache entry {path} is missing; rerun to recompute it")
        return load_file(path)

    def shape(self, key: str, name: str) -> list[int]:
        with safe_open(self.path(key), "pt") as f:
            return list(f.get_slice(name).get_shape())

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def encoder_namespace(encoder: WhisperEncoder, config: EncoderConfig, dtype: torch.dtype) -> str:
    """Identity of the feature extractor: weights, framing config and storage dtype."""
    weights = tensors_digest(sorted(encoder.state_dict().items()))
    return "features-" + text_digest(weights, json.dumps(config.to_dict(), sort_keys=True), str(dtype))


def cache_encoder_features(
    encoder: WhisperEncoder,
    config: EncoderConfig,
    audio: list[tuple[str, Path]],
    cache: TensorCache,
    *,
    batch_size: int,
    dtype: torch.dtype,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[Path, str]:
    """Encode every (item id, audio path) whose features are not cached yet.

    Returns the cache key of every path. With shard=(rank, world), this process encodes
    only its share of the missing files (the caller waits for the others afterwards).
    """
    keys = {path: file_digest(path) for _, path in tqdm(
        audio, desc="hashing audio", unit="file", disable=not progress, leave=False)}
    unique: dict[str, tuple[str, Path]] = {}
    for item_id, path in audio:
        unique.setdefault(keys[path], (item_id, path))
    rank, world = shard
    # Split the full list, not the missing part: every process must agree on the split
    # even while the others are already writing their entries.
    mine = [(k, v) for k, v in sorted(unique.items())[rank::world] if not cache.has(k)]
    mine.sort(key=lambda entry: entry[1][1].stat().st_size)  # similar lengths share a batch
    bar = tqdm(total=len(mine), desc="encoding speech", unit="file", disable=not progress)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        waves = [_load(item_id, path, config) for _, (item_id, path) in chunk]
        features, lengths = encode_audio(encoder, waves, config)  # [B, N, De], [B]
        for i, (key, _) in enumerate(chunk):
            cache.save(key, {"features": features[i, : int(lengths[i])].to(dtype)})  # [N_i, De]
        bar.update(len(chunk))
    bar.close()
    return keys


def _load(item_id: str, path: Path, config: EncoderConfig) -> np.ndarray:
    try:
        wave = load_audio(path)
    except (AudioError, FileNotFoundError) as err:
        raise AudioError(f"item {item_id!r}: cannot read its audio {path}: {err}") from err
    if not config.pad_to_30s and len(wave) > N_SAMPLES:
        raise AudioError(
            f"item {item_id!r}: {path} lasts {len(wave) / SAMPLE_RATE:.1f} s, more than the "
            f"encoder's {N_SAMPLES // SAMPLE_RATE} s; cut it or drop the item from the manifest"
        )
    return wave
