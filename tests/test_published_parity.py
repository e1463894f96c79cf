"""Parity with the published model's definitions (SPEC section 7) on a tiny random checkpoint.

The test writes a checkpoint in the published layout (config.json of model_type
omni_speech2s_llama, safetensors shards with the published tensor names, a tiny
openai-whisper .pt named by a relative `speech_encoder` path, the real Llama-3.1
tokenizer), loads it with llama-omni, and checks every stage against reference
computations written here from the spec, with transformers' own Whisper and Llama
modules standing in for the original implementation's building blocks.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from llama_omni import packaged
from llama_omni.audio import load_audio
from llama_omni.model.checkpoint import CheckpointError, load_model
from llama_omni.model.prompt import Turn

SPEECH = sorted(Path("/usr/share/pocketsphinx/test/data/librivox").glob("*.wav"))
pytestmark = pytest.mark.skipif(not SPEECH, reason="Debian pocketsphinx-testdata is not installed")

D_LLM, N_LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
D_ENC, ENC_HEADS, ENC_LAYERS = 64, 4, 2
UNITS, LAMBDA = 32, 25
DECODER = (2, 64, 4, 128)  # (layers, width, heads, ffn)
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
SYSTEM = ("You are a helpful language and speech assistant. You are able to understand the speech "
          "content that the user provides, and assist the user with a variety of tasks using natural "
          "language.")
TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nPlease directly answer the questions in "
    "the user's speech.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen) * 0.05


def _llm_tensors(gen) -> dict[str, torch.Tensor]:
    head_dim = D_LLM // HEADS
    t = {"model.embed_tokens.weight": _randn(gen, 128256, D_LLM), "model.norm.weight": 1 + _randn(gen, D_LLM),
         "lm_head.weight": _randn(gen, 128256, D_LLM)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = _randn(gen, D_LLM, D_LLM)
        t[p + "self_attn.k_proj.weight"] = _randn(gen, KV_HEADS * head_dim, D_LLM)
        t[p + "self_attn.v_proj.weight"] = _randn(gen, KV_HEADS * head_dim, D_LLM)
        t[p + "self_attn.o_proj.weight"] = _randn(gen, D_LLM, D_LLM)
        t[p + "mlp.gate_proj.weight"] = _randn(gen, FFN, D_LLM)
        t[p + "mlp.up_proj.weight"] = _randn(gen, FFN, D_LLM)
        t[p + "mlp.down_proj.weight"] = _randn(gen, D_LLM, FFN)
        t[p + "input_layernorm.weight"] = 1 + _randn(gen, D_LLM)
        t[p + "post_attention_layernorm.weight"] = 1 + _randn(gen, D_LLM)
    return t


def _decoder_tensors(gen) -> dict[str, torch.Tensor]:
    layers, width, _, ffn = DECODER
    t = {"speech_generator.input_proj.weight": _randn(gen, width, D_LLM),
         "speech_generator.input_proj.bias": _randn(gen, width),
         "speech_generator.output_proj.weight": _randn(gen, UNITS + 1, width) * 20,
         "speech_generator.output_proj.bias": _randn(gen, UNITS + 1)}
    for i in range(layers):
        p = f"speech_generator.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = _randn(gen, width, width) * 4
        t[p + "mlp.gate_proj.weight"] = _randn(gen, ffn, width)
        t[p + "mlp.up_proj.weight"] = _randn(gen, ffn, width)
        t[p + "mlp.down_proj.weight"] = _randn(gen, width, ffn)
        t[p + "input_layernorm.weight"] = 1 + _randn(gen, width)
        t[p + "post_attention_layernorm.weight"] = 1 + _randn(gen, width)
    return t


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    increment = np.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def _whisper_tensors(gen) -> dict[str, torch.Tensor]:
    t = {"conv1.weight": _randn(gen, D_ENC, 80, 3) * 4, "conv1.bias": _randn(gen, D_ENC),
         "conv2.weight": _randn(gen, D_ENC, D_ENC, 3) * 4, "conv2.bias": _randn(gen, D_ENC),
         # stored in fp16, as in the published files: it must be read, not recomputed
         "positional_embedding": _sinusoids(1500, D_ENC).half(),
         "ln_post.weight": 1 + _randn(gen, D_ENC), "ln_post.bias": _randn(gen, D_ENC)}
    for i in range(ENC_LAYERS):
        p = f"blocks.{i}."
        for name in ("query", "value", "out"):
            t[p + f"attn.{name}.weight"] = _randn(gen, D_ENC, D_ENC) * 4
            t[p + f"attn.{name}.bias"] = _randn(gen, D_ENC)
        t[p + "attn.key.weight"] = _randn(gen, D_ENC, D_ENC) * 4
        for ln in ("attn_ln", "mlp_ln"):
            t[p + f"{ln}.weight"] = 1 + _randn(gen, D_ENC)
            t[p + f"{ln}.bias"] = _randn(gen, D_ENC)
        t[p + "mlp.0.weight"] = _randn(gen, 4 * D_ENC, D_ENC) * 4
        t[p + "mlp.0.bias"] = _randn(gen, 4 * D_ENC)
        t[p + "mlp.2.weight"] = _randn(gen, D_ENC, 4 * D_ENC)
        t[p + "mlp.2.bias"] = _randn(gen, D_ENC)
    return t


def _config() -> dict:
    return {
        "architectures": ["OmniSpeech2SLlamaForCausalLM"], "model_type": "omni_speech2s_llama",
        "hidden_size": D_LLM, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": ROPE, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "speech_encoder": "whisper/tiny.pt", "speech_encoder_type": "whisper",
        "speech_projector_type": "linear", "speech_encoder_ds_rate": 5,
        "speech_encoder_hidden_size": D_ENC, "speech_generator_type": "ctc",
        "ctc_decoder_config": "(%d,%d,%d,%d)" % DECODER, "ctc_upsample_factor": LAMBDA,
        "ctc_loss_weight": 1.0, "unit_vocab_size": UNITS, "speech_normalize": False,
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("omni-published")
    gen = torch.Generator().manual_seed(0)
    whisper = _whisper_tensors(gen)
    tensors = {**_llm_tensors(gen), **_decoder_tensors(gen)}
    tensors["model.speech_projector.linear1.weight"] = _randn(gen, 2048, 5 * D_ENC)  # 2048 wide
    tensors["model.speech_projector.linear1.bias"] = _randn(gen, 2048)
    tensors["model.speech_projector.linear2.weight"] = _randn(gen, D_LLM, 2048)
    tensors["model.speech_projector.linear2.bias"] = _randn(gen, D_LLM)
    tensors.update({f"model.speech_encoder.{k}": v for k, v in whisper.items()})
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, root / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps(_config()))
    (root / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packaged.llama31_tokenizer_dir() / name, root / name)
    (root / "whisper").mkdir()
    dims = {"n_mels": 80, "n_vocab": 51865, "n_audio_ctx": 1500, "n_audio_state": D_ENC,
            "n_audio_head": ENC_HEADS, "n_audio_layer": ENC_LAYERS, "n_text_ctx": 448,
            "n_text_state": D_ENC, "n_text_head": ENC_HEADS, "n_text_layer": ENC_LAYERS}
    state = {f"encoder.{k}": v for k, v in whisper.items()}
    state["decoder.token_embedding.weight"] = torch.zeros(8, D_ENC)  # the decoder is ignored
    torch.save({"dims": dims, "model_state_dict": state}, root / "whisper" / "tiny.pt")
    return root, tensors


# -- references written from the spec ------------------------------------------------------
def _reference_prompt_ids(tokenizer) -> list[int]:
    before, after = TEMPLATE.split("<speech>")
    first = tokenizer(before).input_ids  # the tokenizer adds BOS: ids start 128000, 128000
    second = tokenizer(after).input_ids[1:]  # only the second piece's BOS is dropped
    return first + [-200] + second


def _reference_speech(tensors, audio: np.ndarray) -> torch.Tensor:
    mel = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt")
    hf = HFWhisperEncoder(WhisperConfig(num_mel_bins=80, d_model=D_ENC, encoder_layers=ENC_LAYERS,
                                        encoder_attention_heads=ENC_HEADS, encoder_ffn_dim=4 * D_ENC,
                                        max_source_positions=1500, attn_implementation="eager"))
    rename = [("positional_embedding", "embed_positions.weight"), ("blocks.", "layers."),
              ("attn.query", "self_attn.q_proj"), ("attn.key", "self_attn.k_proj"),
              ("attn.value", "self_attn.v_proj"), ("attn.out", "self_attn.out_proj"),
              ("attn_ln", "self_attn_layer_norm"), ("mlp.0", "fc1"), ("mlp.2", "fc2"),
              ("mlp_ln", "final_layer_norm"), ("ln_post", "layer_norm")]
    state = {}
    for name, value in tensors.items():
        if name.startswith("model.speech_encoder."):
            name = name.removeprefix("model.speech_encoder.")
            for old, new in rename:
                name = name.replace(old, new)
            state[name] = value.float()
    hf.load_state_dict(state, strict=True)
    frames = hf(mel.input_features).last_hidden_state[0]  # [1500, D_ENC]
    stacked = frames[: 1500 // 5 * 5].reshape(300, 5 * D_ENC)  # concatenate every 5 frames
    w1, b1 = tensors["model.speech_projector.linear1.weight"], tensors["model.speech_projector.linear1.bias"]
    w2, b2 = tensors["model.speech_projector.linear2.weight"], tensors["model.speech_projector.linear2.bias"]
    return torch.relu(stacked @ w1.T + b1) @ w2.T + b2  # [300, D_LLM]


def _reference_llm(tensors) -> LlamaForCausalLM:
    cfg = {k: v for k, v in _config().items() if not k.startswith(("speech", "ctc", "unit", "model_type"))}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("model.layers", "model.embed",
                                                                             "model.norm", "lm_head"))})
    return model


def _reference_decoder(tensors, hidden: torch.Tensor) -> torch.Tensor:
    layers, width, heads, ffn = DECODER
    cfg = LlamaConfig(hidden_size=width, intermediate_size=ffn, num_attention_heads=heads,
                      num_key_value_heads=heads, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=ROPE, max_position_embeddings=131072, attn_implementation="eager")
    x = hidden.repeat_interleave(LAMBDA, dim=0)[None]  # [1, 25*M, D]
    h = x @ tensors["speech_generator.input_proj.weight"].T + tensors["speech_generator.input_proj.bias"]
    positions = torch.arange(h.shape[1])[None]
    cos_sin = LlamaRotaryEmbedding(cfg)(h, positions)
    mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
    for i in range(layers):
        layer = LlamaDecoderLayer(cfg, i)
        prefix = f"speech_generator.layers.{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
    logits = h @ tensors["speech_generator.output_proj.weight"].T + tensors["speech_generator.output_proj.bias"]
    return torch.log_softmax(logits.float(), -1)[0]  # no final norm: [25*M, K+1]


def _collapse(best: list[int], blank: int) -> list[int]:
    merged = [v for i, v in enumerate(best) if i == 0 or v != best[i - 1]]
    return [v for v in merged if v != blank]


# -- the tests ------------------------------------------------------------------------------
@torch.no_grad()
def test_published_checkpoint_matches_reference(published):
    root, tensors = published
    model = load_model(root)
    cfg = model.config
    assert cfg.encoder.pad_to_30s and cfg.llm.prompt_style == "llama3-omni"
    assert set(model.llm.stop_token_ids) == {128001, 128008, 128009}
    assert model.llm.pad_token_id == 128004

    audio = load_audio(SPEECH[0])
    (speech,) = model.encode_speech([audio])
    ref_speech = _reference_speech(tensors, audio)
    assert speech.shape == (300, D_LLM)  # 30 s -> 3000 mel frames -> 1500 -> 300
    torch.testing.assert_close(speech, ref_speech, atol=1e-4, rtol=1e-4)

    prompt = model.prompt_ids([Turn.user()])
    assert prompt == _reference_prompt_ids(model.llm.tokenizer)
    assert prompt[:2] == [128000, 128000]

    ref_llm = _reference_llm(tensors)
    at = prompt.index(-200)
    embed = ref_llm.get_input_embeddings()
    ref_prompt = torch.cat([embed(torch.tensor(prompt[:at])), ref_speech, embed(torch.tensor(prompt[at + 1:]))])
    # reference greedy decoding with full recomputation, 6 tokens
    ids, states = [], []
    for _ in range(6):
        x = torch.cat([ref_prompt, embed(torch.tensor(ids, dtype=torch.long))])[None]
        out = ref_llm(inputs_embeds=x, output_hidden_states=True)
        states.append(out.hidden_states[-1][0, -1])
        ids.append(int(out.logits[0, -1].argmax()))
    ref_hidden = torch.stack(states)  # [M, D]: c_i, the state that predicted token i

    logits, hidden, counts = model.answer_states([speech], [prompt], [ids])
    assert counts.tolist() == [6]
    assert logits[0].argmax(-1).tolist() == ids
    torch.testing.assert_close(hidden[0], ref_hidden, atol=1e-4, rtol=1e-4)
    full = ref_llm(inputs_embeds=torch.cat([ref_prompt, embed(torch.tensor(ids[:-1]))])[None]).logits[0, -6:]
    torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)

    ref_log_probs = _reference_decoder(tensors, ref_hidden)
    log_probs, lengths = model.speech_decoder(hidden)
    assert lengths.tolist() == [6 * LAMBDA]
    torch.testing.assert_close(log_probs[0], ref_log_probs, atol=1e-4, rtol=1e-4)
    ref_units = _collapse(ref_log_probs.argmax(-1).tolist(), blank=UNITS)
    assert model.speech_decoder.greedy_units(log_probs) == [ref_units]
    assert len(ref_units) > 3  # the check is not vacuous


def test_speech_encoder_path_override_and_missing_encoder(published, tmp_path):
    root, _ = published
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    moved = tmp_path / "elsewhere.pt"
    shutil.move(copy / "whisper" / "tiny.pt", moved)
    model = load_model(copy, speech_encoder=moved)  # explicit override
    assert model.config.encoder.width == D_ENC
    # without the .pt the shards' model.speech_encoder.* tensors still define the encoder
    assert load_model(copy).config.encoder.n_layers == ENC_LAYERS


def test_published_loader_names_bad_tensors(published, tmp_path):
    root, tensors = published
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    shard = copy / "model-00002-of-00002.safetensors"
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    keys = [k for k, s in index["weight_map"].items() if s == shard.name]
    bad = {k: tensors[k].contiguous() for k in keys}
    victim = next(k for k in keys if k.startswith("speech_generator.layers.1"))
    bad[victim] = torch.zeros(3, 3)
    save_file(bad, shard)
    with pytest.raises(CheckpointError, match=victim.removeprefix("speech_generator.")):
        load_model(copy)
    del bad[victim]
    save_file(bad, shard)
    index["weight_map"].pop(victim)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(copy)
