"""`llama-omni data ...`: build InstructS2S-style data sets, export and import them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llama_omni.data.config import STEPS, DataConfig
from llama_omni.data.report import format_report

data_app = typer.Typer(help="Build speech instruction data (InstructS2S recipe): rewrite, "
                            "respond, synthesize, units.", no_args_is_help=True)

ConfigArg = Annotated[Path, typer.Argument(help="Data build config (YAML), see configs/data/.")]
ShardOpt = Annotated[str | None, typer.Option(
    help="Work on shard i of n (e.g. 0/4): items are dealt round-robin.")]
WorkersOpt = Annotated[int | None, typer.Option(
    help="Worker processes for speech synthesis (default: synthesize.workers).")]
RetryOpt = Annotated[bool, typer.Option(help="Give failed items another try.")]
OutOpt = Annotated[Path | None, typer.Option(help="Override the config's output directory.")]
StepsOpt = Annotated[str, typer.Option(
    help="Comma-separated steps to run, in pipeline order (e.g. rewrite,respond,synthesize: "
         "stage-1 data, no units).")]


def parse_steps(text: str) -> tuple[str, ...]:
    """'rewrite,respond' -> the named steps in pipeline order; unknown names are an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise typer.BadParameter(f"unknown or no step(s) {unknown or text!r}; "
                                 f"choose from {','.join(STEPS)}", param_hint="--steps")
    return tuple(step for step in STEPS if step in names)


def _run(config_path: Path, steps: tuple[str, ...], shard: str | None, workers: int | None,
         retry_failed: bool, out: Path | None) -> None:
    from llama_omni.data.pipeline import Pipeline
    from llama_omni.data.state import Shard

    config = DataConfig.load(config_path)
    if out is not None:
        config = config.replace(out=str(out))
    pipeline = Pipeline(config, Shard.parse(shard), workers, retry_failed,
                        log=lambda line: typer.echo(line, err=True))
    report = pipeline.run(steps)
    typer.echo(format_report(report))
    typer.echo(f"data set: {Path(config.out) / 'manifest.jsonl'} (report: report.json)")


@data_app.command("build")
def data_build(config: ConfigArg, shard: ShardOpt = None, workers: WorkersOpt = None,
               retry_failed: RetryOpt = False, out: OutOpt = None,
               steps: StepsOpt = ",".join(STEPS)) -> None:
    """Run the steps (all by default: rewrite, respond, synthesize, units) wave by wave;
    resumes where a run stopped."""
    _run(config, parse_steps(steps), shard, workers, retry_failed, out)


@data_app.command("rewrite")
def data_rewrite(config: ConfigArg, shard: ShardOpt = None, retry_failed: RetryOpt = False,
                 out: OutOpt = None) -> None:
    """Rewrite instructions in a spoken style (LLM with rule-based fallback)."""
    _run(config, ("rewrite",), shard, None, retry_failed, out)


@data_app.command("respond")
def data_respond(config: ConfigArg, shard: ShardOpt = None, retry_failed: RetryOpt = False,
                 out: OutOpt = None) -> None:
    """Generate concise spoken-style responses."""
    _run(config, ("respond",), shard, None, retry_failed, out)


@data_app.command("synthesize")
def data_synthesize(config: ConfigArg, shard: ShardOpt = None, workers: WorkersOpt = None,
                    retry_failed: RetryOpt = False, out: OutOpt = None) -> None:
    """Speak instructions (random seeded voice each) and responses (the fixed voice)."""
    _run(config, ("synthesize",), shard, workers, retry_failed, out)


@data_app.command("units")
def data_units(config: ConfigArg, shard: ShardOpt = None, retry_failed: RetryOpt = False,
               out: OutOpt = None) -> None:
    """Extract discrete units of the response speech (needs a units model)."""
    _run(config, ("units",), shard, None, retry_failed, out)


@data_app.command("export")
def data_export(
    manifest_dir: Annotated[Path, typer.Argument(help="Data set directory (manifest.jsonl).")],
    to: Annotated[Path, typer.Option(help="Directory for the Hugging Face dataset.")],
    embed_audio: Annotated[bool, typer.Option(help="Store audio bytes, not paths.")] = False,
) -> None:
    """Export a data set as a Hugging Face `datasets` dataset (save_to_disk)."""
    from llama_omni.data.export import to_hf_dataset

    dataset = to_hf_dataset(manifest_dir, embed_audio=embed_audio)
    dataset.save_to_disk(str(to))
    typer.echo(f"wrote {len(dataset)} rows to {to}")


@data_app.command("import-published")
def data_import_published(
    json_file: Annotated[Path, typer.Argument(help="LLaMA-Omni data JSON (LLaVA style).")],
    out: Annotated[Path, typer.Option(help="Data set directory to write.")],
    audio_root: Annotated[Path | None, typer.Option(
        help="Directory the 'speech' paths are relative to (default: the JSON's "
             "directory).")] = None,
) -> None:
    """Convert the published LLaMA-Omni data format into a manifest (audio converted to FLAC)."""
    from llama_omni.data.export import import_published

    count = import_published(json_file, out, audio_root)
    typer.echo(f"wrote {count} items to {out / 'manifest.jsonl'}")


@data_app.command("serve-llm")
def data_serve_llm(
    model: Annotated[str, typer.Option(help="HF model directory or packaged name.")] = (
        "packaged:smollm2-135m-instruct"),
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: int = 8000,
    threads: int = 1,
) -> None:
    """Serve a local model over the OpenAI chat protocol (for shards with `llm.kind: openai`)."""
    from llama_omni.data.chat_server import make_server
    from llama_omni.data.llm_backends import TransformersChatBackend

    server = make_server(TransformersChatBackend(model, 1, threads), model, host, port)
    typer.echo(f"serving {model} at http://{host}:{server.server_address[1]}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
