"""`llama-omni info`: what a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def info(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory (ours or the published format)")],
    speech_encoder: Annotated[
        Path | None, typer.Option(help="openai-whisper .pt overriding config.json's speech_encoder")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Print a checkpoint's configuration and parameter counts per component."""
    from llama_omni.model.checkpoint import load_model

    model = load_model(checkpoint, speech_encoder=speech_encoder)
    counts = model.parameter_counts()
    report = {
        "checkpoint": str(checkpoint),
        "config": model.config.to_dict(),
        "parameters": {**counts, "total": sum(counts.values())},
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"checkpoint: {checkpoint}")
    for name, section in report["config"].items():
        typer.echo(f"{name}: {json.dumps(section)}")
    typer.echo("parameters:")
    for name, count in report["parameters"].items():
        typer.echo(f"  {name:<15} {count:>15,}")
