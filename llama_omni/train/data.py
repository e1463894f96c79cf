"""Training conversations: reading data sets, tokenizing with label masks, held-out split.

Two input formats give the same `Conversation`s, through the data package's readers:
- a manifest directory (`llama_omni.data.manifest`): turns alternating user / assistant,
  user turns with speech, assistant turns with text and optionally `units`;
- the published LLaMA-Omni JSON list (`llama_omni.data.export.read_published`): one
  speech instruction per record, the answer's units in `tgt_units`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llama_omni.data.export import read_published
from llama_omni.data.manifest import MANIFEST_NAME, read_manifest
from llama_omni.model.llm import LLMConfig
from llama_omni.model.prompt import (
    IGNORE_INDEX,
    SPEECH_PLACEHOLDER,
    SPEECH_TOKEN_INDEX,
    Turn,
    build_training_ids,
)


class DataError(ValueError):
    """A training item is malformed; the message names the item and what is wrong."""


@dataclass(frozen=True)
class TrainTurn:
    """A user turn (speech `audio`, or None for a text-only turn; prompt `text` after
    the speech: None = the configured instruction; `transcript`: the words of the speech,
    when known) or an assistant turn (answer `text`, optional target `units`)."""

    role: str
    text: str | None = None
    audio: Path | None = None
    units: tuple[int, ...] | None = None
    transcript: str | None = None


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[TrainTurn, ...]

    @property
    def audio(self) -> list[Path]:
        return [t.audio for t in self.turns if t.audio is not None]

    @property
    def answer_units(self) -> list[tuple[int, ...] | None]:
        return [t.units for t in self.turns if t.role == "assistant"]


@dataclass(frozen=True)
class Tokenized:
    """Token ids with SPEECH_TOKEN_INDEX slots and labels (IGNORE_INDEX outside answers)."""

    ids: list[int]
    labels: list[int]


def read_conversations(path: str | Path, audio_root: str | Path | None = None) -> list[Conversation]:
    """Conversations of a manifest directory (or its manifest.jsonl) or a published JSON file."""
    path = Path(path)
    if path.is_dir() or path.name == MANIFEST_NAME:
        directory = path if path.is_dir() else path.parent
        root = Path(audio_root) if audio_root else directory
        items = [_from_manifest(item, root) for item in read_manifest(directory)]
    elif path.is_file():
        items = [_from_published(record) for record in read_published(path, audio_root)]
    else:
        raise FileNotFoundError(
            f"training data {path} not found: give a manifest directory (with {MANIFEST_NAME}) "
            "or a published-format JSON file"
        )
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: item id {item.id!r} appears twice")
        seen.add(item.id)
    return items


def check_audio_exists(conversations: Iterable[Conversation]) -> None:
    """Raise FileNotFoundError naming the items whose audio files are missing."""
    missing = [f"item {c.id!r}: {p}" for c in conversations for p in c.audio if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError("audio files missing: " + "; ".join(missing[:5]) + more)


def _from_manifest(item: dict, root: Path) -> Conversation:
    """The user's text in a manifest is the transcript of its speech: not part of the prompt."""
    turns = [
        TrainTurn("user", None, root / t["audio"], transcript=t.get("text")) if t["role"] == "user"
        else TrainTurn("assistant", t["text"], None, _units(t.get("units")))
        for t in item["turns"]
    ]
    return Conversation(item["id"], tuple(turns))


def _from_published(record: dict) -> Conversation:
    """The record's one speech file (and its transcript, if given) belongs to the
    `<speech>` of its first user turn."""
    turns = []
    for n, t in enumerate(record["turns"]):
        if t["role"] == "assistant":
            turns.append(TrainTurn("assistant", t["text"], None, _units(t.get("units"))))
            continue
        has_speech = SPEECH_PLACEHOLDER in t["text"]
        if has_speech != (n == 0):
            raise DataError(
                f"published item {record['id']!r}: {SPEECH_PLACEHOLDER} must open the first "
                "human turn and only that one (a record has one speech file)"
            )
        text = t["text"].replace(SPEECH_PLACEHOLDER, "", 1).strip()
        turns.append(TrainTurn("user", text, Path(record["speech"]) if has_speech else None,
                               transcript=record["transcript"] if has_speech else None))
    return Conversation(record["id"], tuple(turns))


def _units(units: list[int] | None) -> tuple[int, ...] | None:
    return tuple(units) if units else None


def tokenize(conversation: Conversation, tokenizer: Any, llm: LLMConfig) -> Tokenized:
    """Prompt-format ids and labels of a whole conversation (every answer is supervised)."""
    turns = [
        Turn("user", t.text, t.audio is not None) if t.role == "user" else Turn.assistant(t.text)
        for t in conversation.turns
    ]
    ids, labels = build_training_ids(
        tokenizer, turns, style=llm.prompt_style, system_prompt=llm.system_prompt,
        instruction=llm.instruction,
    )
    spans = answer_spans(labels)
    answers = sum(t.role == "assistant" for t in conversation.turns)
    if len(spans) != answers:
        raise DataError(
            f"item {conversation.id!r}: {answers} answers but {len(spans)} labelled token runs"
        )
    return Tokenized(ids, labels)


def written(conversation: Conversation, instruction: str | None = None) -> Conversation:
    """The conversation as a text-only LLM would read it: each spoken user turn becomes its
    transcript (followed by the turn's own prompt text, if any; not `instruction`, the
    configured prompt that asks about the speech, which published records spell out)."""
    turns = []
    for turn in conversation.turns:
        if turn.role == "user" and turn.audio is not None:
            if not turn.transcript:
                raise DataError(
                    f"item {conversation.id!r}: a spoken user turn has no transcript (the "
                    "manifest's user 'text', or a published record's 'transcript'); "
                    "distillation reads it as the written question"
                )
            prompt = None if turn.text == instruction else turn.text
            turn = TrainTurn("user", "\n".join(filter(None, [turn.transcript, prompt])))
        turns.append(turn)
    return Conversation(conversation.id, tuple(turns))


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised positions: one run per assistant answer."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def expand_speech(ids: list[int], labels: list[int], speech_lengths: list[int]) -> list[int]:
    """Labels aligned with the embedded sequence: each speech slot becomes its frames,
    all IGNORE_INDEX (speech positions are never predicted)."""
    lengths = iter(speech_lengths)
    out: list[int] = []
    for token, label in zip(ids, labels):
        out.extend([IGNORE_INDEX] * next(lengths) if token == SPEECH_TOKEN_INDEX else [label])
    return out


def is_heldout(item_id: str, fraction: float) -> bool:
    """Stable membership of the held-out split, from a hash of the item id."""
    digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_heldout(
    items: list[Conversation], fraction: float, max_items: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out); at most max_items held out, the rest return to training."""
    heldout = [c for c in items if is_heldout(c.id, fraction)][:max_items]
    chosen = {c.id for c in heldout}
    return [c for c in items if c.id not in chosen], heldout
