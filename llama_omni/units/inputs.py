"""Which audio files a units command works on: wav files, directories, or a voice corpus."""

from __future__ import annotations

from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def collect_audio(inputs: list[Path], split: str | None = None) -> list[tuple[str, Path]]:
    """(id, path) pairs. A directory with `manifest.jsonl` is a voice corpus (its `split`
    utterances, ids from the manifest); another directory contributes its audio files
    (sorted, recursively); a file is taken as is. Ids of plain files are their stems."""
    from llama_omni.train.voice_corpus import read_manifest

    found: list[tuple[str, Path]] = []
    for item in inputs:
        if (item / "manifest.jsonl").is_file():
            found += [(u.id, u.wav_path(item)) for u in read_manifest(item, split)]
        elif item.is_dir():
            found += [(p.stem, p) for p in sorted(item.rglob("*")) if p.suffix in AUDIO_SUFFIXES]
        elif item.is_file():
            found.append((item.stem, item))
        else:
            raise FileNotFoundError(f"no such audio file or directory: {item}")
    if not found:
        raise ValueError(f"no audio found in {[str(i) for i in inputs]}")
    ids = [i for i, _ in found]
    if len(set(ids)) != len(ids):
        raise ValueError("two inputs share one id (file stem); rename them or pass a corpus")
    return found
