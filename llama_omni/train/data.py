"""Training conversations: reading manifests, tokenizing with label masks, held-out split.

Two input formats give the same `Conversation`s:
- our data pipeline's manifest directory: `manifest.jsonl`, one conversation per line,
  turns alternating user / assistant, each with an `audio` path relative to the
  directory; an assistant turn may carry `units` (merged unit ids of its speech);
- the published LLaMA-Omni format: one JSON list of LLaVA-style records
  {"id", "speech": path (or a list, one per `<speech>`), "conversations":
  [{"from": "human", "value": "<speech>\\n..."}, {"from": "gpt", "value": ...}],
  "tgt_units": [...]} where the units belong to the last answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llama_omni.model.llm import LLMConfig
from llama_omni.model.prompt import (
    IGNORE_INDEX,
    SPEECH_PLACEHOLDER,
    SPEECH_TOKEN_INDEX,
    Turn,
    build_training_ids,
)

MANIFEST_NAME = "manifest.jsonl"


class DataError(ValueError):
    """A training item is malformed; the message names the item and what is wrong."""


@dataclass(frozen=True)
class TrainTurn:
    """A user turn (speech `audio`, prompt `text` after it: None = the configured
    instruction) or an assistant turn (answer `text`, optional target `units`)."""

    role: str
    text: str | None = None
    audio: Path | None = None
    units: tuple[int, ...] | None = None


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
    """Conversations from a manifest directory / `manifest.jsonl`, or a published-format JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"training data {path} not found: give a manifest directory (with {MANIFEST_NAME}) "
            "or a published-format JSON file"
        )
    if path.suffix == ".jsonl":
        root = Path(audio_root) if audio_root else path.parent
        items = [_from_manifest(json.loads(line), root, path, n)
                 for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    else:
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise DataError(f"{path}: a published-format file is a JSON list of records")
        root = Path(audio_root) if audio_root else path.parent
        items = [_from_published(r, root, path, n) for n, r in enumerate(records, 1)]
    _check_unique_ids(items, path)
    return items


def check_audio_exists(conversations: Iterable[Conversation]) -> None:
    """Raise FileNotFoundError naming the items whose audio files are missing."""
    missing = [f"item {c.id!r}: {p}" for c in conversations for p in c.audio if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError("audio files missing: " + "; ".join(missing[:5]) + more)


def _from_manifest(record: Any, root: Path, source: Path, line: int) -> Conversation:
    where = f"{source} line {line}"
    if not isinstance(record, dict) or "id" not in record or "turns" not in record:
        raise DataError(f"{where}: expected an object with 'id' and 'turns'")
    turns = []
    for turn in record["turns"]:
        role = turn.get("role")
        if role == "user":
            if not turn.get("audio"):
                raise DataError(f"{where} (item {record['id']!r}): a user turn has no 'audio'")
            # The user's text is the transcript of the speech, not part of the prompt.
            turns.append(TrainTurn("user", None, root / turn["audio"]))
        elif role == "assistant":
            units = turn.get("units")
            turns.append(TrainTurn("assistant", _text(turn, where), None,
                                   tuple(units) if units is not None else None))
        else:
            raise DataError(f"{where} (item {record['id']!r}): unknown role {role!r}")
    return _validated(Conversation(str(record["id"]), tuple(turns)), where)


def _from_published(record: Any, root: Path, source: Path, index: int) -> Conversation:
    where = f"{source} record {index}"
    if not isinstance(record, dict) or "conversations" not in record:
        raise DataError(f"{where}: expected an object with 'conversations'")
    speech = record.get("speech", [])
    paths = [root / p for p in ([speech] if isinstance(speech, str) else speech)]
    turns, slots = [], iter(paths)
    messages = record["conversations"]
    for n, message in enumerate(messages):
        value = str(message.get("value", ""))
        if message.get("from") == "human":
            if SPEECH_PLACEHOLDER not in value:
                raise DataError(f"{where}: a human turn without {SPEECH_PLACEHOLDER!r}")
            rest = value.replace(SPEECH_PLACEHOLDER, "", 1).strip()
            audio = next(slots, None)
            if audio is None:
                raise DataError(f"{where}: more {SPEECH_PLACEHOLDER!r} turns than 'speech' paths")
            turns.append(TrainTurn("user", rest, audio))
        elif message.get("from") == "gpt":
            last = n == len(messages) - 1
            units = record.get("tgt_units") if last else None
            turns.append(TrainTurn("assistant", value, None,
                                   tuple(units) if units is not None else None))
        else:
            raise DataError(f"{where}: unknown speaker {message.get('from')!r}")
    item_id = str(record.get("id", f"{source.stem}-{index}"))
    return _validated(Conversation(item_id, tuple(turns)), where)


def _text(turn: dict, where: str) -> str:
    text = turn.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: an assistant turn has no text")
    return text


def _validated(conversation: Conversation, where: str) -> Conversation:
    roles = [t.role for t in conversation.turns]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected:
        raise DataError(
            f"{where} (item {conversation.id!r}): turns must alternate user, assistant and end "
            f"with an assistant answer; got {roles}"
        )
    return conversation


def _check_unique_ids(items: list[Conversation], source: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{source}: item id {item.id!r} appears twice")
        seen.add(item.id)


def tokenize(conversation: Conversation, tokenizer: Any, llm: LLMConfig) -> Tokenized:
    """Prompt-format ids and labels of a whole conversation (every answer is supervised)."""
    turns = [
        Turn("user", t.text, True) if t.role == "user" else Turn.assistant(t.text)
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
