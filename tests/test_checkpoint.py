"""Our checkpoint format: one directory, one call loads it, strict about every tensor."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.model.checkpoint import CheckpointError, load_model, save_checkpoint
from llama_omni.model.omni import OmniConfig
from llama_omni.model.prompt import Turn


def _speech(seed: int, seconds: float) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1


@torch.no_grad()
def test_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    saved = save_checkpoint(tiny_model, tmp_path / "ckpt")
    assert sorted(p.name for p in saved.iterdir()) == ["llama_omni.json", "llm", "model.safetensors"]
    loaded = load_model(saved)
    assert loaded.config == tiny_model.config
    audios = [_speech(0, 1.3), _speech(1, 0.7)]
    for a, b in zip(tiny_model.encode_speech(audios), loaded.encode_speech(audios)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    # variable-length mode: 1.3 s -> 130 mel frames -> 65 encoder frames -> 13 embeddings
    assert [s.shape[0] for s in loaded.encode_speech(audios)] == [13, 7]
    speech = loaded.encode_speech(audios[:1])
    prompt = loaded.prompt_ids([Turn.user()])
    answer = [9906, 1917, 13, 128009]
    ref = tiny_model.answer_states(speech, [prompt], [answer])
    out = loaded.answer_states(speech, [prompt], [answer])
    for x, y in zip(ref, out):
        torch.testing.assert_close(x, y)
    assert loaded.speech_decoder.predict_units(out[1]) == tiny_model.speech_decoder.predict_units(ref[1])


def test_answer_states_batch_equals_single(tiny_model):
    audios = [_speech(2, 1.0), _speech(3, 0.5)]
    speech = tiny_model.encode_speech(audios)
    prompt = tiny_model.prompt_ids([Turn.user()])
    answers = [[9906, 1917, 13, 128009], [40, 128009]]
    logits, hidden, counts = tiny_model.answer_states(speech, [prompt, prompt], answers)
    assert counts.tolist() == [4, 2]
    for i in range(2):
        lo, hi, _ = tiny_model.answer_states(speech[i : i + 1], [prompt], answers[i : i + 1])
        m = len(answers[i])
        torch.testing.assert_close(hidden[i, :m], hi[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[i, :m], lo[0], atol=1e-4, rtol=1e-4)


def test_corrupt_or_mismatched_files_are_named(tiny_model, tmp_path):
    saved = save_checkpoint(tiny_model, tmp_path / "ckpt")
    weights = saved / "model.safetensors"
    tensors = load_file(weights)

    save_file({k: v for k, v in tensors.items() if k != "adaptor.linear2.bias"}, weights)
    with pytest.raises(CheckpointError, match=r"adaptor: missing tensors \['linear2.bias'\]"):
        load_model(saved)
    save_file({**tensors, "speech_decoder.extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra.weight"):
        load_model(saved)
    save_file({**tensors, "speech_decoder.output_proj.bias": torch.zeros(5)}, weights)
    with pytest.raises(CheckpointError, match=r"output_proj.bias: checkpoint \(5,\) vs model \(33,\)"):
        load_model(saved)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(saved)

    config = saved / "llama_omni.json"
    payload = json.loads(config.read_text())
    payload["config"]["adaptor"]["llm_width"] = 32
    config.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="adaptor.llm_width 32 != llm.hidden_size 64"):
        load_model(saved)
    config.write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)
    with pytest.raises(CheckpointError, match="neither a llama-omni checkpoint"):
        load_model(tmp_path)


def test_save_is_atomic_over_an_existing_checkpoint(tiny_model, tmp_path, monkeypatch):
    target = save_checkpoint(tiny_model, tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("llama_omni.model.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_presets_are_consistent():
    for name in ("llama-omni-8b", "small", "tiny-test"):
        cfg = OmniConfig.preset(name)
        assert OmniConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    paper = OmniConfig.preset("llama-omni-8b")
    assert paper.encoder.pad_to_30s and paper.speech_decoder.upsample == 25
    with pytest.raises(ValueError, match="unknown model preset"):
        OmniConfig.preset("huge")


def test_cli_info_reports_parameter_counts(tiny_model, tmp_path):
    saved = save_checkpoint(tiny_model, tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["info", str(saved), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    counts = tiny_model.parameter_counts()
    assert report["parameters"]["speech_decoder"] == counts["speech_decoder"]
    assert report["parameters"]["total"] == sum(counts.values())
    assert report["config"]["llm"]["prompt_style"] == "llama3-omni"
    for command in ([], ["info", "--help"], ["vocode", "--help"], ["setup", "--help"]):
        result = CliRunner().invoke(app, command)
        assert "Usage" in result.output, (command, result.output)


@torch.no_grad()
def test_round_trip_keeps_the_copy_position_embedding(tiny_model, tmp_path):
    decoder, kept = tiny_model.speech_decoder.reconfigured(copy_position=True)
    assert kept
    decoder.copy_embedding.normal_()
    original = tiny_model.speech_decoder
    tiny_model.speech_decoder = decoder
    tiny_model.config = tiny_model.config.replace(speech_decoder=decoder.config)
    try:
        loaded = load_model(save_checkpoint(tiny_model, tmp_path / "ckpt"))
    finally:
        tiny_model.speech_decoder = original
        tiny_model.config = tiny_model.config.replace(speech_decoder=original.config)
    assert loaded.config.speech_decoder.copy_position
    states = torch.randn(1, 4, decoder.config.input_width)
    torch.testing.assert_close(loaded.speech_decoder(states)[0], decoder(states)[0], atol=1e-3, rtol=1e-3)
