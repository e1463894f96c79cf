"""`llama-omni resynth`: speech -> units -> speech, to hear what the units keep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import soundfile as sf
import typer

from llama_omni.units.extract import DEFAULT_UNITS_DIR

DEFAULT_VOCODER_DIR = DEFAULT_UNITS_DIR.parent / "vocoder-hibari"


def resynth(
    audio: Annotated[Path, typer.Argument(help="Input speech (any rate; resampled to 16 kHz).")],
    out: Annotated[Path, typer.Option(help="Output wav file (16 kHz, 16-bit PCM).")],
    units_model: Annotated[Path, typer.Option(help="Units model directory.")] = DEFAULT_UNITS_DIR,
    vocoder: Annotated[Path, typer.Option(
        help="Vocoder directory (ours, or fairseq g_* + config.json).")] = DEFAULT_VOCODER_DIR,
    true_durations: Annotated[bool, typer.Option(
        help="Keep each unit's measured run length instead of the predicted duration.")] = False,
    threads: int = 2,
) -> None:
    """Resynthesize speech from its discrete units with a unit vocoder.

    Repeated units are merged as the speech decoder sees them; the vocoder's duration
    predictor then chooses how long each unit lasts (or --true-durations keeps the input's
    timing).
    """
    import torch

    from llama_omni.audio import load_audio
    from llama_omni.model.vocoder import atomic_path, load_vocoder
    from llama_omni.units.extract import UnitExtractor

    torch.set_num_threads(threads)
    extractor = UnitExtractor.load(units_model)
    model = load_vocoder(vocoder)
    if model.config.num_units != extractor.config.num_units:
        raise typer.BadParameter(
            f"the vocoder knows {model.config.num_units} units but the units model makes "
            f"{extractor.config.num_units}: pass a matching pair", param_hint="--vocoder")
    speech = load_audio(audio)  # [T] 16 kHz
    units, durations = extractor(speech)
    wave = model.vocode(units, durations if true_durations else None)  # [T]
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = model.config.sample_rate
    with atomic_path(out) as tmp:
        sf.write(tmp, wave, rate, subtype="PCM_16", format="WAV")
    seconds_in = len(speech) / 16000
    typer.echo(f"{out}: {len(units)} units from {seconds_in:.2f} s of speech "
               f"({len(units) / seconds_in:.1f}/s) -> {len(wave) / rate:.2f} s")
