"""`llama-omni vocoder corpus|train`: build the default voice's corpus, train a unit vocoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

vocoder_app = typer.Typer(help="Unit vocoder training (HiFi-GAN with duration predictor).",
                          no_args_is_help=True)


@vocoder_app.command("corpus")
def vocoder_corpus(
    out: Annotated[Path, typer.Argument(help="Corpus directory (manifest.jsonl + wav/).")],
    n_train: Annotated[int, typer.Option(help="Training sentences.")] = 2400,
    n_dev: Annotated[int, typer.Option(help="Development sentences (samples, selection).")] = 20,
    n_test: Annotated[int, typer.Option(help="Held-out test sentences (metrics).")] = 100,
    workers: Annotated[int, typer.Option(help="Parallel TTS processes.")] = 2,
) -> None:
    """Speak ShareGPT sentences with the hibari voice (16 kHz); resumable.

    The test and dev sentences are chosen by hash, never overlap the training sentences,
    and stay the same whatever --n-train is.
    """
    from llama_omni.train.voice_corpus import build_corpus

    utterances = build_corpus(out, n_test, n_dev, n_train, workers)
    hours = sum(u.samples for u in utterances if u.split == "train") / 16000 / 3600
    typer.echo(f"{out}: {len(utterances)} utterances, {hours:.2f} h of training speech")


@vocoder_app.command("train")
def vocoder_train(
    corpus: Annotated[Path, typer.Option(help="Voice corpus directory.")],
    units: Annotated[Path, typer.Option(
        help="Frame-level units of the corpus (.npz from `llama-omni units extract`).")],
    run_dir: Annotated[Path, typer.Option(
        help="Checkpoints, logs and samples; training resumes from its last.pt.")],
    num_units: Annotated[int, typer.Option(help="Unit vocabulary size (the k-means K).")],
    export_dir: Annotated[Path | None, typer.Option(
        help="Also save the generator here (vocoder.json + safetensors) at every checkpoint."
    )] = None,
    preset: Annotated[str, typer.Option(help="Vocoder size preset (VocoderConfig.preset).")
                      ] = "istft-256",
    steps: Annotated[int, typer.Option(help="Train until this step.")] = 20000,
    batch_size: int = 8,
    segment_frames: Annotated[int, typer.Option(help="20 ms unit frames per segment.")] = 24,
    disc_width: Annotated[float, typer.Option(
        help="Discriminator channels as a fraction of HiFi-GAN's.")] = 0.25,
    disc_periods: Annotated[str, typer.Option(
        help="Comma-separated periods of the multi-period discriminator; add 16 (the "
             "iSTFT head's hop) to penalize frame-rate tones.")] = "2,3,5,7,11",
    gan_start_step: Annotated[int, typer.Option(
        help="Train with mel + duration losses only until this step.")] = 0,
    mel_weight: Annotated[float, typer.Option(
        help="Weight of the mel L1 loss (HiFi-GAN: 45). Units carry little pitch, and a "
             "lower weight leaves more to the adversarial losses, which reward clean "
             "harmonics over the mel loss's pitch-averaged spectra.")] = 45.0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    samples: Annotated[int, typer.Option(help="Dev utterances vocoded at checkpoints.")] = 2,
    init_generator: Annotated[Path | None, typer.Option(
        help="A new run starts from this saved generator (a vocoder directory) instead of "
             "random weights; ignored when the run dir has a checkpoint to resume.")] = None,
    init_matching: Annotated[bool, typer.Option(
        help="With --init-generator of another preset: copy only the tensors whose names "
             "and shapes match (a warm start), the rest start random.")] = False,
    seed: int = 0,
    threads: Annotated[int, typer.Option(
        help="Torch threads; on a CPU shared with other jobs 1 is fastest.")] = 1,
) -> None:
    """Train (or resume) a unit vocoder on a voice corpus and its units.

    A killed run continues exactly where its last checkpoint left off when started again
    with the same --run-dir and model options; --steps may be raised to train longer.
    """
    import torch

    from llama_omni.model.vocoder import VocoderConfig
    from llama_omni.train.vocoder import VocoderTrainConfig, VocoderTrainer, estimate_steps_per_second
    from llama_omni.train.vocoder_data import VocoderData, load_frame_units
    from llama_omni.train.voice_corpus import read_manifest

    try:
        periods = tuple(int(p) for p in disc_periods.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {disc_periods!r}",
                                 param_hint="--disc-periods") from None
    torch.set_num_threads(threads)
    config = VocoderTrainConfig(
        vocoder=VocoderConfig.preset(preset).replace(num_units=num_units),
        disc_width=disc_width, disc_periods=periods, gan_start_step=gan_start_step,
        mel_weight=mel_weight, steps=steps, batch_size=batch_size,
        segment_frames=segment_frames, checkpoint_every=checkpoint_every, seed=seed,
        threads=threads)
    data = VocoderData(corpus, units, "train", hop=config.vocoder.hop_length)
    if data.skipped:
        typer.echo(f"training on {len(data.ids)} utterances; {data.skipped} have no units yet")
    frame_units = load_frame_units(units)
    dev = [u.id for u in read_manifest(corpus, "dev") if u.id in frame_units][:samples]
    trainer = VocoderTrainer(config, run_dir, data, export_dir,
                             samples={uid: frame_units[uid] for uid in dev})
    if trainer.maybe_resume():
        typer.echo(f"resumed {run_dir} at step {trainer.step}")
    else:
        if init_generator is not None:
            copied = trainer.init_generator(init_generator, matching_only=init_matching)
            total = len(trainer.generator.state_dict())
            typer.echo(f"generator initialized from {init_generator} "
                       f"({copied} of {total} tensors)")
        typer.echo(f"new run in {run_dir}: {estimate_steps_per_second(trainer):.2f} steps/s")
    trainer.train()


if __name__ == "__main__":
    vocoder_app()
