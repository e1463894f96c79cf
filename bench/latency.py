"""Latency benchmark of the streaming engine: prints one JSON object.

    python bench/latency.py [--model DIR] [--vocoder DIR] [--audio WAV ...]
                            [--repeats N] [--answer-tokens N] [--threads N]

Model: --model, else the installed default model, else the "small" preset built untrained
(packaged Whisper base + packaged SmolLM2-135M-Instruct + random adaptor and speech
decoder, with the unit vocabulary of the vocoder below), which is good for timing only.
Vocoder: --vocoder, else the model's, else the packaged default voice, else a random one
for the model's units. Questions: --audio
files, else a few questions synthesized now (hibari, else espeak-ng).

Every answer has the same fixed length (--answer-tokens, stop tokens ignored), so runs
with and without speech, and with each Omega, decode the same number of tokens. All
figures are medians over the questions x --repeats runs, in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llama_omni.audio import load_audio
from llama_omni.inference.defaults import DEFAULT_VOCODER_DIR, default_model_dir, model_vocoder
from llama_omni.inference.engine import Engine, EngineOptions, vocoder_mismatch
from llama_omni.inference.events import Answer, collect
from llama_omni.model.checkpoint import load_model
from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.model.speech_decoder import SpeechDecoder
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, load_vocoder

OMEGAS = {"10": 10, "20": 20, "40": 40, "60": 60, "100": 100, "inf": None}
DECODER_LENGTHS = (20, 100, 400)
QUESTIONS = (
    "What is the capital of France?",
    "How do I make a good cup of tea?",
    "Can you tell me a fun fact about the ocean?",
)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, vocoder, model_label, vocoder_label = load_system(args.model, args.vocoder)
    audios = [load_audio(p) for p in args.audio] if args.audio else synthesize(QUESTIONS)
    runs, in_child = run_all(model, vocoder, audios, args.repeats, args.answer_tokens)
    report = {
        "model": model_label,
        "vocoder": vocoder_label,
        "questions": len(audios),
        "repeats": args.repeats,
        "threads": args.threads,
        "answer_tokens": args.answer_tokens,
        "fixed_length": "stop tokens ignored: every answer has answer_tokens tokens",
        **summarize(runs, in_child),
        **decoder_steps(model, args.repeats),
    }
    print(json.dumps(report, indent=2))


def run_all(model, vocoder, audios, repeats: int, tokens: int) -> tuple[dict, bool]:
    """Answers per configuration ("text": no speech; each Omega of OMEGAS; "40-in-process"),
    and whether the default engine ran its speech path in a child process."""
    # "text", "40" and "40-in-process" run back to back: their pairs give the overhead
    # ratios. "40" is the engine's default (on CPU: the speech path in a child process).
    configs = {
        "text": {"speech": False},
        "40": {"chunk_size": 40},
        "40-in-process": {"chunk_size": 40, "speech_process": False},
    }
    configs.update({k: {"chunk_size": o} for k, o in OMEGAS.items() if k != "40"})
    engines = {
        key: Engine(
            model, vocoder, EngineOptions(max_new_tokens=tokens, ignore_eos=True, **options)
        )
        for key, options in configs.items()
    }
    for audio in audios:  # warm-up: first calls allocate and tune kernels
        collect(engines["40"].stream([audio]), 1)
        collect(engines["40-in-process"].stream([audio]), 1)
    if engines["40"].speech_in_child_process:
        engines["40"].speech_worker.wait_ready()  # timed runs: all in the child process
    # Interleaved, so a change in machine load hits every configuration alike.
    runs: dict[str, list[Answer]] = {key: [] for key in configs}
    for _ in range(repeats):
        for audio in audios:
            for key, engine in engines.items():
                runs[key].append(collect(engine.stream([audio]), 1)[0])
    return runs, engines["40"].speech_in_child_process


def summarize(runs: dict[str, list[Answer]], speech_in_child_process: bool) -> dict:
    """Medians over the runs; the overhead ratio is the median of per-pair ratios (each
    pair: one question, text-only then text+speech back to back), so slow drifts of the
    machine's load cancel; its quartiles show how much the machine moved."""
    text_only, text_speech = runs["text"], runs["40"]
    return {
        "units_per_token": median(len(a.units) / len(a.token_ids) for a in text_speech),
        "first_text_ms": median(a.first_text_ms for a in text_only + text_speech),
        "first_audio_ms": {k: median(a.first_audio_ms for a in runs[k]) for k in OMEGAS},
        "lagging_words": {k: median(a.lagging_words for a in runs[k]) for k in OMEGAS},
        "text_only_ms": median(a.total_ms for a in text_only),
        "text_speech_ms": median(a.total_ms for a in text_speech),  # with Omega 40
        **overhead_ratio(text_only, text_speech, ""),
        "speech_in_child_process": speech_in_child_process,
        "text_speech_in_process_ms": median(a.total_ms for a in runs["40-in-process"]),
        **overhead_ratio(text_only, runs["40-in-process"], "_in_process"),
        "llm_tokens_per_s": median(
            (len(a.token_ids) - 1) * 1000 / (a.total_ms - a.first_text_ms) for a in text_only
        ),
        "real_time_factor": median(a.total_ms / 1000 / a.audio_seconds for a in text_speech),
    }


def overhead_ratio(text_only: list[Answer], text_speech: list[Answer], suffix: str) -> dict:
    """Median and quartiles of the per-pair ratios text+speech / text-only time."""
    ratios = [s.total_ms / t.total_ms for t, s in zip(text_only, text_speech)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        f"speech_overhead_ratio{suffix}": median(ratios),
        f"speech_overhead_ratio{suffix}_quartiles": [
            round(quartiles[0], 3),
            round(quartiles[2], 3),
        ],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint directory")
    parser.add_argument("--vocoder", type=Path, help="vocoder directory")
    parser.add_argument("--audio", type=Path, nargs="*", help="spoken questions (sound files)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per question")
    parser.add_argument("--answer-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per Python thread (the engine adds one helper thread)",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.answer_tokens < 2 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --answer-tokens >= 2")
    return args


def load_system(model_path: Path | None, vocoder_path: Path | None):
    """(model, vocoder, model label, vocoder label); see the module doc for the fallbacks."""
    model_dir = model_path or default_model_dir()
    model = load_model(model_dir).eval() if model_dir is not None else None
    vocoder = model_vocoder(model, model_dir, vocoder_path) if model is not None else None
    vocoder_label = str(vocoder_path or (model and model.config.vocoder_source))
    if vocoder is None and (vocoder_path or DEFAULT_VOCODER_DIR.is_dir()):
        vocoder_path = vocoder_path or DEFAULT_VOCODER_DIR
        vocoder, vocoder_label = load_vocoder(vocoder_path), str(vocoder_path)
    model_label = str(model_dir)
    if model is None:
        config = OmniConfig.preset("small")
        if vocoder is not None:  # untrained anyway: speak the vocoder's units
            decoder = config.speech_decoder.replace(unit_vocab=vocoder.config.num_units)
            config = config.replace(speech_decoder=decoder)
        model = OmniModel.initialize(config).eval()
        model_label = "small (untrained adaptor/decoder: timing only)"
    if vocoder is None:
        vocoder, vocoder_label = random_vocoder(model.config.speech_decoder.unit_vocab)
    problem = vocoder_mismatch(model, vocoder)
    if problem is not None:
        sys.exit(f"bench/latency.py: {problem}")
    return model, vocoder, model_label, vocoder_label


def random_vocoder(units: int) -> tuple[UnitVocoder, str]:
    try:
        config, name = VocoderConfig.preset("istft-256"), "istft-256"  # the default voice's size
    except ValueError:
        config, name = VocoderConfig(), "codehifigan-1000"
    vocoder = UnitVocoder(config.replace(num_units=units)).eval()
    return vocoder, f"random {name} with {units} units (timing only)"


def synthesize(texts: tuple[str, ...]) -> list[np.ndarray]:
    """Spoken questions at 16 kHz: the packaged hibari voice, else espeak-ng."""
    try:
        from llama_omni.data.tts import HibariTTS, TTSError

        tts = HibariTTS()
        return [tts.synthesize(t) for t in texts]
    except (ImportError, TTSError) as err:
        print(f"hibari unavailable ({err}); using espeak-ng", file=sys.stderr)
    waves = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"q{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
            waves.append(load_audio(path))
    return waves


def decoder_steps(model: OmniModel, repeats: int) -> dict:
    """Step costs of the model's decoder; for a windowed decoder, also of the same weights
    with full causal attention (the published architecture), measured in the same run."""
    steps = decoder_step_ms(model.speech_decoder, repeats)
    window = model.speech_decoder.config.attention_window
    report = {
        "decoder_attention_window": window,
        "decoder_step_ms": steps,
        "decoder_step_ratio_400_20": steps["incremental"]["400"] / steps["incremental"]["20"],
    }
    if window is not None:
        full, _ = model.speech_decoder.reconfigured(attention_window=None)
        full_steps = decoder_step_ms(full, repeats)
        report["decoder_step_ms_full_attention"] = full_steps["incremental"]
        report["decoder_step_ratio_400_20_full_attention"] = (
            full_steps["incremental"]["400"] / full_steps["incremental"]["20"]
        )
    return report


@torch.inference_mode()
def decoder_step_ms(decoder: SpeechDecoder, repeats: int) -> dict[str, dict[str, float]]:
    """ms per new token of the speech decoder at answer lengths DECODER_LENGTHS.

    incremental: the step adding token n to a KV cache over n-1 tokens (median over
    tokens n-2..n+2 and the repeats); recompute: one pass over all n tokens, as the
    published code runs at every token.
    """
    param = next(decoder.parameters())
    longest = max(DECODER_LENGTHS) + 2
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, longest, decoder.config.input_width, generator=generator)  # [1, M, D]
    states = states.to(param.device, param.dtype)
    per_step: list[list[float]] = [[] for _ in range(longest)]
    for _ in range(repeats):
        with decoder.streaming(1):
            for i in range(longest):
                start = time.perf_counter()
                log_probs, _ = decoder(states[:, i : i + 1])
                decoder.greedy_units(log_probs)
                per_step[i].append((time.perf_counter() - start) * 1000)
    incremental, recompute = {}, {}
    for n in DECODER_LENGTHS:
        incremental[str(n)] = median(t for i in range(n - 3, n + 2) for t in per_step[i])
        recompute[str(n)] = median(
            _timed(decoder.predict_units, states[:, :n]) for _ in range(repeats)
        )
    return {"incremental": incremental, "recompute": recompute}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


if __name__ == "__main__":
    main()
