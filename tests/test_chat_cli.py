"""`llama-omni chat` end to end on a tiny saved checkpoint and a tiny saved vocoder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from inference_fixtures import one_thread_fixture, tone  # noqa: F401 (fixture)
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.model.checkpoint import save_checkpoint
from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, save_vocoder

JSON_KEYS = {
    "text",
    "text_token_ids",
    "units",
    "first_text_ms",
    "first_audio_ms",
    "total_ms",
    "lagging_words",
    "audio_seconds",
}


@pytest.fixture(scope="module")
def saved(tiny_llm_dir, tmp_path_factory):
    """(checkpoint dir, vocoder dir, question wav) on disk, once for the module."""
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    model = OmniModel.initialize(OmniConfig.preset("tiny-test"), base_dir=tiny_llm_dir)
    torch.manual_seed(1)
    save_vocoder(UnitVocoder(VocoderConfig.preset("tiny-test")), root / "vocoder")
    sf.write(root / "question.wav", tone(1.0, 220), 16000)
    return save_checkpoint(model, root / "ckpt"), root / "vocoder", root / "question.wav"


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["chat", *map(str, args)], input=input)


def flat(text: str) -> str:
    """Output without the line breaks and borders of typer's error panel."""
    return re.sub(r"[\s│]+", " ", text)


def test_chat_writes_the_reply_and_reports_json(saved, tmp_path):
    ckpt, vocoder, question = saved
    out = tmp_path / "reply.wav"
    result = run(
        question,
        "--model",
        ckpt,
        "--vocoder",
        vocoder,
        "--out",
        out,
        "--json",
        "--max-new-tokens",
        "16",
        "--chunk-size",
        "5",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert JSON_KEYS <= set(report)
    assert len(report["text_token_ids"]) == 16 and report["units"]
    wave, rate = sf.read(out)
    assert rate == 16000 and len(wave) / rate == pytest.approx(report["audio_seconds"])
    assert 0 < report["first_text_ms"] <= report["first_audio_ms"] <= report["total_ms"]


def test_chat_without_a_matching_vocoder_prints_text_units_and_why(saved, tmp_path):
    ckpt, _, question = saved
    result = run(question, "--model", ckpt, "--max-new-tokens", "6", "--out", tmp_path / "a.wav")
    assert result.exit_code == 0, result.output
    assert "units (" in result.stdout and "no audio: no vocoder was given" in result.stdout
    assert not (tmp_path / "a.wav").exists()
    torch.manual_seed(0)
    save_vocoder(
        UnitVocoder(VocoderConfig.preset("tiny-test").replace(num_units=16)), tmp_path / "v16"
    )
    result = run(
        question, "--model", ckpt, "--vocoder", tmp_path / "v16", "--json", "--max-new-tokens", "6"
    )
    report = json.loads(result.stdout)
    assert report["units"] and report["audio_seconds"] == 0
    assert "reads 16 unit ids" in report["no_audio_reason"]


def test_chat_interactive_keeps_the_conversation(saved, tmp_path):
    ckpt, vocoder, question = saved
    out = tmp_path / "turn.wav"
    lines = f"{question}\n{tmp_path / 'missing.wav'}\n{question}\n"
    result = run(
        "--interactive",
        "--model",
        ckpt,
        "--vocoder",
        vocoder,
        "--out",
        out,
        "--json",
        "--max-new-tokens",
        "6",
        input=lines,
    )
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 2 and "audio file not found" in result.stderr
    assert (tmp_path / "turn_1.wav").exists() and (tmp_path / "turn_3.wav").exists()
    assert reports[0]["text_token_ids"] != reports[1]["text_token_ids"]  # the second sees the first


def test_chat_reads_other_rates_and_channel_counts(saved, tmp_path):
    ckpt, vocoder, _ = saved
    stereo_8k = np.stack([tone(1.0, 220)[::2], tone(1.0, 330)[::2]], axis=1)  # [T, 2]
    sf.write(tmp_path / "stereo8k.wav", stereo_8k, 8000)
    result = run(
        tmp_path / "stereo8k.wav",
        "--model",
        ckpt,
        "--vocoder",
        vocoder,
        "--json",
        "--max-new-tokens",
        "4",
        "--out",
        tmp_path / "r.wav",
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["text_token_ids"]) == 4


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.wav", None, "audio file not found"),
        ("noise.wav", b"this is not a sound file", "is not audio that soundfile can read"),
        ("empty.wav", np.zeros(0, np.float32), "contains no audio samples"),
        ("long.wav", np.zeros(16000 * 31, np.float32), "accepts at most 30 s"),
        ("click.wav", np.zeros(400, np.float32), "too short"),
    ],
)
def test_chat_refuses_bad_audio_with_a_clear_message(saved, tmp_path, name, content, message):
    ckpt, _, _ = saved
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        sf.write(path, content, 16000)
    result = run(path, "--model", ckpt, "--max-new-tokens", "2")
    assert result.exit_code == 2
    assert message in flat(result.output)


def test_chat_validates_its_options(saved):
    ckpt, _, question = saved
    for args, hint in [
        (["--chunk-size", "zero"], "'inf'"),
        (["--top-p", "0"], "top_p"),
        (["--repetition-penalty", "0.5"], "repetition_penalty"),
        (["--max-new-tokens", "0"], ">= 1"),
        ([], None),
    ]:
        target = [question] if hint else []
        result = run(*target, "--model", ckpt, *args)
        assert result.exit_code == 2
        assert (hint or "--interactive") in flat(result.output)
