"""Interchange: export a manifest to a Hugging Face `datasets` dataset, and read the
published LLaMA-Omni data format.

The published format is LLaVA-style JSON: a list of {"id", "speech": <audio path>,
"conversations": [{"from": "human", "value": "<speech>\\n..."}, {"from": "gpt", "value":
<response text>}]}, with the response's target units under "tgt_units" (on the gpt turn
or on the item; a list of ints or a space-separated string). Its response speech is not
part of it, so imported items have units but no response audio. Our one addition, optional:
"transcript" on the item, the words of its speech (stage-1 distillation reads them as the
written question; an import keeps them as the user turn's text).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llama_omni.data.manifest import MANIFEST_NAME, atomic_write_bytes, read_manifest, write_jsonl
from llama_omni.data.sources import safe_id
from llama_omni.data.tts import encode_flac

UNIT_KEYS = ("tgt_units", "units")


def to_hf_dataset(manifest_dir: str | Path, embed_audio: bool = False):
    """One row per (user, assistant) exchange; audio as datasets.Audio (not decoded).

    With embed_audio the FLAC bytes are stored in the dataset, else absolute paths.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("export needs `datasets`: `pip install datasets`") from None
    root = Path(manifest_dir).resolve()

    def audio(rel: str | None) -> dict | None:
        if rel is None:
            return None
        path = root / rel
        return {"path": str(path), "bytes": path.read_bytes() if embed_audio else None}

    rows = []
    for item in read_manifest(root):
        turns = item["turns"]
        for pair in range(0, len(turns), 2):
            user, assistant = turns[pair], turns[pair + 1]
            rows.append({
                "id": item["id"] if len(turns) == 2 else f"{item['id']}#{pair // 2}",
                "source": item["source"], "turn": pair // 2,
                "instruction": user.get("text"), "instruction_audio": audio(user["audio"]),
                "instruction_voice": user.get("voice"),
                "response": assistant["text"], "response_audio": audio(assistant.get("audio")),
                "response_voice": assistant.get("voice"),
                "units": assistant.get("units", []), "units_model": assistant.get("units_model"),
                "original_instruction": item["original"].get("instruction"),
                "original_response": item["original"].get("response"),
            })
    if not rows:
        raise ValueError(f"{root / MANIFEST_NAME} has no items to export")
    # Audio columns are built as plain {bytes, path} structs, then cast: encoding through the
    # Audio feature would need torchcodec, casting does not.
    stored = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({
        "id": datasets.Value("string"), "source": datasets.Value("string"),
        "turn": datasets.Value("int32"), "instruction": datasets.Value("string"),
        "instruction_audio": stored,
        "instruction_voice": datasets.Value("string"), "response": datasets.Value("string"),
        "response_audio": stored,
        "response_voice": datasets.Value("string"),
        "units": datasets.Sequence(datasets.Value("int32")),
        "units_model": datasets.Value("string"),
        "original_instruction": datasets.Value("string"),
        "original_response": datasets.Value("string"),
    })
    dataset = datasets.Dataset.from_list(rows, features=features)
    for column in ("instruction_audio", "response_audio"):
        dataset = dataset.cast_column(column, datasets.Audio(sampling_rate=16000, decode=False))
    return dataset


def _units(value) -> list[int] | None:
    """Target units as a list with runs of repeats merged (the paper's Y^U)."""
    if value is None:
        return None
    ids = [int(u) for u in (value.split() if isinstance(value, str) else value)]
    return [u for i, u in enumerate(ids) if i == 0 or u != ids[i - 1]]


def read_published(json_file: str | Path, audio_root: str | Path | None = None) -> Iterator[dict]:
    """Items of a published-format file as {"id", "speech" (absolute path), "transcript"
    (the speech's words, or None), "turns" [{"role", "text", "units"}]}; roles alternate
    user / assistant."""
    json_file = Path(json_file)
    root = Path(audio_root) if audio_root else json_file.parent
    records = json.loads(json_file.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{json_file}: expected a JSON list of items")
    for index, record in enumerate(records):
        where = f"{json_file} item {index}"
        convs = record.get("conversations")
        if not isinstance(record.get("speech"), str) or not isinstance(convs, list) or not convs:
            raise ValueError(f"{where}: needs 'speech' (a path) and a 'conversations' list")
        turns = []
        for number, turn in enumerate(convs):
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            if role != ("user" if number % 2 == 0 else "assistant"):
                raise ValueError(f"{where}: turn {number} is from {turn.get('from')!r}; "
                                 "turns must alternate human / gpt")
            units = next((turn[k] for k in UNIT_KEYS if k in turn), None)
            if units is None and role == "assistant" and number == len(convs) - 1:
                units = next((record[k] for k in UNIT_KEYS if k in record), None)
            turns.append({"role": role, "text": str(turn.get("value", "")), "units": _units(units)})
        transcript = record.get("transcript")
        if transcript is not None and (not isinstance(transcript, str) or not transcript.strip()):
            raise ValueError(f"{where}: 'transcript' must be the speech's words as a non-empty "
                             "string (or left out)")
        speech = Path(record["speech"])
        yield {"id": str(record.get("id", index)),
               "speech": str(speech if speech.is_absolute() else root / speech),
               "transcript": transcript, "turns": turns}


def import_published(json_file: str | Path, out: str | Path,
                     audio_root: str | Path | None = None) -> int:
    """Write a manifest directory from a published-format file (single-turn items; the
    user's speech is converted to 16 kHz FLAC)."""
    from llama_omni.audio import load_audio

    out = Path(out)
    items = []
    for record in read_published(json_file, audio_root):
        turns = record["turns"]
        if len(turns) != 2:
            raise ValueError(f"item {record['id']}: only single-turn items can be imported "
                             f"(it has {len(turns)} turns)")
        item_id = safe_id(record["id"])
        rel = f"audio/instruction/{item_id}.flac"
        atomic_write_bytes(out / rel, encode_flac(np.asarray(load_audio(record["speech"]))))
        assistant = {"role": "assistant", "text": turns[1]["text"], "audio": None}
        if turns[1]["units"] is not None:
            assistant.update(units=turns[1]["units"], units_model="published")
        items.append({"id": item_id, "source": "published",
                      "turns": [{"role": "user", "text": record["transcript"], "audio": rel,
                                 "voice": None},
                                assistant],
                      "original": {"instruction": None, "response": turns[1]["text"]}})
    return write_jsonl(out / MANIFEST_NAME, items)
