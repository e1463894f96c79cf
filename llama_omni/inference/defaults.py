"""Where the default model and vocoder live, and how a model finds its vocoder."""

from __future__ import annotations

from pathlib import Path

import llama_omni
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder, load_vocoder

WEIGHTS_DIR = Path(llama_omni.__file__).parent / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "default-model"
DEFAULT_VOCODER_DIR = WEIGHTS_DIR / "vocoder-hibari"


def default_model_dir() -> Path | None:
    """The installed default model directory, or None when there is none."""
    return DEFAULT_MODEL_DIR if DEFAULT_MODEL_DIR.is_dir() else None


def model_vocoder(
    model: OmniModel, model_dir: Path | None, vocoder: Path | None
) -> UnitVocoder | None:
    """The vocoder given, else the one the model's config names (relative to its directory).

    None when neither exists; a named vocoder that cannot be loaded is an error.
    """
    if vocoder is None and model.config.vocoder_source:
        vocoder = Path(model.config.vocoder_source).expanduser()
        if not vocoder.is_absolute() and model_dir is not None:
            vocoder = model_dir / vocoder
    return None if vocoder is None else load_vocoder(vocoder, device=model.device)
