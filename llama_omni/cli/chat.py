"""`llama-omni chat`: answer a spoken question with streamed text and a spoken reply."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import soundfile as sf
import typer

from llama_omni.inference.events import Answer, Event, TextDelta


def chat(
    audio: Annotated[
        Path | None,
        typer.Argument(
            help="Sound file with the spoken question (any rate / channel count; omit with "
            "--interactive)."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint directory (ours or the published format); default: the installed "
            "default model."
        ),
    ] = None,
    vocoder: Annotated[
        Path | None,
        typer.Option(help="Vocoder directory; default: the one the model's config names."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Where to write the spoken reply (wav). Interactive turns add _1, _2, ..."
        ),
    ] = Path("reply.wav"),
    chunk_size: Annotated[
        str,
        typer.Option(help="Omega: new units per vocoder call, or 'inf' to vocode once at the end."),
    ] = "40",
    temperature: Annotated[float, typer.Option(help="0 = greedy (reproducible).")] = 0.0,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling mass (with temperature > 0).")
    ] = 0.7,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(help="> 1 makes tokens the answer already holds less likely; 1 = off; "
                     "default: the model's own (its config's llm.repetition_penalty)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 512,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object per answer instead of streaming text."),
    ] = False,
    interactive: Annotated[
        bool,
        typer.Option(
            help="Multi-turn: read one sound-file path per line from stdin (an empty line or "
            "EOF ends, /reset forgets the conversation)."
        ),
    ] = False,
) -> None:
    """Answer spoken questions: print the text as it streams and write the spoken reply.

    Without a vocoder for the model's units, the text and the units are still printed,
    with the reason there is no audio.
    """
    from llama_omni.inference.engine import Engine, EngineOptions, vocoder_mismatch
    from llama_omni.inference.sampling import SamplingOptions

    if (audio is None) != interactive:
        raise typer.BadParameter("give AUDIO, or --interactive without AUDIO", param_hint="AUDIO")
    options = EngineOptions(
        sampling=_checked(
            lambda: SamplingOptions(temperature, top_p, repetition_penalty=repetition_penalty),
            "--temperature/--top-p/--repetition-penalty",
        ),
        max_new_tokens=_checked(lambda: _positive(max_new_tokens), "--max-new-tokens"),
        chunk_size=_checked(lambda: _omega(chunk_size), "--chunk-size"),
        # One answer is over before a speech child process would be up: keep it in-process.
        speech_process=None if interactive else False,
    )
    wave = None if interactive else _read(audio)  # a bad file fails before the model loads
    omni, voice = _load(model, vocoder)
    no_audio = vocoder_mismatch(omni, voice)
    engine = Engine(omni, None if no_audio else voice, options)
    if interactive:
        _interactive(engine, out, as_json, no_audio)
        return
    report = _turn(engine.stream([wave]), out, as_json, no_audio)
    if as_json:
        typer.echo(json.dumps(report))


def _load(model: Path | None, vocoder: Path | None):
    from llama_omni.inference.defaults import DEFAULT_MODEL_DIR, default_model_dir, model_vocoder
    from llama_omni.model.checkpoint import load_model

    model = model or default_model_dir()
    if model is None:
        raise typer.BadParameter(
            f"no --model given and no default model is installed at {DEFAULT_MODEL_DIR}",
            param_hint="--model",
        )
    omni = load_model(model)
    return omni, model_vocoder(omni, model, vocoder)


def _interactive(engine, out: Path, as_json: bool, no_audio: str | None) -> None:
    from llama_omni.inference.session import Conversation

    conversation = Conversation(engine)
    for turn, line in enumerate(_lines(), start=1):
        if line == "/reset":
            conversation.reset()
            typer.echo("(conversation reset)", err=True)
            continue
        target = out.with_name(f"{out.stem}_{turn}{out.suffix}")
        try:
            report = _turn(conversation.ask(_read(Path(line))), target, as_json, no_audio)
        except typer.BadParameter as err:
            typer.echo(f"error: {err.message}", err=True)
            continue
        if as_json:
            typer.echo(json.dumps(report))


def _lines() -> Iterator[str]:
    """Non-empty stripped stdin lines until an empty line or EOF."""
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            return
        yield line


def _read(path: Path) -> np.ndarray:
    from llama_omni.audio import load_audio

    try:
        return load_audio(path)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="AUDIO") from err


def _turn(
    events: Iterator[Event], out: Path, as_json: bool, no_audio: str | None
) -> dict[str, Any]:
    """Stream one answer (printing the text unless JSON), write its wav, return the report."""
    try:
        first = next(events)  # the speech is encoded here: its errors are the input's
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="AUDIO") from err
    answer = Answer()
    for event in _chain(first, events):
        answer.add(event)
        if isinstance(event, TextDelta) and not as_json:
            typer.echo(event.text, nl=False)
    written = _write(answer, out) if answer.chunks else None
    if not as_json:
        _summary(answer, written, no_audio)
    return _report(answer, written, no_audio)


def _chain(first: Event, rest: Iterator[Event]) -> Iterator[Event]:
    yield first
    yield from rest


def _write(answer: Answer, out: Path) -> Path:
    from llama_omni.model.vocoder import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        sf.write(tmp, answer.audio, answer.sample_rate, subtype="PCM_16", format="WAV")
    return out


def _summary(answer: Answer, written: Path | None, no_audio: str | None) -> None:
    typer.echo("")
    typer.echo(f"units ({len(answer.units)}): {' '.join(map(str, answer.units))}")
    if written is not None:
        typer.echo(
            f"audio: {written} ({answer.audio_seconds:.2f} s; first audio after "
            f"{answer.first_audio_ms:.0f} ms, {answer.lagging_words} words in)"
        )
    else:
        typer.echo(f"no audio: {no_audio or 'the answer produced no units'}")


def _report(answer: Answer, written: Path | None, no_audio: str | None) -> dict[str, Any]:
    return {
        "text": answer.text,
        "text_token_ids": answer.token_ids,
        "units": answer.units,
        "first_text_ms": answer.first_text_ms,
        "first_audio_ms": answer.first_audio_ms,
        "total_ms": answer.total_ms,
        "lagging_words": answer.lagging_words,
        "audio_seconds": answer.audio_seconds,
        "audio_path": str(written) if written else None,
        "no_audio_reason": None if written else (no_audio or "the answer produced no units"),
    }


def _omega(text: str) -> int | None:
    if text.strip().lower() in ("inf", "infinity"):
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive number of units or 'inf', got {text!r}")
    return int(text)


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _checked(make, hint: str):
    try:
        return make()
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=hint) from err
