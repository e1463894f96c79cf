"""Per-step state that survives crashes: append-only logs, one per step and shard.

A step's result for an item is one JSON line in `state/<step>/shard-<i>-of-<n>.jsonl`,
appended and fsync'ed after the item's files were renamed into place. An item is done
when its line is complete; a line cut by a crash (no newline) is dropped when the log is
reopened, so the item is simply redone. Only one process may work on a shard at a time
(`ShardLock`), so no item is ever logged twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """'i/n' with 0 <= i < n; None means the whole data set."""
        if text is None:
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"--shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def tag(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def owns(self, position: int) -> bool:
        """Items are dealt round-robin by their position in the selected list."""
        return position % self.count == self.index


class StepLog:
    """The append-only results of one step for one shard."""

    def __init__(self, root: Path, step: str, shard: Shard):
        self.path = root / "state" / step / f"{shard.tag}.jsonl"
        self._file = None

    def __enter__(self) -> StepLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def append(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())


def _drop_partial_line(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def read_step(root: Path, step: str) -> dict[str, dict]:
    """Complete records of a step over all shard logs present, by item id."""
    records: dict[str, dict] = {}
    for path in sorted((root / "state" / step).glob("shard-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                record = json.loads(line)
                records[record["id"]] = record
    return records


class ShardLock:
    """An exclusive lock on (data set, shard) for the lifetime of a run."""

    def __init__(self, root: Path, shard: Shard):
        self.path = root / "state" / f"{shard.tag}.lock"

    def __enter__(self) -> ShardLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(f"another process is already working on {self.path.parent.parent} "
                               f"({self.path.stem}); wait for it or stop it first") from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
