"""Stage-2 data beyond the data set: the default voice's corpus sentences as extra answers.

Stage 2 trains only the speech decoder (the frozen LLM's answer states c_i -> units), so
any text the response voice has spoken is a training answer for it. The vocoder corpus
(`llama-omni vocoder corpus`: hibari reading ShareGPT sentences, 4.3 h in its train
split) more than doubles the 3 h of answers in a small data set. Each corpus sentence
becomes the answer of an item whose question is a training item's spoken question,
chosen by hash (a manifest user turn needs speech; the answer states mostly depend on
the answer's own prefix). Data-set items come first and keep their ids, so the
held-out split of a run on the mix equals that of a run on the data set alone.

    llama-omni units extract runs/voice/corpus --split train --out runs/voice/corpus_train_units.jsonl
    python scripts/stage2_mix.py --data runs/data/sharegpt-1k --corpus runs/voice/corpus \
        --units runs/voice/corpus_train_units.jsonl --out runs/data/stage2-mix
    llama-omni train stage2 CONFIG --set data.train=runs/data/stage2-mix \
        --set data.audio_root=runs/data/sharegpt-1k
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from llama_omni.data.manifest import MANIFEST_NAME, atomic_write_bytes, read_manifest, validate_item
from llama_omni.train.data import is_heldout
from llama_omni.train.voice_corpus import read_manifest as read_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data set directory")
    parser.add_argument("--corpus", type=Path, required=True, help="voice corpus directory")
    parser.add_argument("--units", type=Path, required=True,
                        help="`llama-omni units extract --out X.jsonl` of the corpus")
    parser.add_argument("--out", type=Path, required=True, help="directory for the mix manifest")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="the training config's data.eval_fraction: held-out items' "
                             "questions are not reused")
    args = parser.parse_args()

    items = list(read_manifest(args.data))
    questions = [it for it in items if not is_heldout(it["id"], args.eval_fraction)]
    units = {row["id"]: row for row in map(json.loads, args.units.read_text().splitlines())}
    units_model = next((t.get("units_model") for it in items for t in it["turns"]
                        if t.get("units_model")), None)
    extra = []
    for utt in read_corpus(args.corpus, "train"):
        if utt.id not in units:
            continue
        pick = int(hashlib.blake2b(utt.id.encode(), digest_size=8).hexdigest(), 16)
        user = questions[pick % len(questions)]["turns"][0]
        item = {
            "id": f"corpus-{utt.id}", "source": "voice-corpus",
            "turns": [
                {k: user[k] for k in ("role", "text", "audio", "voice")},
                {"role": "assistant", "text": utt.text, "audio": None, "voice": "hibari:heart",
                 "units": units[utt.id]["units"], "units_model": units_model},
            ],
            "original": {"instruction": user["text"], "response": None},
        }
        validate_item(item)
        extra.append(item)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(it) + "\n" for it in items + extra)
    atomic_write_bytes(args.out / MANIFEST_NAME, lines.encode())
    print(f"{args.out / MANIFEST_NAME}: {len(items)} data-set items + {len(extra)} corpus answers")


if __name__ == "__main__":
    main()
