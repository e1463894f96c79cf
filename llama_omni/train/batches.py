"""Datasets over cached tensors, their collation, and the epoch-seeded batch order.

Stage 1 examples are token ids + labels + the cached encoder features of each speech
slot (+ the written conversation's ids and labels when stage 1 distills); stage 2
examples are one answer each: its cached LLM states c_1..c_M and its units.
Batches are dataclasses with `.to(device)`, which accelerate's loaders call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

from llama_omni.model.llm import LLMConfig
from llama_omni.model.prompt import IGNORE_INDEX
from llama_omni.train.data import (
    Conversation,
    DataError,
    Tokenized,
    expand_speech,
    tokenize,
    written,
)
from llama_omni.train.features import TensorCache


class Movable:
    """A batch dataclass whose tensor fields move together (accelerate's loaders call .to)."""

    def to(self, device, non_blocking: bool = False):
        moved = {
            f.name: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**moved)


@dataclass
class SpeechTextExample:
    id: str
    ids: list[int]  # with SPEECH_TOKEN_INDEX slots
    labels: list[int]  # IGNORE_INDEX outside answers, aligned with ids
    feature_keys: list[str]  # encoder-feature cache keys, one per speech slot
    length: int  # text tokens + speech positions (max_length filter, caching order)
    written: Tokenized | None = None  # the conversation with transcripts for speech


@dataclass
class SpeechTextBatch(Movable):
    features: torch.Tensor  # [S, N, De] encoder frames of all S speech slots, zero-padded
    feature_lengths: torch.Tensor  # [S]
    ids: list[list[int]]  # [B] prompt-format ids, speech slots in order
    labels: torch.Tensor  # [B, L] aligned with the embedded sequence (right padding)
    positions: int  # real (non-padding) sequence positions, for tokens per second
    written_ids: list[list[int]] | None = None  # [B] the written conversations' ids
    written_labels: torch.Tensor | None = None  # [B, Lw] their labels (right padding)


def speech_text_examples(
    conversations: list[Conversation],
    tokenizer: Any,
    llm: LLMConfig,
    feature_keys: dict[Path, str],
    features: TensorCache,
    downsample: int,
    max_length: int,
    with_written: bool = False,
    written_system_prompt: str | None = None,
) -> tuple[list[SpeechTextExample], list[str]]:
    """Tokenized examples whose features are cached; returns (kept, ids of too-long items).

    with_written: also tokenize each conversation as text (`written`), for distillation,
    under `written_system_prompt` (None: llm's own); its answer tokens must be the spoken
    version's.
    """
    written_llm = llm if written_system_prompt is None else llm.replace(
        system_prompt=written_system_prompt)
    kept, too_long = [], []
    for conversation in conversations:
        tokens = tokenize(conversation, tokenizer, llm)
        keys = [feature_keys[path] for path in conversation.audio]
        frames = [features.shape(key, "features")[0] // downsample for key in keys]
        length = len(tokens.ids) - len(keys) + sum(frames)
        if length > max_length:
            too_long.append(conversation.id)
            continue
        text = (tokenize(written(conversation, llm.instruction), tokenizer, written_llm)
                if with_written else None)
        if text is not None and _answer_tokens(text) != _answer_tokens(tokens):
            raise DataError(f"item {conversation.id!r}: its answers tokenize differently "
                            "after a written question than after a spoken one")
        kept.append(SpeechTextExample(conversation.id, tokens.ids, tokens.labels, keys, length, text))
    return kept, too_long


def _answer_tokens(tokens: Tokenized) -> list[int]:
    return [label for label in tokens.labels if label != IGNORE_INDEX]


class SpeechTextDataset(Dataset):
    def __init__(self, examples: list[SpeechTextExample], features: TensorCache):
        self.examples = examples
        self.features = features

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [e.length for e in self.examples]

    def __getitem__(self, index: int) -> tuple[SpeechTextExample, list[torch.Tensor]]:
        example = self.examples[index]
        return example, [self.features.load(key)["features"] for key in example.feature_keys]


@dataclass
class SpeechTextCollator:
    """Pads features and expands labels over speech positions (k frames -> 1 position)."""

    downsample: int

    def __call__(self, items: list[tuple[SpeechTextExample, list[torch.Tensor]]]) -> SpeechTextBatch:
        segments = [f for _, feats in items for f in feats]  # [N_s, De] each
        lengths = torch.tensor([f.shape[0] for f in segments])
        labels = []
        for example, feats in items:
            counts = [f.shape[0] // self.downsample for f in feats]
            labels.append(torch.tensor(expand_speech(example.ids, example.labels, counts)))
        written = [example.written for example, _ in items]
        written_ids = written_labels = None
        if all(w is not None for w in written):
            written_ids = [w.ids for w in written]
            written_labels = pad_sequence(  # [B, Lw]
                [torch.tensor(w.labels) for w in written], batch_first=True,
                padding_value=IGNORE_INDEX,
            )
        return SpeechTextBatch(
            features=pad_sequence(segments, batch_first=True).float(),  # [S, N, De]
            feature_lengths=lengths,
            ids=[example.ids for example, _ in items],
            labels=pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),  # [B, L]
            positions=sum(len(row) for row in labels),
            written_ids=written_ids,
            written_labels=written_labels,
        )


@dataclass
class UnitExample:
    id: str  # "<item id>/<answer index>"
    state_key: str  # cache key of the answer's LLM states
    units: list[int]


@dataclass
class UnitBatch(Movable):
    hidden: torch.Tensor  # [B, M, D] states c_i of the answer tokens, zero-padded
    lengths: torch.Tensor  # [B] answer tokens
    units: torch.Tensor  # [B, U] target units, padded with IGNORE_INDEX
    positions: int  # answer tokens in the batch


class UnitDataset(Dataset):
    def __init__(self, examples: list[UnitExample], states: TensorCache):
        self.examples = examples
        self.states = states

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.units) for e in self.examples]  # the upsampled length follows the units

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int]]:
        example = self.examples[index]
        return self.states.load(example.state_key)["states"], example.units


def collate_units(items: list[tuple[torch.Tensor, list[int]]]) -> UnitBatch:
    lengths = torch.tensor([h.shape[0] for h, _ in items])
    return UnitBatch(
        hidden=pad_sequence([h for h, _ in items], batch_first=True).float(),  # [B, M, D]
        lengths=lengths,
        units=pad_sequence([torch.tensor(u) for _, u in items], batch_first=True,
                           padding_value=IGNORE_INDEX),  # [B, U]
        positions=int(lengths.sum()),
    )


class EpochBatches(Sampler[list[int]]):
    """Shuffled micro-batches whose order depends only on (seed, epoch).

    The trainer sets `epoch` before iterating, so a resumed run sees exactly the batches
    an uninterrupted run would (the data position is then a count of batches to skip).

    With `lengths` (data.group_by_length), the shuffled examples are taken in groups of
    GROUP micro-batches, each group sorted by length and cut into micro-batches, and the
    micro-batches shuffled again: batches stay random but hold examples of similar
    length, so little compute goes to padding.
    """

    GROUP = 32

    def __init__(self, size: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.lengths = lengths
        self.epoch = 0

    def __len__(self) -> int:
        if self.lengths is None:
            return -(-self.size // self.batch_size)
        group = self.GROUP * self.batch_size
        full, rest = divmod(self.size, group)
        return full * self.GROUP + (rest + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            for start in range(0, self.size, self.batch_size):
                yield order[start : start + self.batch_size]
            return
        group = self.GROUP * self.batch_size
        batches = []
        for start in range(0, self.size, group):
            ranked = sorted(order[start : start + group], key=self.lengths.__getitem__)
            batches += [ranked[i : i + self.batch_size] for i in range(0, len(ranked), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]
