"""A "repeat the question" task from a manifest: each spoken question, its transcript as the answer.

The answer is fully determined by the speech, so training on it teaches the adaptor to give
the LLM embeddings it reads as the question's words, which answer-only stage 1 on a small
data set does not do (see README, "speech dependence"). The output is a published-format
JSON list (the prompt after the speech is the repeat instruction, not the configured one);
items keep their ids, so the held-out split equals that of the manifest.

    python scripts/repeat_task.py --data runs/data/sharegpt-default --out runs/data/repeat-task.json
    llama-omni train stage1 configs/train/small-cpu-stage1.yaml --data runs/data/repeat-task.json \
        --tuning adaptor --lr 1e-3 --checkpoint runs/small-cpu/align/final \
        --output-dir runs/small-cpu/stage1-repeat

With --mix-answers every training item appears twice, once per task (the repeat record's
id gets REPEAT_SUFFIX), so stage 1 learns to answer while the repeat task keeps the answers
tied to the speech; the held-out items (the manifest's own split) are written separately,
answer task only, for `--set data.eval=...`:

    python scripts/repeat_task.py --data runs/data/sharegpt-default --mix-answers \
        --out runs/data/mixed-train.json --heldout-out runs/data/mixed-heldout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_omni.data.manifest import atomic_write_bytes, read_manifest
from llama_omni.model.prompt import DEFAULT_INSTRUCTION, SPEECH_PLACEHOLDER
from llama_omni.train.data import read_conversations, split_heldout

INSTRUCTION = "Repeat the user's speech word for word."
REPEAT_SUFFIX = "-repeat"


def _record(item_id: str, speech: Path, transcript: str, prompt: str, answer: str) -> dict:
    return {
        "id": item_id,
        "speech": str(speech),
        "transcript": transcript,  # for stage-1 distillation (--set distill=W)
        "conversations": [
            {"from": "human", "value": f"{SPEECH_PLACEHOLDER}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _first_exchange(data: Path, item: dict) -> tuple[Path, str, str | None]:
    """(question audio, transcript, first answer or None) of a manifest item."""
    question = item["turns"][0]
    if question.get("role") != "user" or not question.get("audio") or not question.get("text"):
        raise SystemExit(f"{data}: item {item['id']!r} does not open with a spoken, "
                         "transcribed user turn")
    answer = item["turns"][1]["text"] if len(item["turns"]) > 1 else None
    return (data / question["audio"]).resolve(), question["text"], answer


def repeat_items(data: Path, max_items: int | None = None) -> list[dict]:
    """Published-format records: the first user turn's speech -> its transcript."""
    records = []
    for item in list(read_manifest(data))[:max_items]:
        speech, transcript, _ = _first_exchange(data, item)
        records.append(_record(item["id"], speech, transcript, INSTRUCTION, transcript))
    return records


def mixed_items(
    data: Path, max_items: int | None, eval_fraction: float, eval_max_items: int,
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[list[dict], list[dict]]:
    """(train, held-out): train holds each non-held-out item's repeat and answer records;
    held-out holds answer records only, chosen as `split_heldout` chooses them."""
    _, heldout_items = split_heldout(read_conversations(data)[:max_items], eval_fraction, eval_max_items)
    heldout_ids = {c.id for c in heldout_items}
    train, heldout = [], []
    for item in list(read_manifest(data))[:max_items]:
        speech, transcript, answer = _first_exchange(data, item)
        if answer is None:
            raise SystemExit(f"{data}: item {item['id']!r} has no answer")
        answer_record = _record(item["id"], speech, transcript, instruction, answer)
        if item["id"] in heldout_ids:
            heldout.append(answer_record)
            continue
        train += [_record(item["id"] + REPEAT_SUFFIX, speech, transcript, INSTRUCTION, transcript),
                  answer_record]
    return train, heldout


def _write(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, json.dumps(records, indent=1).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest directory")
    parser.add_argument("--out", type=Path, required=True, help="published-format JSON to write")
    parser.add_argument("--max-items", type=int, default=None, help="the first N items only")
    parser.add_argument("--mix-answers", action="store_true",
                        help="training items of both tasks; needs --heldout-out")
    parser.add_argument("--heldout-out", type=Path, help="held-out answer records (--mix-answers)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="as data.eval_fraction")
    parser.add_argument("--eval-max-items", type=int, default=30, help="as data.eval_max_items")
    args = parser.parse_args()
    if args.mix_answers != (args.heldout_out is not None):
        parser.error("--mix-answers and --heldout-out go together")
    if not args.mix_answers:
        records = repeat_items(args.data, args.max_items)
        _write(args.out, records)
        print(json.dumps({"out": str(args.out), "items": len(records)}))
        return
    train, heldout = mixed_items(args.data, args.max_items, args.eval_fraction, args.eval_max_items)
    _write(args.out, train)
    _write(args.heldout_out, heldout)
    print(json.dumps({"out": str(args.out), "train_records": len(train),
                      "heldout_out": str(args.heldout_out), "heldout_items": len(heldout)}))


if __name__ == "__main__":
    main()
