"""`llama-omni train stage1|stage2|align|export|heldout`: the two training stages, the optional
adaptor pre-alignment, export of a training checkpoint, and held-out scoring of a model.

Every config field can be set from the command line with `--set key.path=value`
(repeatable; values are YAML scalars), and the common ones have typed options. On
several GPUs or nodes, start the same command through accelerate, e.g.
`accelerate launch --config_file configs/accelerate/zero2.yaml $(which llama-omni) train stage1 CONFIG`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

train_app = typer.Typer(
    name="train",
    help="Train LLaMA-Omni: stage 1 (speech -> text), stage 2 (speech decoder), align "
    "(optional adaptor pre-alignment), export, heldout.",
    no_args_is_help=True,
)

ConfigArg = Annotated[Path, typer.Argument(help="training config (YAML), e.g. configs/train/small-stage1.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override any config field: --set optim.lr=1e-4 (repeatable)")]
OutputOpt = Annotated[Path | None, typer.Option(help="run directory (checkpoints, logs, final/)")]
DataOpt = Annotated[Path | None, typer.Option(help="training data: manifest directory or published JSON")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    help="start from this llama-omni / published checkpoint instead of the config's preset")]
LrOpt = Annotated[float | None, typer.Option(help="peak learning rate")]
StepsOpt = Annotated[int | None, typer.Option(help="stop after this many optimizer steps")]
EpochsOpt = Annotated[int | None, typer.Option(help="passes over the training data")]
BatchOpt = Annotated[int | None, typer.Option(help="effective batch size (over accumulation and GPUs)")]
MicroOpt = Annotated[int | None, typer.Option(help="items per forward pass and device")]
PrecisionOpt = Annotated[str | None, typer.Option(help="fp32 or bf16 (mixed precision)")]
ResumeOpt = Annotated[bool | None, typer.Option(
    "--resume/--no-resume", help="continue from the run directory's latest checkpoint")]
PrintOpt = Annotated[bool, typer.Option(help="print the resolved config and exit")]


@train_app.command("stage1")
def stage1(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputOpt = None,
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    tuning: Annotated[str | None, typer.Option(help="full, lora or adaptor")] = None,
    lr: LrOpt = None,
    max_steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    micro_batch_size: MicroOpt = None,
    precision: PrecisionOpt = None,
    resume: ResumeOpt = None,
    print_config: PrintOpt = False,
) -> None:
    """Stage 1: train the adaptor and the LLM (full, LoRA or adaptor only) on speech -> text."""
    _run("stage1", config, set_, print_config, output_dir, {
        "data.train": data, "tuning": tuning, "optim.lr": lr, "max_steps": max_steps,
        "epochs": epochs, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
        "precision": precision, "resume": resume,
    }, checkpoint=checkpoint)


def _frozen_llm_stage(stage: str):
    """The command of a stage that trains one part under a frozen LLM (no tuning option)."""

    def command(
        config: ConfigArg,
        set_: SetOpt = None,
        output_dir: OutputOpt = None,
        data: DataOpt = None,
        checkpoint: CheckpointOpt = None,
        lr: LrOpt = None,
        max_steps: StepsOpt = None,
        epochs: EpochsOpt = None,
        batch_size: BatchOpt = None,
        micro_batch_size: MicroOpt = None,
        precision: PrecisionOpt = None,
        resume: ResumeOpt = None,
        print_config: PrintOpt = False,
    ) -> None:
        _run(stage, config, set_, print_config, output_dir, {
            "data.train": data, "optim.lr": lr, "max_steps": max_steps, "epochs": epochs,
            "batch_size": batch_size, "micro_batch_size": micro_batch_size,
            "precision": precision, "resume": resume,
        }, checkpoint=checkpoint)

    return command


train_app.command("stage2", help="Stage 2: train the speech decoder with CTC on the frozen "
                  "LLM's answer states.")(_frozen_llm_stage("stage2"))
train_app.command("align", help="Optional, before stage 1: train the adaptor alone with CTC "
                  "onto the LLM's token embeddings of each question's transcript; its "
                  "final/ starts stage 1 (--checkpoint).")(_frozen_llm_stage("align"))


@train_app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="a training run directory")],
    out: Annotated[Path, typer.Argument(help="directory to write the llama-omni checkpoint to")],
    step: Annotated[int | None, typer.Option(help="checkpoint step (default: the latest)")] = None,
    merge_lora: Annotated[bool, typer.Option(
        "--merge-lora/--no-merge-lora", help="fold LoRA adapters into the LLM weights")] = True,
) -> None:
    """Export a training checkpoint as a llama-omni checkpoint directory."""
    from llama_omni.train.export import export_run

    path = export_run(run_dir, out, step=step, merge=merge_lora)
    typer.echo(f"exported {run_dir} to {path}")


@train_app.command("heldout")
def heldout(
    config: Annotated[Path, typer.Argument(help="the run's training config (gives the held-out split)")],
    checkpoint: Annotated[Path | None, typer.Argument(
        help="model to score; omit to score the config's starting model (the 'before')")] = None,
    set_: SetOpt = None,
    vocoder: Annotated[Path | None, typer.Option(
        help="unit vocoder directory: also score the units by ASR-WER (stage 2)")] = None,
    items: Annotated[int, typer.Option(help="held-out items to score (the first N)")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="longest generated answer")] = 128,
    answers: Annotated[bool, typer.Option(
        "--answers/--no-answers", help="generate answers and score them (ROUGE-L)")] = True,
    out: Annotated[Path | None, typer.Option(help="write the report (with examples) as JSON")] = None,
) -> None:
    """Score a model on the run's held-out items: ROUGE-L of its answers against the
    references and, with --vocoder, the ASR word error rate of its units."""
    import json

    from llama_omni.model.vocoder import load_vocoder
    from llama_omni.train.config import TrainConfig
    from llama_omni.train.heldout import evaluate, load_for_heldout
    from llama_omni.train.run import load_conversations

    cfg = TrainConfig.load(config, set_ or [])
    _, heldout_items = load_conversations(cfg.data)
    if not heldout_items:
        raise ValueError(f"{config}: no held-out items (set data.eval or data.eval_fraction)")
    model = load_for_heldout(checkpoint, cfg)
    report = evaluate(model, heldout_items[:items], max_new_tokens=max_new_tokens,
                      vocoder=load_vocoder(vocoder) if vocoder else None, answers=answers)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "examples"}))


def _run(stage: str, config: Path, overrides: list[str] | None, print_only: bool,
         output_dir: Path | None, typed: dict[str, Any], checkpoint: Path | None) -> None:
    from llama_omni.train.config import TrainConfig

    values = {k: str(v) if isinstance(v, Path) else v for k, v in typed.items() if v is not None}
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    if checkpoint is not None:
        values.update({"model.checkpoint": str(checkpoint), "model.preset": None})
    cfg = TrainConfig.load(config, overrides or [], stage=stage, **values)
    if print_only:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from llama_omni.train.run import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file
    final = train(cfg)
    typer.echo(f"trained model: {final}")
