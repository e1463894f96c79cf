"""Whisper encoder (stage E): parity with transformers and CTranslate2, masking, loaders."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama_omni.audio import load_audio, log_mel_spectrogram, pad_or_trim
from llama_omni.model.encoder import EncoderConfig, WhisperEncoder, encode_audio
from llama_omni.model.encoder_loaders import (
    EncoderLoadError,
    load_ct2_whisper,
    load_encoder,
    load_hf_whisper,
    load_openai_whisper_checkpoint,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
TINY = EncoderConfig.preset("tiny-test")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    wavs = sorted(LIBRIVOX.glob("*.wav"))
    if not wavs:
        pytest.skip("install Debian pocketsphinx-testdata for real speech")
    return [load_audio(w) for w in wavs[:3]]


@pytest.fixture(scope="module")
def tiny_encoder() -> WhisperEncoder:
    torch.manual_seed(0)
    encoder = WhisperEncoder(TINY)
    with torch.no_grad():
        for p in encoder.parameters():  # non-trivial biases and norms, so a mix-up shows
            p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random Hugging Face WhisperForConditionalGeneration, with a tokenizer."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=256,
        max_source_positions=1500,
        max_target_positions=64,
    )
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config)
    encoder = model.model.encoder
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name != "embed_positions.weight":
                p.add_(0.1 * torch.randn_like(p))
        # Two equal tensors: CTranslate2 stores the second as an alias of the first.
        encoder.layers[1].final_layer_norm.bias.copy_(encoder.layers[0].final_layer_norm.bias)
    directory = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_encoder(hf_dir):
    from transformers import WhisperModel

    return WhisperModel.from_pretrained(hf_dir).encoder.eval()


def random_mel(batch: int = 2, frames: int = 3000, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(seed))


# ---- config and shapes -------------------------------------------------------------------------


def test_config_presets_validation_and_round_trip():
    large = EncoderConfig.preset("whisper-large-v3")
    assert (large.n_mels, large.width, large.n_heads, large.n_layers) == (128, 1280, 20, 32)
    assert EncoderConfig.preset("whisper-base").width == 512
    assert EncoderConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="divisible by n_heads"):
        EncoderConfig(width=100, n_heads=3)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        EncoderConfig(n_layers=0)
    with pytest.raises(ValueError, match="known presets"):
        EncoderConfig.preset("whisper-huge")


def test_state_dict_names_are_openai_whisper_names(tiny_encoder):
    names = set(tiny_encoder.state_dict())
    for name in (
        "conv1.weight",
        "conv2.bias",
        "positional_embedding",
        "ln_post.weight",
        "blocks.1.attn.query.bias",
        "blocks.1.attn.key.weight",
        "blocks.1.attn.out.weight",
        "blocks.1.attn_ln.bias",
        "blocks.1.mlp.0.weight",
        "blocks.1.mlp.2.bias",
        "blocks.1.mlp_ln.weight",
    ):
        assert name in names
    assert "blocks.0.attn.key.bias" not in names
    assert tiny_encoder.state_dict()["positional_embedding"].shape == (1500, 64)


def test_shapes_and_output_lengths(tiny_encoder):
    with torch.no_grad():
        assert tiny_encoder(random_mel(frames=3000)).shape == (2, 1500, 64)
        assert tiny_encoder(random_mel(frames=201)).shape == (2, 101, 64)
    assert WhisperEncoder.output_lengths(torch.tensor([3000, 201, 1])).tolist() == [1500, 101, 1]


def test_longer_than_30s_is_an_error_saying_what_to_do(tiny_encoder):
    with pytest.raises(ValueError, match="longer than 30 s.*chunks"):
        tiny_encoder(random_mel(batch=1, frames=3001))


def test_output_layer_is_the_block_output_before_ln_post(tiny_encoder):
    mel = random_mel(batch=1, frames=400)
    with torch.no_grad():
        last = tiny_encoder(mel, output_layer=2)
        torch.testing.assert_close(tiny_encoder.ln_post(last), tiny_encoder(mel))
        assert not torch.allclose(tiny_encoder(mel, output_layer=1), last)
    with pytest.raises(ValueError, match="output_layer must lie in 1..2"):
        tiny_encoder(mel, output_layer=3)


# ---- masking -----------------------------------------------------------------------------------


def test_padded_batch_with_mask_equals_one_at_a_time(tiny_encoder):
    lengths = [301, 120, 57]  # odd lengths exercise the stride-2 conv's right edge
    mels = [random_mel(batch=1, frames=n, seed=i)[0] for i, n in enumerate(lengths)]
    batch = torch.full((3, 80, 301), 5.0)  # padding content must not matter
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[-1]] = m
    with torch.no_grad():
        out = tiny_encoder(batch, torch.tensor(lengths))  # [3, 151, D]
        for i, m in enumerate(mels):
            n = (lengths[i] + 1) // 2
            torch.testing.assert_close(out[i, :n], tiny_encoder(m[None])[0], atol=1e-5, rtol=1e-5)
            assert not out[i, n:].any()  # padded output frames are zero
            alone = tiny_encoder(m[None], output_layer=1)[0]
            layer1 = tiny_encoder(batch, torch.tensor(lengths), output_layer=1)[i, :n]
            torch.testing.assert_close(layer1, alone, atol=1e-5, rtol=1e-5)


def test_encode_audio_variable_length_equals_one_at_a_time(tiny_encoder, speech):
    config = TINY.replace(pad_to_30s=False)
    clips = [speech[0][:48000], speech[1][:20000], speech[2][:33333]]
    features, lengths = encode_audio(tiny_encoder, clips, config)
    assert lengths.tolist() == [150, 63, 104] and features.shape == (3, 150, 64)
    for i, clip in enumerate(clips):
        alone, n = encode_audio(tiny_encoder, [clip], config)
        torch.testing.assert_close(features[i, : n[0]], alone[0], atol=1e-5, rtol=1e-5)


def test_encode_audio_pads_to_30s_like_the_published_model(tiny_encoder, speech):
    features, lengths = encode_audio(tiny_encoder, speech[:2], TINY)
    assert features.shape == (2, 1500, 64) and lengths.tolist() == [1500, 1500]
    with torch.no_grad():
        ref = tiny_encoder(log_mel_spectrogram(pad_or_trim(speech[1]))[None])[0]
    torch.testing.assert_close(features[1], ref)


# ---- Hugging Face and openai loaders -----------------------------------------------------------


def test_hf_loader_matches_transformers_whisper_encoder(hf_dir, hf_encoder):
    config, encoder = load_hf_whisper(hf_dir)
    assert config == EncoderConfig(80, 1500, 64, 4, 2, pad_to_30s=True)
    mel = random_mel()
    with torch.no_grad():
        ref = hf_encoder(mel, output_hidden_states=True)
        torch.testing.assert_close(encoder(mel), ref.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            encoder(mel, output_layer=1), ref.hidden_states[1], atol=1e-4, rtol=0
        )


def test_load_encoder_dispatches_and_applies_device_dtype(hf_dir):
    config, encoder = load_encoder(str(hf_dir), pad_to_30s=False, dtype=torch.bfloat16)
    assert config.pad_to_30s is False
    assert encoder.conv1.weight.dtype == torch.bfloat16
    assert encoder.positional_embedding.dtype == torch.bfloat16
    with torch.no_grad():
        assert encoder(random_mel(frames=100)).dtype == torch.bfloat16


def openai_checkpoint(encoder: WhisperEncoder, path: Path, drop=(), reshape=()) -> Path:
    """Write `encoder` in openai-whisper's .pt format (positions in fp16, like the real files)."""
    c = encoder.config
    state = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items() if k not in drop}
    state["encoder.positional_embedding"] = state["encoder.positional_embedding"].half()
    for name in reshape:
        state[f"encoder.{name}"] = state[f"encoder.{name}"][..., :-1]
    state["decoder.token_embedding.weight"] = torch.zeros(10, c.width)  # ignored
    dims = dict(
        n_mels=c.n_mels,
        n_audio_ctx=c.n_ctx,
        n_audio_state=c.width,
        n_audio_head=c.n_heads,
        n_audio_layer=c.n_layers,
        n_vocab=10,
        n_text_ctx=8,
        n_text_state=c.width,
        n_text_head=c.n_heads,
        n_text_layer=1,
    )
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path


def test_openai_checkpoint_round_trip(tiny_encoder, tmp_path):
    path = openai_checkpoint(tiny_encoder, tmp_path / "tiny.pt")
    config, encoder = load_encoder(str(path), pad_to_30s=True)
    assert config == TINY
    # The positions are read from the file (fp16-rounded), not recomputed.
    pos = tiny_encoder.positional_embedding.half().float()
    assert torch.equal(encoder.positional_embedding, pos)
    mel = random_mel(frames=500)
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel), tiny_encoder(mel), atol=1e-3, rtol=0)


def test_missing_and_misshaped_tensors_are_named(tiny_encoder, tmp_path):
    missing = openai_checkpoint(tiny_encoder, tmp_path / "a.pt", drop=["blocks.1.mlp_ln.bias"])
    with pytest.raises(EncoderLoadError, match=r"missing tensors: blocks\.1\.mlp_ln\.bias"):
        load_openai_whisper_checkpoint(missing)
    bad = openai_checkpoint(tiny_encoder, tmp_path / "b.pt", reshape=["conv1.weight"])
    with pytest.raises(EncoderLoadError, match=r"wrong shape: conv1\.weight \[64, 80, 2\]"):
        load_openai_whisper_checkpoint(bad)


def test_hf_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    del state["model.encoder.layers.0.fc2.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderLoadError, match=r"missing tensors: blocks\.0\.mlp\.2\.weight"):
        load_hf_whisper(tmp_path)


def test_non_whisper_sources_are_rejected(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EncoderLoadError, match="not a Hugging Face Whisper model.*'llama'"):
        load_encoder(str(tmp_path / "llama"), pad_to_30s=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="it is none of these. Accepted: .*packaged:"):
        load_encoder(str(tmp_path / "empty"), pad_to_30s=True)
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(str(tmp_path / "nothing.pt"), pad_to_30s=True)
    with pytest.raises(EncoderLoadError, match="unknown packaged encoder"):
        load_encoder("packaged:whisper-huge", pad_to_30s=True)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(EncoderLoadError, match="not an openai-whisper checkpoint"):
        load_encoder(str(tmp_path / "other.pt"), pad_to_30s=True)


# ---- CTranslate2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["whisper-base", "whisper-tiny.en"])
def test_packaged_ct2_encoder_matches_the_ctranslate2_runtime(name, speech):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from llama_omni import packaged

    directory = {
        "whisper-base": packaged.whisper_base_dir,
        "whisper-tiny.en": packaged.whisper_tiny_en_dir,
    }[name]()
    config, encoder = load_encoder(f"packaged:{name}", pad_to_30s=True)
    assert config.n_mels == 80 and config.n_ctx == 1500
    mel = log_mel_spectrogram(pad_or_trim(speech[0]))[None]  # [1, 80, 3000]
    with torch.no_grad():
        ours = encoder(mel)
    runtime = ctranslate2.models.Whisper(str(directory), device="cpu", compute_type="float32")
    ref = runtime.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True)
    ref = torch.from_numpy(np.array(ref))
    assert ours.shape == ref.shape == (1, 1500, config.width)
    assert cosine(ours, ref) > 0.999
    assert F.cosine_similarity(ours[0], ref[0], dim=-1).min().item() > 0.999


@pytest.fixture(scope="module")
def ct2_converted(hf_dir, tmp_path_factory):
    """Convert the tiny HF model with CTranslate2's own converter, per quantization."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperTokenizerFast

    from llama_omni import packaged

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(packaged.whisper_tiny_en_dir() / "tokenizer.json")
    )
    source = tmp_path_factory.mktemp("hf_with_tokenizer")
    for file in hf_dir.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    tokenizer.save_pretrained(source)
    out = {}

    def convert(quantization: str) -> Path:
        if quantization not in out:
            target = tmp_path_factory.mktemp(f"ct2_{quantization}") / "model"
            converter = ctranslate2.converters.TransformersConverter(str(source))
            converter.convert(str(target), quantization=quantization)
            out[quantization] = target
        return out[quantization]

    return convert


@pytest.mark.parametrize(
    ("quantization", "min_cosine"),
    [("float32", None), ("float16", 0.9999), ("bfloat16", 0.999), ("int8", 0.99), ("int16", 0.999)],
)
def test_ct2_loader_reads_every_weight_format(ct2_converted, hf_encoder, quantization, min_cosine):
    config, encoder = load_ct2_whisper(ct2_converted(quantization))
    assert config == EncoderConfig(80, 1500, 64, 4, 2, pad_to_30s=True)
    mel = random_mel()
    with torch.no_grad():
        ours, ref = encoder(mel), hf_encoder(mel).last_hidden_state
    if min_cosine is None:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    else:
        assert cosine(ours, ref) > min_cosine


def test_truncated_ct2_file_is_reported(ct2_converted, tmp_path):
    data = (ct2_converted("float16") / "model.bin").read_bytes()
    for size in (len(data) // 2, 10, 0):
        (tmp_path / "model.bin").write_bytes(data[:size])
        with pytest.raises(EncoderLoadError, match="truncated or corrupt|is empty"):
            load_encoder(str(tmp_path), pad_to_30s=True)


def write_ct2(path: Path, spec: str, variables: list[tuple[str, np.ndarray, int]]) -> None:
    """A minimal CTranslate2 model.bin (binary version 6) with the given variables."""

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 1, len(variables))
    for name, array, type_id in variables:
        out += string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
        out += struct.pack("<BI", type_id, array.nbytes) + array.tobytes()
    path.write_bytes(out + struct.pack("<I", 0))


def test_ct2_non_whisper_spec_and_unsupported_dtype_are_errors(tmp_path):
    write_ct2(tmp_path / "model.bin", "TransformerDecoderModelSpec", [])
    with pytest.raises(EncoderLoadError, match="'TransformerDecoderModelSpec' model, not Whisper"):
        load_ct2_whisper(tmp_path)
    weight = np.zeros((4, 80, 3), dtype=np.int32)
    write_ct2(
        tmp_path / "model.bin",
        "WhisperSpec",
        [
            ("encoder/num_heads", np.array(1, dtype=np.int16), 2),
            ("encoder/conv1/weight", weight, 3),
        ],
    )
    with pytest.raises(EncoderLoadError, match="conv1/weight has dtype torch.int32"):
        load_ct2_whisper(tmp_path)
