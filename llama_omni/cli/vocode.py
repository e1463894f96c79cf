"""`llama-omni vocode`: turn a unit sequence into a wav file with a unit vocoder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import soundfile as sf
import typer

from llama_omni.model.vocoder import atomic_path, load_vocoder


def vocode(
    vocoder: Annotated[Path, typer.Option(
        help="Vocoder directory (vocoder.json + vocoder.safetensors, or fairseq g_* + "
             "config.json) or one of its weight files.")],
    units: Annotated[str, typer.Option(
        help='Unit ids separated by spaces or commas, e.g. "12 7 7 431".')],
    out: Annotated[Path, typer.Option(help="Output wav file (16-bit PCM).")],
    durations: Annotated[str | None, typer.Option(
        help="Frames per unit, same separators and count as --units; predicted when omitted.")
    ] = None,
) -> None:
    """Vocode a unit sequence to speech and write it as a wav file.

    Each unit lasts its duration in frames (320 samples = 20 ms at 16 kHz for the
    published vocoder); without --durations the vocoder's duration predictor chooses them.
    """
    unit_ids = _parse_ints(units, "--units")
    frames = None if durations is None else _parse_ints(durations, "--durations")
    try:
        model = load_vocoder(vocoder)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--vocoder") from err
    try:
        wave = model.vocode(unit_ids, frames)  # [T]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = model.config.sample_rate
    with atomic_path(out) as tmp:
        sf.write(tmp, wave, rate, subtype="PCM_16", format="WAV")
    typer.echo(f"{out}: {len(unit_ids)} units, {len(wave) / rate:.2f} s of audio")


def _parse_ints(text: str, param: str) -> list[int]:
    tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    try:
        return [int(t) for t in tokens]
    except ValueError as err:
        raise typer.BadParameter(f"expected integers separated by spaces or commas, got "
                                 f"{text!r}", param_hint=param) from err
