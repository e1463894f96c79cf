"""The data set manifest that training reads, and atomic file writes.

A data set is a directory holding `manifest.jsonl`, one JSON object per item:

    {"id": str, "source": str,
     "turns": [{"role": "user", "text": str, "audio": "audio/instruction/<id>.flac",
                "voice": "<backend>:<voice>"},
               {"role": "assistant", "text": str, "audio": "audio/response/<id>.flac",
                "voice": "hibari:heart", "units": [int, ...], "units_model": str}],
     "original": {"instruction": str, "response": str | null}}

Audio paths are relative to the manifest directory (FLAC, 16 kHz mono). Turns alternate
user / assistant; single-turn items have two. "units" and "units_model" are absent until
the units step ran. Items read from the published LLaMA-Omni format have a null user
"text" (only its speech is known) and a null assistant "audio" (only its units are).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST_NAME = "manifest.jsonl"


def atomic_write_bytes(path: Path, data: bytes, tag: str = "") -> None:
    """Write to a temp file beside `path`, then rename: readers never see a partial file.

    `tag` names the writer in the temp file name, so a resumed writer can remove its own
    leftovers (see `remove_temp_files`) without touching other writers' files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{tag}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, tag: str = "") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), tag)


def remove_temp_files(root: Path, tag: str) -> int:
    """Delete leftovers of an interrupted writer with this tag; returns how many."""
    count = 0
    for tmp in root.rglob(f".*.tmp{tag}"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def write_jsonl(path: Path, rows: Iterable[dict], tag: str = "") -> int:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines), tag)
    return len(lines)


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def validate_item(item: dict) -> None:
    """Raise ValueError naming the first field that breaks the manifest format."""
    where = f"manifest item {item.get('id')!r}"
    for key, kind in (("id", str), ("source", str), ("turns", list), ("original", dict)):
        if not isinstance(item.get(key), kind):
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}")
    turns = item["turns"]
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"{where}: needs an even number (>= 2) of turns, has {len(turns)}")
    for index, turn in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        if turn.get("role") != role:
            raise ValueError(f"{where}: turn {index} must have role {role!r}")
        audio = turn.get("audio")
        if audio is None and not (role == "assistant" and "units" in turn):
            raise ValueError(f"{where}: turn {index} needs 'audio' (only an assistant turn "
                             "with units may lack it)")
        if audio is not None and (not isinstance(audio, str) or Path(audio).is_absolute()):
            raise ValueError(f"{where}: turn {index} 'audio' must be a relative path")
        if role == "assistant" and not isinstance(turn.get("text"), str):
            raise ValueError(f"{where}: assistant turn {index} needs a 'text'")
        units = turn.get("units")
        if units is not None and not (isinstance(units, list)
                                      and all(isinstance(u, int) for u in units)):
            raise ValueError(f"{where}: turn {index} 'units' must be a list of ints")


def read_manifest(directory: str | Path) -> Iterator[dict]:
    """Validated items of a data set directory."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory} (build one with "
                                "`llama-omni data build CONFIG.yaml`)")
    for item in read_jsonl(path):
        validate_item(item)
        yield item
