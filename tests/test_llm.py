"""SpeechLLM on tiny random Llama / Qwen2 backbones, and the packaged SmolLM2."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llama_omni.model.llm import LLMConfig, SpeechLLM, load_backbone, resolve_source
from llama_omni.model.prompt import SPEECH_TOKEN_INDEX as S
from llama_omni.model.prompt import Turn
from llama_omni.packaged import PackagedAssetError, smollm2_dir

WIDTH, VOCAB = 64, 96
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _tiny_model(arch, vocab=VOCAB):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=WIDTH,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=[3, 4],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def _tiny_tokenizer():
    """A byte-level BPE with ChatML specials (the kind Llama-3 and Qwen2 use), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["hello world"] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


@pytest.fixture(params=sorted(ARCHS))
def llm(request):
    config = LLMConfig(source="embedded", hidden_size=WIDTH, prompt_style="chat-template")
    return SpeechLLM(_tiny_model(request.param), _tiny_tokenizer(), config)


def _speech(*lengths):
    torch.manual_seed(1)
    return [torch.randn(n, WIDTH) for n in lengths]


def test_splice_matches_manual_embeddings(llm):
    ids = [5, 7, S, 9, S, 11]
    a, b = _speech(3, 2)
    embeds, mask, positions = llm.embed_prompt([ids], [a, b])
    table = llm.model.get_input_embeddings()
    text = [table(torch.tensor(piece)) for piece in ([5, 7], [9], [11])]
    manual = torch.cat([text[0], a, text[1], b, text[2]])  # [9, D]
    assert embeds.shape == (1, 9, WIDTH)
    torch.testing.assert_close(embeds[0], manual)
    assert mask.tolist() == [[1] * 9] and positions.tolist() == [list(range(9))]
    with torch.no_grad():
        out = llm(embeds, mask, positions)
        reference = llm.model(inputs_embeds=manual[None]).logits
    assert out.logits.shape == (1, 9, VOCAB) and out.hidden.shape == (1, 9, WIDTH)
    torch.testing.assert_close(out.logits, reference)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_items_alone(llm, side):
    prompts = [[5, S, 6, 7], [8, 9, 10, S, 11, 12, 13]]
    speech = _speech(2, 4)
    embeds, mask, positions = llm.embed_prompt(prompts, speech, padding_side=side)
    assert mask.sum(-1).tolist() == [5, 10] and embeds.shape[:2] == (2, 10)
    pad = slice(0, 5) if side == "left" else slice(5, 10)
    assert embeds[0, pad].abs().sum() == 0 and positions[0, pad].abs().sum() == 0
    with torch.no_grad():
        batch = llm(embeds, mask, positions).logits  # [2, 10, V]
        for b, (ids, segment) in enumerate(zip(prompts, speech)):
            alone = llm(*llm.embed_prompt([ids], [segment])).logits[0]  # [L_b, V]
            real = mask[b].bool()
            torch.testing.assert_close(batch[b, real], alone, atol=1e-4, rtol=1e-4)


def test_hidden_is_post_norm(llm):
    """The hidden state is what the LM head reads (after the final norm)."""
    with torch.no_grad():
        out = llm(*llm.embed_prompt([[5, S, 6]], _speech(3)))
        torch.testing.assert_close(llm.model.get_output_embeddings()(out.hidden), out.logits)


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes by the current keyword
def test_cached_step_equals_full_forward(llm):
    prompts = [[5, S, 6], [8, 9, S, 11, 12]]
    speech = _speech(2, 3)
    next_ids = torch.tensor([[20], [21]])  # [B, 1]
    with torch.no_grad():
        embeds, mask, positions = llm.embed_prompt(prompts, speech)
        prefill = llm(embeds, mask, positions, use_cache=True)
        step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)  # [B, L + 1]
        step_positions = positions[:, -1:] + 1  # [B, 1]
        step = llm(
            llm.embed_tokens(next_ids), step_mask, step_positions, prefill.past_key_values, True
        )
        full_prompts = [p + [t] for p, t in zip(prompts, next_ids.flatten().tolist())]
        full = llm(*llm.embed_prompt(full_prompts, speech))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.hidden[:, -1], full.hidden[:, -1], atol=1e-4, rtol=1e-4)


def test_embed_prompt_errors(llm):
    with pytest.raises(ValueError, match="2 speech placeholders"):
        llm.embed_prompt([[5, S], [S, 6]], _speech(1))
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        llm.embed_prompt([[5, S]], [torch.randn(2, 32)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.embed_prompt([[5, VOCAB]], [])
    with pytest.raises(ValueError, match="padding_side"):
        llm.embed_prompt([[5]], [], padding_side="middle")


def test_stop_and_pad_ids():
    model = _tiny_model("llama")
    model.generation_config.eos_token_id = [4, 5]
    config = LLMConfig(source="embedded", hidden_size=WIDTH)
    tokenizer = _tiny_tokenizer()
    assert SpeechLLM(model, tokenizer, config).stop_token_ids == {3, 4, 5}
    assert SpeechLLM(model, tokenizer, config).pad_token_id is None
    custom = config.replace(stop_token_ids=(7,), pad_token_id=1)
    assert SpeechLLM(model, tokenizer, custom).stop_token_ids == {7}
    assert SpeechLLM(model, tokenizer, custom).pad_token_id == 1
    with pytest.raises(ValueError, match="hidden_size is 32"):
        SpeechLLM(model, tokenizer, config.replace(hidden_size=32))


def test_config_round_trip_and_validation():
    config = LLMConfig(source="some/dir", hidden_size=4096, stop_token_ids=[128001, 128009])
    assert config.stop_token_ids == (128001, 128009)
    assert LLMConfig.from_dict(config.to_dict()) == config
    assert config.repetition_penalty == 1.0  # configs saved before the field: plain greedy
    bad = [
        dict(source=""),
        dict(source="packaged:gpt5"),
        dict(hidden_size=0),
        dict(prompt_style="vicuna"),
        dict(system_prompt="hi <speech>"),
        dict(stop_token_ids=(-1,)),
        dict(pad_token_id=True),
        dict(repetition_penalty=0.9),
        dict(repetition_penalty=float("inf")),
    ]
    for change in bad:
        with pytest.raises(ValueError):
            LLMConfig(**{**config.to_dict(), **change})
    with pytest.raises(ValueError, match="unknown field"):
        LLMConfig.from_dict({**config.to_dict(), "vocab": 3})


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_load_backbone_from_directories(tmp_path, arch):
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(arch, vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    hello = tokenizer("hello world")["input_ids"]
    sources = [("embedded", tmp_path), ("llm", tmp_path), (str(tmp_path / "llm"), None)]
    for source, base_dir in sources:
        loaded, loaded_tokenizer = load_backbone(source, base_dir=base_dir, dtype=torch.float64)
        assert type(loaded) is type(model) and loaded.dtype == torch.float64
        assert loaded_tokenizer("hello world")["input_ids"] == hello
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.double())
    llm = SpeechLLM.load(LLMConfig(source="embedded", hidden_size=WIDTH), base_dir=tmp_path)
    assert llm.stop_token_ids == {3, 4} and llm.model.dtype == torch.float32


def test_missing_sources_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source("embedded", tmp_path)
    with pytest.raises(ValueError, match="needs base_dir"):
        resolve_source("embedded")


def test_packaged_smollm2():
    try:
        smollm2_dir()
    except PackagedAssetError as e:
        pytest.skip(f"SmolLM2 package not installed: {e}")
    config = LLMConfig(
        source="packaged:smollm2-135m-instruct", hidden_size=576, prompt_style="chat-template"
    )
    model, tokenizer = load_backbone(config.source, dtype=torch.float32)
    llm = SpeechLLM(model, tokenizer, config)
    assert llm.stop_token_ids == {2} and llm.pad_token_id == 2
    ids = llm.prompt_ids()
    assert ids.count(S) == 1 and ids[-4:] == [1, 520, 9531, 198]  # "<|im_start|>assistant\n"
    with torch.no_grad():
        out = llm(*llm.embed_prompt([ids], [torch.randn(6, 576) * 0.02]))
    assert out.logits.shape == (1, len(ids) + 5, 49152)
    assert torch.isfinite(out.logits).all()
    assert _greedy(llm, [Turn.user("What is two plus two?", speech=False)], 3) == "Two plus two"


def _greedy(llm, turns, steps):
    """A few greedy steps through the KV cache: the real weights must answer sensibly."""
    with torch.no_grad():
        embeds, mask, positions = llm.embed_prompt([llm.prompt_ids(turns)], [])
        out = llm(embeds, mask, positions, use_cache=True)
        tokens = []
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            tokens.append(token.item())
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = llm(llm.embed_tokens(token), mask, positions, out.past_key_values, True)
    return llm.tokenizer.decode(tokens)
