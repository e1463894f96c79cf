"""`llama-omni units train|extract`: build a units model, turn speech into units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from tqdm import tqdm

from llama_omni.audio import load_audio
from llama_omni.units.extract import DEFAULT_UNITS_DIR, UnitExtractor, UnitsConfig, merge_repeats
from llama_omni.units.features import feature_extractor
from llama_omni.units.inputs import collect_audio
from llama_omni.units.kmeans import KMeansCodebook, train_kmeans

units_app = typer.Typer(help="Discrete speech units: k-means on speech-encoder features.",
                        no_args_is_help=True)

Inputs = Annotated[list[Path], typer.Argument(
    help="Audio files, directories of audio, or a voice corpus directory (manifest.jsonl).")]


@units_app.command("train")
def units_train(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Directory to write units.json + kmeans.safetensors.")],
    source: Annotated[str, typer.Option(
        help='Feature source: "packaged:whisper-base", a Whisper checkpoint/directory, or '
             '"hubert:<HF dir>".')] = "packaged:whisper-base",
    layer: Annotated[int, typer.Option(help="Encoder layer whose output is quantized.")] = 4,
    k: Annotated[int, typer.Option(help="Number of units (k-means clusters).")] = 500,
    split: Annotated[str, typer.Option(help="Split to use when an input is a corpus.")] = "train",
    max_files: Annotated[int, typer.Option(help="Use at most this many files.")] = 400,
    max_frames: Annotated[int, typer.Option(help="Fit on at most this many frames.")] = 150_000,
    seed: int = 0,
    threads: int = 2,
) -> None:
    """Fit a k-means units model on one layer of a speech encoder's features."""
    torch.set_num_threads(threads)
    files = collect_audio(inputs, split)[:max_files]
    features = feature_extractor(source, layer)
    frames = np.concatenate([features.frames(load_audio(path)).numpy()
                             for _, path in tqdm(files, desc="features", unit="file")])
    rng = np.random.default_rng(seed)
    if len(frames) > max_frames:
        frames = frames[np.sort(rng.choice(len(frames), max_frames, replace=False))]
    typer.echo(f"k-means: {k} clusters on {len(frames)} frames of layer {layer} ({source})")
    codebook = train_kmeans(frames, k, seed=seed)
    UnitExtractor(UnitsConfig(source, layer, k), codebook, features).save(out)
    typer.echo(f"wrote {out}")


@units_app.command("extract")
def units_extract(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(
        help="Output: .jsonl (merged units + durations per file) or .npz (frame-level ids "
             "per file, what `llama-omni vocoder train` reads).")],
    units_model: Annotated[Path, typer.Option(help="Units model directory.")] = DEFAULT_UNITS_DIR,
    split: Annotated[str | None, typer.Option(
        help="Only this split of a corpus input (default: all).")] = None,
    trust_pickle: Annotated[bool, typer.Option(
        help="Allow a joblib k-means file as --units-model (pickle: trusted files only).")] = False,
    source: Annotated[str | None, typer.Option(
        help="Feature source when --units-model is a joblib k-means file.")] = None,
    layer: Annotated[int | None, typer.Option(
        help="Layer when --units-model is a joblib k-means file.")] = None,
    threads: int = 2,
) -> None:
    """Turn speech into units, with the merged repeats' run lengths as durations."""
    if out.suffix not in (".jsonl", ".npz"):
        raise typer.BadParameter("--out must end in .jsonl or .npz", param_hint="--out")
    torch.set_num_threads(threads)
    extractor = _extractor(units_model, trust_pickle, source, layer)
    files = collect_audio(inputs, split)
    frame_ids = {uid: extractor.frame_ids(load_audio(path))
                 for uid, path in tqdm(files, desc="units", unit="file")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    if out.suffix == ".npz":
        np.savez(tmp, **{uid: ids.astype(np.int16) for uid, ids in frame_ids.items()})
    else:
        with open(tmp, "w") as f:
            for uid, ids in frame_ids.items():
                units, durations = merge_repeats(ids)
                f.write(json.dumps(dict(id=uid, units=units.tolist(),
                                        durations=durations.tolist())) + "\n")
    tmp.replace(out)
    typer.echo(f"wrote units of {len(frame_ids)} files to {out}")


def _extractor(units_model: Path, trust_pickle: bool, source: str | None,
               layer: int | None) -> UnitExtractor:
    if units_model.is_dir():
        return UnitExtractor.load(units_model)
    if source is None or layer is None:
        raise typer.BadParameter("a k-means file alone needs --source and --layer",
                                 param_hint="--units-model")
    codebook = KMeansCodebook.load(units_model, trust_pickle=trust_pickle)
    return UnitExtractor(UnitsConfig(source, layer, codebook.num_units), codebook)


if __name__ == "__main__":
    units_app()
