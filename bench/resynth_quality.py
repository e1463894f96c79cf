"""Resynthesis quality of a units model + unit vocoder on held-out hibari sentences.

For each held-out sentence (the corpus "test" split: chosen by hash, never trained on):
source TTS audio -> units (merged) -> vocoder with predicted durations, vocoded whole and
in independent chunks of Omega units (the paper's streaming: each chunk vocoded alone),
in chunks of Omega units through the seamless streaming vocoder (the engine's default),
and whole with the measured run lengths as durations (what the units alone keep).
Prints one JSON object: ASR-WER (faster-whisper, Whisper base) against the source text,
with the source audio's own WER as the reference point; DNSMOS P.808 and P.835 means;
units per second after merging; codebook usage.

    python bench/resynth_quality.py --corpus runs/voice/corpus [--n 100]
    python bench/resynth_quality.py --split dev --variants whole --vocoder DIR   # choosing
    python bench/resynth_quality.py --answers runs/data/sharegpt-default --n 30

--answers scores the spoken answers of a data build instead: the response audio of its
held-out items (the split training holds out: 10 %, the first --n), which are longer
than the corpus sentences and hold digits and names.
Choose between vocoders (checkpoints, settings) on the dev split, with --variants whole
for speed, and measure the chosen one once on test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from llama_omni.data.manifest import read_manifest as read_data_manifest
from llama_omni.eval.wer import corpus_wer, median_wer
from llama_omni.inference.vocoder_stream import StreamingVocoder, VocoderStreamOptions
from llama_omni.model.vocoder import load_vocoder
from llama_omni.train.data import is_heldout
from llama_omni.train.voice_corpus import read_manifest
from llama_omni.units.extract import DEFAULT_UNITS_DIR, UnitExtractor
from llama_omni.units.quality import ASR, dnsmos

OMEGAS = (10, 40)
HELDOUT_FRACTION = 0.1  # --answers: the training configs' data.eval_fraction
VARIANTS = ("source", "whole", "whole_true_durations",
            *(f"{kind}{o}" for kind in ("omega", "seamless") for o in OMEGAS))


def chunked(vocoder, units: np.ndarray, omega: int) -> np.ndarray:
    """Independent-chunk vocoding: every Omega units alone, durations predicted per chunk."""
    return np.concatenate([vocoder.vocode(units[i:i + omega])
                           for i in range(0, len(units), omega)])


def seamless(vocoder, units: np.ndarray, omega: int) -> np.ndarray:
    """The streaming engine's default: chunks of Omega units through the seamless vocoder."""
    stream = StreamingVocoder(vocoder, VocoderStreamOptions(mode="seamless"))
    with stream.streaming(1):
        pieces = [
            stream.push(0, units[i:i + omega].tolist(), final=i + omega >= len(units))
            for i in range(0, len(units), omega)
        ]
    return np.concatenate(pieces)


def render(variant: str, vocoder, source: np.ndarray, units: np.ndarray,
           durations: np.ndarray) -> np.ndarray:
    """The audio of one variant (see VARIANTS) of a sentence."""
    if variant == "source":
        return source
    if variant == "whole":
        return vocoder.vocode(units)
    if variant == "whole_true_durations":
        return vocoder.vocode(units, durations)
    kind, omega = variant.rstrip("0123456789"), int(variant.lstrip("abcdefghijklmnopqrstuvwxyz"))
    return chunked(vocoder, units, omega) if kind == "omega" else seamless(vocoder, units, omega)


def heldout_sentences(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(id, 16 kHz audio path, text) of the sentences to score."""
    if args.answers is None:
        test = read_manifest(args.corpus, args.split)[:args.n]
        return [(u.id, u.wav_path(args.corpus), u.text) for u in test]
    held = [item for item in read_data_manifest(args.answers)
            if is_heldout(item["id"], HELDOUT_FRACTION)][:args.n]
    return [(item["id"], args.answers / answer["audio"], answer["text"])
            for item in held for answer in item["turns"][1:2] if answer.get("audio")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/voice/corpus"))
    parser.add_argument("--answers", type=Path, default=None,
                        help="a data build directory: score its held-out spoken answers")
    parser.add_argument("--units-model", type=Path, default=DEFAULT_UNITS_DIR)
    parser.add_argument("--vocoder", type=Path, default=DEFAULT_UNITS_DIR.parent / "vocoder-hibari")
    parser.add_argument("--n", type=int, default=100, help="held-out sentences to score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-wavs", type=Path, default=None, help="write the outputs here")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="held-out sentences: dev for choices, test for the reported numbers")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    started = time.monotonic()

    test = heldout_sentences(args)
    if not test:
        raise SystemExit(f"{args.answers or args.corpus}: no held-out sentences with audio")
    extractor = UnitExtractor.load(args.units_model)
    vocoder = load_vocoder(args.vocoder)
    asr = ASR(threads=args.threads)
    hyps: dict[str, list[str]] = {v: [] for v in variants}
    mos: dict[str, list[dict]] = {v: [] for v in variants}
    counts = np.zeros(extractor.config.num_units)
    n_units, seconds = 0, 0.0
    for utt_id, path, _ in tqdm(test, desc="resynth", unit="utt"):
        source, rate = sf.read(path, dtype="float32")
        if rate != 16000:
            raise SystemExit(f"{path}: {rate} Hz audio, the units model reads 16 kHz")
        units, durations = extractor(source)
        np.add.at(counts, units, 1)
        n_units, seconds = n_units + len(units), seconds + len(source) / 16000
        for name in variants:
            wave = render(name, vocoder, source, units, durations)
            hyps[name].append(asr(wave))
            mos[name].append(dnsmos(wave))
            if args.save_wavs:
                args.save_wavs.mkdir(parents=True, exist_ok=True)
                sf.write(args.save_wavs / f"{utt_id}_{name}.wav", wave, 16000)
    texts = [text for _, _, text in test]
    probs = counts[counts > 0] / counts.sum()
    result = dict(
        sentences=len(test), split="answers" if args.answers else args.split,
        units_model=str(args.units_model), vocoder=str(args.vocoder),
        wer={v: round(corpus_wer(texts, hyps[v]), 2) for v in variants},
        wer_median={v: round(median_wer(texts, hyps[v]), 2) for v in variants},
        dnsmos={v: {k: round(float(np.mean([m[k] for m in mos[v]])), 3) for k in mos[v][0]}
                for v in variants},
        units_per_second=round(n_units / seconds, 2),
        codebook_used=int((counts > 0).sum()), codebook_size=len(counts),
        codebook_perplexity=round(float(np.exp(-(probs * np.log(probs)).sum())), 1),
        seconds=round(time.monotonic() - started, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
