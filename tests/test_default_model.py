"""The shipped default model: loads from packaged parts + its own small files, and answers.

This is the README's main job (scripts/demo.sh) as a test: the real packaged Whisper
base and SmolLM2, our trained adaptor / LoRA / speech decoder, our hibari vocoder.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from llama_omni.errors import CheckpointError
from llama_omni.inference.defaults import DEFAULT_MODEL_DIR
from llama_omni.model.checkpoint import load_model, save_checkpoint
from llama_omni.model.lora import LORA_SUBDIR

QUESTION = Path(__file__).parents[1] / "llama_omni" / "serve" / "static" / "examples" / "capital.flac"

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="no default model installed")


def test_shipped_files_stay_small_and_reference_packaged_parts():
    files = [f for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 60 * 2**20
    config = json.loads((DEFAULT_MODEL_DIR / "llama_omni.json").read_text())["config"]
    assert config["llm"]["source"].startswith("packaged:")
    assert config["encoder_source"].startswith("packaged:")


def test_lora_is_folded_into_the_packaged_backbone():
    from llama_omni.model.llm import load_backbone

    tuned = load_model(DEFAULT_MODEL_DIR)
    base, _ = load_backbone("packaged:smollm2-135m-instruct")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (DEFAULT_MODEL_DIR / LORA_SUBDIR).is_dir()
    delta = tuned.llm.model.get_parameter(name) - base.get_parameter(name)
    assert delta.abs().max() > 0  # the adapter changed the weight
    assert torch.equal(  # and only where LoRA targets: embeddings are untouched
        tuned.llm.model.get_input_embeddings().weight, base.get_input_embeddings().weight
    )


def test_saving_a_loaded_model_keeps_its_lora_update(tmp_path):
    """The packaged backbone is stored by reference, so the folded adapter must be stored
    again; if its directory is gone, saving says so instead of dropping the update."""
    copy = Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "default-model"))
    model = load_model(copy)
    saved = save_checkpoint(model, tmp_path / "saved")
    assert (saved / LORA_SUBDIR).is_dir()
    again = load_model(saved)
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(again.llm.model.get_parameter(name), model.llm.model.get_parameter(name))
    shutil.rmtree(copy / LORA_SUBDIR)
    with pytest.raises(CheckpointError, match="LoRA update"):
        save_checkpoint(model, tmp_path / "lost")
    assert not (tmp_path / "lost").exists()


def test_chat_answers_the_bundled_question_with_text_and_speech(tmp_path):
    out = tmp_path / "reply.wav"
    run = subprocess.run(
        [str(Path(sys.executable).with_name("llama-omni")), "chat", str(QUESTION),
         "--out", str(out), "--max-new-tokens", "24", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["text"].strip() and result["text_token_ids"]
    assert result["no_audio_reason"] is None and result["units"]
    assert all(0 <= u < 500 for u in result["units"])
    wave, rate = sf.read(out)
    assert rate == 16000 and len(wave) / rate == pytest.approx(result["audio_seconds"], abs=0.05)
    assert 0 < result["first_text_ms"] <= result["first_audio_ms"] <= result["total_ms"]
