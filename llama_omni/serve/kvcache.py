"""Per-session LLM caches, merged into one decoding batch and split back afterwards.

A session's cache holds the keys/values of its conversation so far and, per position,
what it holds (a token id, or (speech uid, frame) for a speech embedding). A new turn
keeps the cache up to the longest common prefix with its prompt (the answer's
re-tokenized text may differ from the generated ids; the cache then keeps the part
before the difference) and feeds only the rest, so a turn costs its new positions, not
the whole conversation.

Rows of a batch have different cached and new lengths. Each row is laid out as
[padding | its cache | padding | its new positions]: padding is masked out and
positions are explicit, so attention and RoPE see every row as if it were alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from llama_omni.inference.engine import Decoded, Request
from llama_omni.inference.session import PositionKey, common_prefix
from llama_omni.model.llm import SpeechLLM


@dataclass
class SessionCache:
    layers: list[tuple[Tensor, Tensor]]  # per layer: keys, values [H, T, Dh]
    keys: list[PositionKey]  # [T] what each cached position holds


@dataclass
class CacheSlot:
    """Where the worker leaves a turn's cache once the turn's batch is decoded."""

    value: SessionCache | None = None


@dataclass
class BatchInputs:
    """What Engine.decode takes, plus the layout needed to split the cache per row."""

    embeds: Tensor  # [B, N, D] the positions to feed, left-padded
    attention_mask: Tensor  # [B, C + N]
    positions: Tensor  # [B, N]
    cache: DynamicCache | None  # [B, H, C, Dh] per layer, right-aligned rows
    keys: list[list[PositionKey]]  # per row, its whole prompt
    reused: list[int]  # per row, cached positions kept


def build_batch(
    llm: SpeechLLM,
    requests: list[Request],
    keys: list[list[PositionKey]],
    caches: list[SessionCache | None],
) -> BatchInputs:
    reused = [
        0 if cache is None else min(common_prefix(cache.keys, row_keys), len(row_keys) - 1)
        for cache, row_keys in zip(caches, keys, strict=True)
    ]
    rows = [
        llm.embed_prompt([r.prompt_ids], r.speech)[0][0, keep:]  # [n_b, D]
        for r, keep in zip(requests, reused, strict=True)
    ]
    batch, cached, new = len(rows), max(reused), max(len(r) for r in rows)
    first = rows[0]
    embeds = first.new_zeros(batch, new, first.shape[1])
    positions = torch.zeros(batch, new, dtype=torch.long, device=first.device)
    mask = torch.zeros(batch, cached + new, dtype=torch.long, device=first.device)
    for b, (row, keep) in enumerate(zip(rows, reused, strict=True)):
        embeds[b, new - len(row) :] = row
        positions[b, new - len(row) :] = torch.arange(keep, keep + len(row))
        mask[b, cached - keep : cached] = 1
        mask[b, cached + new - len(row) :] = 1
    cache = _merge(caches, reused, cached) if cached else None
    return BatchInputs(embeds, mask, positions, cache, keys, reused)


def _merge(caches: list[SessionCache | None], reused: list[int], length: int) -> DynamicCache:
    """Stack each row's first `reused` cached positions, right-aligned to `length`."""
    template = next(c for c in caches if c is not None)
    layers = []
    for layer, (k0, v0) in enumerate(template.layers):
        keys = k0.new_zeros(len(caches), k0.shape[0], length, k0.shape[2])  # [B, H, C, Dh]
        values = v0.new_zeros(len(caches), v0.shape[0], length, v0.shape[2])
        for b, (cache, keep) in enumerate(zip(caches, reused, strict=True)):
            if keep:
                k, v = cache.layers[layer]
                keys[b, :, length - keep :] = k[:, :keep]
                values[b, :, length - keep :] = v[:, :keep]
        layers.append((keys, values))
    return DynamicCache(layers)


def split_row(decoded: Decoded, batch: BatchInputs, row: int) -> SessionCache:
    """Row `row`'s conversation cache after decoding: prompt + answer but its last token."""
    answer = decoded.token_ids[row]
    keys = batch.keys[row] + answer[:-1]
    layers = decoded.cache.layers
    length = layers[0].keys.shape[-2]
    real = decoded.attention_mask[row, :length].nonzero().flatten()[: len(keys)]
    return SessionCache(
        [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in layers], keys
    )
