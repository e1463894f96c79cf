"""CPU cost of the vocoder's output filters next to the vocoder itself: prints one JSON object.

    python bench/postfilter_cost.py [--vocoder DIR] [--seconds 10] [--repeats 5] [--threads 1]

Vocodes random units for --seconds of audio with the vocoder's own config, then times, in
one process and alternating, the generator alone and each output filter (the frame-rate
notches, the pitch post-filter) on that audio. Figures are medians, in milliseconds per
second of audio, plus each filter's share of the generator's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llama_omni.inference.defaults import DEFAULT_VOCODER_DIR
from llama_omni.model.vocoder import load_vocoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocoder", type=Path, default=DEFAULT_VOCODER_DIR)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocoder = load_vocoder(args.vocoder).eval()
    config = vocoder.config
    frames = int(args.seconds * config.sample_rate / config.hop_length)
    units = np.random.default_rng(0).integers(0, config.num_units, frames // 2)
    durations = np.full(len(units), 2)  # [U] 2 frames each: --seconds of audio

    def generator() -> np.ndarray:
        with torch.inference_mode():
            return vocoder(torch.as_tensor(units)[None], torch.as_tensor(durations)[None])[0, 0].numpy()

    audio = generator()
    seconds = len(audio) / config.sample_rate
    output_filter = vocoder.make_postfilter()
    stages = {type(s).__name__: s for s in (output_filter.stages if output_filter else [])}
    timings: dict[str, list[float]] = {"generator": [], **{name: [] for name in stages}}
    for _ in range(args.repeats):
        start = time.perf_counter()
        generator()
        timings["generator"].append(time.perf_counter() - start)
        for name, stage in stages.items():
            start = time.perf_counter()
            stage.apply(audio)
            timings[name].append(time.perf_counter() - start)
    ms_per_second = {k: round(1000 * statistics.median(v) / seconds, 2) for k, v in timings.items()}
    print(json.dumps(dict(
        vocoder=str(args.vocoder), audio_seconds=round(seconds, 2), threads=args.threads,
        repeats=args.repeats, ms_per_audio_second=ms_per_second,
        share_of_generator={k: round(v / ms_per_second["generator"], 3)
                            for k, v in ms_per_second.items() if k != "generator"})))


if __name__ == "__main__":
    main()
