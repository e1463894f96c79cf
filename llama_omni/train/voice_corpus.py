"""The default voice's training corpus: English sentences from ShareGPT spoken by hibari.

Sentences come from the packaged ShareGPT conversations (questions and answers), cut at
sentence ends and kept only when they look like plain spoken English (5-30 words, letters
and ordinary punctuation, no code, markup, digits or URLs: digits would make the ASR-WER
of held-out sentences depend on number normalisation). A fixed, hash-chosen set of
sentences is held out for evaluation and never synthesized into the training split.

Layout of a corpus directory: `manifest.jsonl` (one {"id", "text", "split", "samples"}
per utterance) and `wav/<id>.wav` (16 kHz mono PCM16). Building is resumable: utterances
whose wav exists are not synthesized again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from llama_omni.data.tts import SAMPLE_RATE

SPLITS = ("test", "dev", "train")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CLEAN = re.compile(r"[A-Za-z ,.;:'!?\-\"]+")
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str
    split: str
    samples: int = 0

    def wav_path(self, root: Path) -> Path:
        return root / "wav" / f"{self.id}.wav"


def split_sentences(message: str) -> Iterator[str]:
    """Plain English sentences of 5-30 words from one chat message (code blocks dropped)."""
    message = _CODE_BLOCK.sub("\n", message)
    for line in message.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            sentence = sentence.strip()
            if not sentence or sentence[-1] not in ".!?" or not _CLEAN.fullmatch(sentence):
                continue
            if 5 <= len(sentence.split()) <= 30 and sentence[0].isupper():
                yield sentence


def sentence_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def select_sentences(messages: Iterable[str], n_test: int, n_dev: int,
                     n_train: int) -> list[Utterance]:
    """Unique sentences ordered by their hash; the first n_test are test, then dev, then train.

    Ordering by hash makes the held-out choice independent of the source order and of
    how many training sentences are requested.
    """
    unique = {sentence_id(s): s for m in messages for s in split_sentences(m)}
    ordered = sorted(unique.items())
    needed = n_test + n_dev + n_train
    if len(ordered) < needed:
        raise ValueError(f"only {len(ordered)} usable sentences, {needed} requested")
    sizes = dict(test=n_test, dev=n_dev, train=n_train)
    out, start = [], 0
    for split in SPLITS:
        out += [Utterance(i, t, split) for i, t in ordered[start:start + sizes[split]]]
        start += sizes[split]
    return out


def sharegpt_messages() -> Iterator[str]:
    """First-turn questions and answers of the packaged ShareGPT data."""
    from llama_omni.data.sources import first_turns, iter_sharegpt

    for _, question, answer in first_turns(iter_sharegpt()):
        yield question
        yield answer


_TTS = None


def _synthesize(job: tuple[str, str]) -> tuple[str, int]:
    """Worker: synthesize one sentence to its wav path (atomic); return (id, samples)."""
    global _TTS
    from llama_omni.data.tts import HibariTTS

    if _TTS is None:
        _TTS = HibariTTS(threads=1)
    text, path = job
    audio = _TTS.synthesize(text)  # [T] float32, 16 kHz
    tmp = Path(path).with_suffix(".tmp.wav")
    sf.write(tmp, np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    tmp.replace(path)
    return Path(path).stem, len(audio)


def build_corpus(root: str | Path, n_test: int = 100, n_dev: int = 20, n_train: int = 3000,
                 workers: int = 2) -> list[Utterance]:
    """Select sentences, synthesize the missing wavs, write `manifest.jsonl`; return it."""
    root = Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    utterances = select_sentences(sharegpt_messages(), n_test, n_dev, n_train)
    jobs = [(u.text, str(u.wav_path(root))) for u in utterances if not u.wav_path(root).exists()]
    if jobs:
        with Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_synthesize, jobs, chunksize=8),
                          total=len(jobs), desc="hibari", unit="utt"):
                pass
    utterances = [Utterance(u.id, u.text, u.split, sf.info(u.wav_path(root)).frames)
                  for u in utterances]
    tmp = root / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(u.__dict__) + "\n" for u in utterances))
    tmp.replace(root / "manifest.jsonl")
    return utterances


def read_manifest(root: str | Path, split: str | None = None) -> list[Utterance]:
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no corpus manifest at {path}: build the corpus first "
                                "(`llama-omni vocoder corpus`)")
    rows = [Utterance(**json.loads(line)) for line in path.read_text().splitlines() if line]
    return [u for u in rows if split is None or u.split == split]
