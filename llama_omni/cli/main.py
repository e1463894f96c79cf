"""Entry point of the `llama-omni` command: registers each subcommand's typed function."""

from __future__ import annotations

import sys

import typer

from llama_omni.cli.chat import chat
from llama_omni.cli.eval import evaluate
from llama_omni.cli.data import data_app
from llama_omni.cli.info import info
from llama_omni.cli.resynth import resynth
from llama_omni.cli.serve import gradio, serve
from llama_omni.cli.setup import setup
from llama_omni.cli.train import train_app
from llama_omni.cli.units import units_app
from llama_omni.cli.vocode import vocode
from llama_omni.cli.vocoder import vocoder_app

app = typer.Typer(
    name="llama-omni",
    help="Speech in, text and speech out: the LLaMA-Omni system.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(setup)
app.command()(info)
app.command()(vocode)
app.command()(chat)
app.command("eval")(evaluate)
app.command()(resynth)
app.command()(serve)
app.command()(gradio)
app.add_typer(train_app)
app.add_typer(data_app, name="data")
app.add_typer(units_app, name="units")
app.add_typer(vocoder_app, name="vocoder")


def main() -> None:
    """Run the CLI; expected errors (bad files, bad options) print one line, not a traceback."""
    from llama_omni.errors import USER_ERRORS

    try:
        app()
    except USER_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
