"""A "repeat the question" task from a manifest: each spoken question, its transcript as the answer.

The answer is fully determined by the speech, so training the adaptor on it with the LLM
frozen (`--tuning adaptor`) teaches the adaptor to give the LLM embeddings it reads as the
question's words, which answer-only stage 1 on a small data set does not do (see README,
"speech dependence"). The output is a published-format JSON list (the prompt after the
speech is the repeat instruction, not the configured one); items keep their ids, so the
held-out split equals that of the manifest.

    python scripts/repeat_task.py --data runs/data/sharegpt-default --out runs/data/repeat-task.json
    llama-omni train stage1 configs/train/small-cpu-stage1.yaml --data runs/data/repeat-task.json \
        --tuning adaptor --lr 1e-3 --checkpoint runs/small-cpu/align/final \
        --output-dir runs/small-cpu/stage1-repeat
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_omni.data.manifest import atomic_write_bytes, read_manifest
from llama_omni.model.prompt import SPEECH_PLACEHOLDER

INSTRUCTION = "Repeat the user's speech word for word."


def repeat_items(data: Path, max_items: int | None = None) -> list[dict]:
    """Published-format records: the first user turn's speech -> its transcript."""
    records = []
    for item in list(read_manifest(data))[:max_items]:
        question = item["turns"][0]
        if question.get("role") != "user" or not question.get("audio") or not question.get("text"):
            raise SystemExit(f"{data}: item {item['id']!r} does not open with a spoken, "
                             "transcribed user turn")
        records.append({
            "id": item["id"],
            "speech": str((data / question["audio"]).resolve()),
            "conversations": [
                {"from": "human", "value": f"{SPEECH_PLACEHOLDER}\n{INSTRUCTION}"},
                {"from": "gpt", "value": question["text"]},
            ],
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest directory")
    parser.add_argument("--out", type=Path, required=True, help="published-format JSON to write")
    parser.add_argument("--max-items", type=int, default=None, help="the first N items only")
    args = parser.parse_args()
    records = repeat_items(args.data, args.max_items)
    atomic_write_bytes(args.out, json.dumps(records, indent=1).encode())
    print(json.dumps({"out": str(args.out), "items": len(records)}))


if __name__ == "__main__":
    main()
