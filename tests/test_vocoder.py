"""Stage V: the unit vocoder, checked against an independent weight-normed reference laid out
like fairseq's CodeGenerator, plus loading, saving, errors and the `vocode` CLI function."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import typer
from torch import nn

from llama_omni.cli.vocode import vocode as vocode_cli
from llama_omni.model.vocoder import (
    UnitVocoder,
    VocoderConfig,
    durations_from_log,
    load_fairseq_codehifigan,
    load_vocoder,
    save_vocoder,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

TINY_FAIRSEQ = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3], [1, 3]],
    "num_embeddings": 32,
    "embedding_dim": 16,
    "model_in_dim": 16,
    "f0": False,
    "dur_predictor_params": {
        "encoder_embed_dim": 16,
        "var_pred_hidden_dim": 16,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
    "code_hop_size": 320,
}
PUBLISHED_FAIRSEQ = {
    **TINY_FAIRSEQ,
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "dur_predictor_params": {
        "encoder_embed_dim": 128,
        "var_pred_hidden_dim": 128,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
}
UNITS = [3, 17, 17, 0, 31, 8]
DURATIONS = [2, 1, 3, 1, 4, 2]


# --- an independent reference, laid out like fairseq (weight norm, eval-mode dropout) -------


def _wn_conv(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Module:
    return nn.utils.weight_norm(
        nn.Conv1d(cin, cout, k, dilation=dilation, padding=(k * dilation - dilation) // 2)
    )


class _RefResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(_wn_conv(ch, ch, k, d) for d in dilations)
        self.convs2 = nn.ModuleList(_wn_conv(ch, ch, k) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1)) + x
        return x


class _RefDurations(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        c, h, k = p["encoder_embed_dim"], p["var_pred_hidden_dim"], p["var_pred_kernel_size"]
        self.conv1 = nn.Sequential(nn.Conv1d(c, h, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(h)
        self.conv2 = nn.Sequential(nn.Conv1d(h, h, k, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(h)
        self.proj = nn.Linear(h, 1)

    def forward(self, x):  # [B, U, C] -> [B, U]
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x)[..., 0]


class _RefGenerator(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, self.nk = cfg["upsample_initial_channel"], len(cfg["resblock_kernel_sizes"])
        self.dict = nn.Embedding(cfg["num_embeddings"], cfg["embedding_dim"])
        self.dur_predictor = _RefDurations(cfg["dur_predictor_params"])
        self.conv_pre = _wn_conv(cfg["model_in_dim"], ch, 7)
        pairs = list(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"]))
        self.ups = nn.ModuleList(
            nn.utils.weight_norm(
                nn.ConvTranspose1d(ch >> i, ch >> (i + 1), k, u, padding=(k - u) // 2)
            )
            for i, (u, k) in enumerate(pairs)
        )
        self.resblocks = nn.ModuleList(
            _RefResBlock(ch >> (i + 1), k, d)
            for i in range(len(pairs))
            for k, d in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])
        )
        self.conv_post = _wn_conv(ch >> len(pairs), 1, 7)

    def durations(self, code):
        log_d = self.dur_predictor(self.dict(code))
        return torch.clamp(torch.round(torch.exp(log_d) - 1).long(), min=1)

    def forward(self, code, durations):
        x = self.dict(code).transpose(1, 2).repeat_interleave(durations.view(-1), dim=2)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * self.nk + j](x) for j in range(self.nk)) / self.nk
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


@pytest.fixture
def fairseq_dir(tmp_path):
    """A fairseq-format vocoder directory and the weight-normed reference it was saved from."""
    torch.manual_seed(0)
    ref = _RefGenerator(TINY_FAIRSEQ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("weight_g"):  # so that folding g really matters
                p.mul_(torch.empty_like(p).uniform_(1.0, 2.0))
    directory = tmp_path / "fairseq"
    directory.mkdir()
    torch.save({"generator": ref.state_dict()}, directory / "g_00000100")
    (directory / "config.json").write_text(json.dumps(TINY_FAIRSEQ))
    return directory, ref


@pytest.fixture
def tiny():
    torch.manual_seed(1)
    return UnitVocoder(VocoderConfig.preset("tiny-test")).eval()


def _tensor(values):
    return torch.tensor([values])


# --- numerics against the reference -----------------------------------------------------------


def test_fairseq_checkpoint_matches_weight_normed_reference(fairseq_dir):
    directory, ref = fairseq_dir
    model = load_vocoder(directory)
    assert model.config == VocoderConfig.preset("tiny-test")
    assert not any(name.endswith(("_g", "_v")) for name in model.state_dict())
    with torch.no_grad():
        expected = ref(_tensor(UNITS), _tensor(DURATIONS))[0, 0].numpy()
        predicted = ref.durations(_tensor(UNITS))
    got = model.vocode(UNITS, DURATIONS)
    assert expected.std() > 1e-3
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-5
    assert torch.equal(model.predict_durations(_tensor(UNITS)), predicted)
    with torch.no_grad():
        expected_pred = ref(_tensor(UNITS), predicted)[0, 0].numpy()
    assert abs(model.vocode(UNITS) - expected_pred).max() < 1e-5


def test_loading_the_checkpoint_file_directly(fairseq_dir):
    directory, _ = fairseq_dir
    model = load_fairseq_codehifigan(directory / "g_00000100", directory / "config.json")
    assert not model.training
    by_file = load_vocoder(directory / "g_00000100")
    torch.testing.assert_close(model.state_dict(), by_file.state_dict())


def test_output_length_is_total_duration_times_hop(tiny):
    assert tiny.config.hop_length == 320
    assert tiny.vocode(UNITS, DURATIONS).shape == (sum(DURATIONS) * 320,)
    predicted = tiny.predict_durations(_tensor(UNITS))
    assert tiny.vocode(UNITS).shape == (int(predicted.sum()) * 320,)
    batch = torch.tensor([UNITS, UNITS[::-1]])
    with torch.no_grad():
        wave = tiny(batch, torch.tensor([DURATIONS, DURATIONS]))
    assert wave.shape == (2, 1, sum(DURATIONS) * 320)
    with pytest.raises(ValueError, match="one sequence at a time"):
        tiny(batch, torch.tensor([DURATIONS, DURATIONS[::-1]]))


def test_duration_rule_on_hand_made_log_durations(tiny):
    # exp(d) - 1 = 0, 2.4, 3.6, ~-1, 7.2 -> round -> 0, 2, 4, -1, 7 -> at least 1
    log_d = torch.tensor([[0.0, math.log(3.4), math.log(4.6), -6.0, math.log(8.2)]])
    assert durations_from_log(log_d).tolist() == [[1, 2, 4, 1, 7]]
    with torch.no_grad():
        tiny.dur_predictor.proj.weight.zero_()
        tiny.dur_predictor.proj.bias.fill_(math.log(4.0))
    assert tiny.predict_durations(_tensor(UNITS)).tolist() == [[3] * len(UNITS)]


def test_published_preset_builds_on_meta_with_the_expected_size():
    config = VocoderConfig.preset("codehifigan-1000")
    assert config == VocoderConfig.from_fairseq(PUBLISHED_FAIRSEQ)
    assert config.hop_length == 320 and config.sample_rate == 16000
    model = UnitVocoder(config, device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert 1e7 < sum(p.numel() for p in params) < 1e8  # about 13.5M
    assert model.dict.weight.shape == (1000, 128)
    assert "resblocks.14.convs2.2.weight" in model.state_dict()
    assert "dur_predictor.conv2.0.weight" in model.state_dict()


# --- configs, our format ----------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    config = VocoderConfig.preset("codehifigan-1000")
    assert VocoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="same length"):
        VocoderConfig(upsample_kernel_sizes=(11, 8))
    with pytest.raises(ValueError, match="divisible"):
        VocoderConfig(upsample_initial_channel=100)
    with pytest.raises(ValueError, match="unknown vocoder preset"):
        VocoderConfig.preset("nope")


def test_own_format_round_trip(tiny, tmp_path):
    save_vocoder(tiny, tmp_path / "voc")
    assert sorted(os.listdir(tmp_path / "voc")) == ["vocoder.json", "vocoder.safetensors"]
    loaded = load_vocoder(tmp_path / "voc")
    assert loaded.config == tiny.config
    torch.testing.assert_close(loaded.state_dict(), tiny.state_dict())
    assert (loaded.vocode(UNITS, DURATIONS) == tiny.vocode(UNITS, DURATIONS)).all()
    assert load_vocoder(tmp_path / "voc" / "vocoder.safetensors").config == tiny.config


# --- errors -----------------------------------------------------------------------------------


def test_unit_errors(tiny):
    with pytest.raises(ValueError, match=r"unit id 40 .*\[0, 32\)"):
        tiny.vocode([1, 40, 2])
    with pytest.raises(ValueError, match="unit id -1"):
        tiny.vocode([-1])
    with pytest.raises(ValueError, match="empty"):
        tiny.vocode([])
    with pytest.raises(ValueError, match="one sequence of integers"):
        tiny.vocode([1.5, 2.0])


def _rewrite_generator(directory, edit):
    path = directory / "g_00000100"
    state = torch.load(path, weights_only=True)["generator"]
    edit(state)
    torch.save({"generator": state}, path)


def test_missing_tensor_is_named(fairseq_dir):
    directory, _ = fairseq_dir
    _rewrite_generator(directory, lambda s: s.pop("ups.2.bias"))
    with pytest.raises(ValueError, match=r"missing \['ups.2.bias'\]"):
        load_vocoder(directory)


def test_misshaped_tensor_is_named(fairseq_dir):
    directory, _ = fairseq_dir
    _rewrite_generator(directory, lambda s: s.update({"dict.weight": torch.zeros(33, 16)}))
    with pytest.raises(ValueError, match=r"mis-shaped \['dict.weight \(33, 16\)"):
        load_vocoder(directory)


@pytest.mark.parametrize(
    "change, message",
    [({"multispkr": True}, "multi-speaker"), ({"f0": True}, "F0"), ({"resblock": "2"}, "type '2'")],
)
def test_unsupported_fairseq_config(change, message):
    with pytest.raises(ValueError, match=message):
        VocoderConfig.from_fairseq({**TINY_FAIRSEQ, **change})


def test_untrusted_pickle_is_refused(fairseq_dir):
    directory, _ = fairseq_dir
    state = torch.load(directory / "g_00000100", weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1.0)}, directory / "g_00000100")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_vocoder(directory)


def test_nothing_to_load(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocoder.json .*g_\*"):
        load_vocoder(tmp_path)


# --- the CLI function ---------------------------------------------------------------------------


def test_vocode_cli_writes_a_16khz_wav(tiny, tmp_path, capsys):
    save_vocoder(tiny, tmp_path / "voc")
    out = tmp_path / "out" / "speech.wav"
    vocode_cli(tmp_path / "voc", "3, 17 17,0", out, durations="2 1 3 1")
    info = sf.info(out)
    assert (info.samplerate, info.subtype, info.frames) == (16000, "PCM_16", 7 * 320)
    wave, _ = sf.read(out, dtype="float32")
    assert abs(wave - tiny.vocode([3, 17, 17, 0], [2, 1, 3, 1])).max() < 1 / 2**14
    assert sorted(os.listdir(out.parent)) == ["speech.wav"]
    assert f"{out}: 4 units, 0.14 s" in capsys.readouterr().out


def test_vocode_cli_rejects_bad_input(tiny, tmp_path):
    save_vocoder(tiny, tmp_path / "voc")
    with pytest.raises(typer.BadParameter, match="integers"):
        vocode_cli(tmp_path / "voc", "1 two 3", tmp_path / "a.wav")
    with pytest.raises(typer.BadParameter, match="no vocoder found"):
        vocode_cli(tmp_path / "missing", "1 2", tmp_path / "a.wav")
    with pytest.raises(typer.BadParameter, match="unit id 99"):
        vocode_cli(tmp_path / "voc", "1 99", tmp_path / "a.wav")
    assert not (tmp_path / "a.wav").exists()
