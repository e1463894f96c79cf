"""The `llama-omni` command line, driven as a user would."""

import soundfile as sf
import torch
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, save_vocoder


def test_vocode_writes_a_wav_of_the_given_durations(tmp_path):
    torch.manual_seed(0)
    save_vocoder(UnitVocoder(VocoderConfig.preset("tiny-test")).eval(), tmp_path / "voc")
    out = tmp_path / "reply.wav"
    args = ["vocode", "--vocoder", str(tmp_path / "voc"), "--units", "12 7 7 3", "--out", str(out),
            "--durations", "2 1 1 3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) == 7 * 320

    result = CliRunner().invoke(app, args[:4] + ["12 700", "--out", str(tmp_path / "bad.wav")])
    assert result.exit_code != 0 and "700" in result.output
    assert not (tmp_path / "bad.wav").exists()
