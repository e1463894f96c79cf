"""Stage D: the CTC speech decoder against the Hugging Face Llama layers it must equal."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llama_omni.inference.events import Clock
from llama_omni.inference.speech_path import SpeechPath
from llama_omni.model.speech_decoder import (
    IGNORE_INDEX,
    LLAMA31_ROPE_SCALING,
    SpeechDecoder,
    SpeechDecoderConfig,
    copy_indices,
    ctc_collapse,
)


def tiny(**changes) -> SpeechDecoderConfig:
    return SpeechDecoderConfig.preset("tiny-test").replace(**changes)


def hf_reference(decoder: SpeechDecoder, hidden: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Log-probs computed with transformers' own LlamaDecoderLayer and rotary embedding;
    `window` bands the causal mask by hand."""
    cfg = decoder.config
    llama = LlamaConfig(
        hidden_size=cfg.width, intermediate_size=cfg.ffn, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, num_hidden_layers=cfg.n_layers, rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, max_position_embeddings=131072,
        attn_implementation="eager",
    )
    x = hidden.repeat_interleave(cfg.upsample, dim=1)
    h = decoder.input_proj(x)
    positions = torch.arange(h.shape[1])[None]
    rotary = LlamaRotaryEmbedding(llama)
    cos_sin = rotary(h, positions)
    mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)
    if window is not None:
        mask = mask + torch.full_like(mask, float("-inf")).tril(-window)
    mask = mask[None, None]
    for i, ours in enumerate(decoder.layers):
        layer = LlamaDecoderLayer(llama, i)
        layer.load_state_dict(ours.state_dict())
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
    return torch.log_softmax(decoder.output_proj(h).float(), -1)


@pytest.mark.parametrize("scaling", [None, {**LLAMA31_ROPE_SCALING, "original_max_position_embeddings": 64}])
def test_matches_transformers_llama_layers(scaling):
    torch.manual_seed(0)
    decoder = SpeechDecoder(tiny(rope_theta=500000.0, rope_scaling=scaling)).eval()
    hidden = torch.randn(2, 7, 64)
    with torch.no_grad():
        ours, lengths = decoder(hidden)
        ref = hf_reference(decoder, hidden)
    assert ours.shape == (2, 7 * 25, 33) and lengths.tolist() == [175, 175]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_causal_prefix_outputs_do_not_change():
    torch.manual_seed(1)
    decoder = SpeechDecoder(tiny()).eval()
    hidden = torch.randn(1, 9, 64)
    with torch.no_grad():
        full, _ = decoder(hidden)
        prefix, _ = decoder(hidden[:, :4])
    torch.testing.assert_close(full[:, : 4 * 25], prefix, atol=1e-5, rtol=1e-5)


def test_streaming_chunks_equal_one_shot():
    torch.manual_seed(2)
    decoder = SpeechDecoder(tiny()).eval()
    hidden = torch.randn(2, 10, 64)
    with torch.no_grad():
        full, _ = decoder(hidden)
        full_units = decoder.greedy_units(full)
        pieces, units = [], [[], []]
        with decoder.streaming(batch_size=2):
            for start, stop in [(0, 1), (1, 4), (4, 5), (5, 10)]:
                log_probs, _ = decoder(hidden[:, start:stop])
                pieces.append(log_probs)
                for b, new in enumerate(decoder.greedy_units(log_probs)):
                    units[b].extend(new)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert units == full_units
    assert not decoder.is_streaming


def test_attention_window_matches_a_banded_llama_mask():
    torch.manual_seed(4)
    decoder = SpeechDecoder(tiny(attention_window=40)).eval()
    hidden = torch.randn(2, 7, 64)
    with torch.no_grad():
        ours, _ = decoder(hidden)
        ref = hf_reference(decoder, hidden, window=40)
        full = hf_reference(decoder, hidden)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, full, atol=1e-3)  # the window does change late positions
    torch.testing.assert_close(ours[:, :40], full[:, :40], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 30, 64, 250])
def test_windowed_streaming_equals_one_shot_and_keeps_the_cache_bounded(window):
    torch.manual_seed(5)
    decoder = SpeechDecoder(tiny(attention_window=window)).eval()
    hidden = torch.randn(2, 60, 64)  # 1500 positions: many buffer compactions
    with torch.no_grad():
        full, _ = decoder(hidden)
        pieces, units = [], [[], []]
        with decoder.streaming(batch_size=2):
            for start in range(0, 60, 3):
                log_probs, _ = decoder(hidden[:, start : start + 3])
                pieces.append(log_probs)
                for b, new in enumerate(decoder.greedy_units(log_probs)):
                    units[b].extend(new)
            capacity = decoder._streaming_state.caches[0]._keys.shape[2]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert units == decoder.greedy_units(full)
    assert capacity <= max(2 * (window - 1 + 3 * 25), 256)


def test_window_longer_than_the_answer_equals_full_attention():
    torch.manual_seed(6)
    hidden = torch.randn(1, 8, 64)
    full = SpeechDecoder(tiny()).eval()
    windowed = SpeechDecoder(tiny(attention_window=200)).eval()
    windowed.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(windowed(hidden)[0], full(hidden)[0], atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_single_items():
    torch.manual_seed(3)
    decoder = SpeechDecoder(tiny()).eval()
    a, b = torch.randn(1, 6, 64), torch.randn(1, 3, 64)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, 64)], 1)])
    with torch.no_grad():
        units = decoder.predict_units(batch, torch.tensor([6, 3]))
        assert units == decoder.predict_units(a) + decoder.predict_units(b)


@pytest.mark.parametrize(
    "symbols, previous, expected",
    [
        ([1, 1, 2, 9, 9, 2, 3], None, [1, 2, 2, 3]),  # the paper's example, blank = 9
        ([9, 9, 9], None, []),
        ([4, 4, 5], 4, [5]),  # unit repeated across a chunk boundary: not emitted again
        ([4, 5], 9, [4, 5]),  # a blank at the boundary separates equal units
        ([], 3, []),
    ],
)
def test_ctc_collapse(symbols, previous, expected):
    assert ctc_collapse(symbols, blank=9, previous=previous) == expected


def test_upsample_repeats_and_stretches_for_long_targets():
    decoder = SpeechDecoder(tiny(upsample=2))
    hidden = torch.arange(3.0)[None, :, None].expand(1, 3, 64)
    x, lengths = decoder.upsample(hidden)
    assert x[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2] and lengths.tolist() == [6]
    x, lengths = decoder.upsample(hidden, target_lengths=torch.tensor([9]))
    assert x[0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and lengths.tolist() == [9]


def test_ctc_loss_is_mean_per_target_unit_and_trains():
    torch.manual_seed(4)
    decoder = SpeechDecoder(tiny())
    hidden = torch.randn(2, 4, 64)
    targets = torch.tensor([[1, 2, 3, IGNORE_INDEX], [5, 5, 6, 7]])
    log_probs, lengths = decoder(hidden)
    loss = decoder.ctc_loss(log_probs, lengths, targets)
    manual = torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1), torch.tensor([1, 2, 3, 5, 5, 6, 7]), lengths,
        torch.tensor([3, 4]), blank=32, reduction="sum",
    ) / 7
    torch.testing.assert_close(loss, manual)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        log_probs, lengths = decoder(hidden)
        trained = decoder.ctc_loss(log_probs, lengths, targets)
        trained.backward()
        optimizer.step()
    # All lambda copies of the first token see identical inputs, so they give identical
    # outputs; greedy decoding of a tiny overfit model can therefore drop the first unit,
    # and the assertion is on the loss.
    assert trained.item() < 0.05 * loss.item()


def test_published_config_string_is_parsed_once_and_validated():
    cfg = SpeechDecoderConfig.from_published(
        {"hidden_size": 4096, "ctc_decoder_config": "(2,4096,32,11008)", "ctc_upsample_factor": 25,
         "unit_vocab_size": 1000, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE_SCALING,
         "rms_norm_eps": 1e-5}
    )
    assert (cfg.n_layers, cfg.width, cfg.n_heads, cfg.ffn) == (2, 4096, 32, 11008)
    assert cfg.blank_id == 1000 and cfg.head_dim == 128
    with torch.device("meta"):
        params = sum(p.numel() for p in SpeechDecoder(cfg).parameters())
    assert 420e6 < params < 430e6  # "about 425M parameters" (SPEC section 2)
    with pytest.raises(ValueError, match="ctc_decoder_config"):
        SpeechDecoderConfig.from_published({"hidden_size": 8, "ctc_decoder_config": "2,4096"})
    with pytest.raises(ValueError, match="heads"):
        tiny(width=60, n_heads=8)
    assert cfg.attention_window is None  # the published decoder attends over all positions
    with pytest.raises(ValueError, match="attention_window"):
        tiny(attention_window=0)
    assert SpeechDecoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        SpeechDecoderConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_widening_the_input_for_token_input_keeps_what_the_decoder_computes():
    torch.manual_seed(0)
    decoder = SpeechDecoder(tiny()).eval()
    wide, kept = decoder.reconfigured(token_input=True, input_width=2 * decoder.config.input_width)
    assert kept and wide.config.token_input
    states = torch.randn(1, 5, decoder.config.input_width)
    tokens = torch.randn(1, 5, decoder.config.input_width)
    before, _ = decoder(states)
    after, _ = wide(torch.cat([states, tokens], -1))
    torch.testing.assert_close(after, before)  # the new input columns start at zero
    _, kept = decoder.reconfigured(input_width=decoder.config.input_width // 2)
    assert not kept  # a narrower input cannot keep the weights


def test_a_deeper_decoder_starts_as_the_trained_one_then_its_new_layers_learn():
    torch.manual_seed(3)
    decoder = SpeechDecoder(tiny()).eval()
    deep, kept = decoder.reconfigured(n_layers=4)
    assert kept and len(deep.layers) == 4
    hidden = torch.randn(2, 6, 64)
    torch.testing.assert_close(deep(hidden)[0], decoder(hidden)[0])  # added layers: identity
    log_probs, lengths = deep.train()(hidden)
    targets = torch.randint(0, 32, (2, 20))
    deep.ctc_loss(log_probs, lengths, targets).backward()
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # the zeroed projections get gradients
        assert deep.layers[3].get_submodule(name).weight.grad.abs().sum() > 0
    with torch.no_grad():
        deep.layers[3].mlp.down_proj.weight.normal_(std=0.1)
        deep.eval()
        whole, _ = deep(hidden)
        with deep.streaming(2):
            chunks = torch.cat([deep(hidden[:, :2])[0], deep(hidden[:, 2:3])[0], deep(hidden[:, 3:])[0]], 1)
    torch.testing.assert_close(chunks, whole)
    _, kept = deep.reconfigured(n_layers=2)
    assert not kept  # fewer layers cannot keep the weights


def test_dropout_acts_in_training_only_and_keeps_the_weights():
    torch.manual_seed(4)
    decoder = SpeechDecoder(tiny()).eval()
    noisy, kept = decoder.reconfigured(dropout=0.3)
    assert kept
    hidden = torch.randn(1, 4, 64)
    torch.testing.assert_close(noisy.eval()(hidden)[0], decoder(hidden)[0])
    noisy.train()
    assert not torch.allclose(noisy(hidden)[0], decoder(hidden)[0], atol=1e-3)
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)


def test_copy_indices_count_within_each_token_and_cap_stretched_tokens():
    index = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    assert copy_indices(index, 3).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 1, 2, 2, 0, 1, 2, 2, 2]]


def test_copy_position_starts_neutral_then_marks_each_copy_and_streams_like_one_shot():
    torch.manual_seed(5)
    decoder = SpeechDecoder(tiny()).eval()
    marked, kept = decoder.reconfigured(copy_position=True)
    assert kept and marked.copy_embedding.shape == (25, 64)
    hidden = torch.randn(2, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(marked(hidden)[0], decoder(hidden)[0])  # zero at first
        marked.copy_embedding.normal_()
        x, _ = marked.upsample(torch.zeros(1, 2, 64))
        torch.testing.assert_close(x[0], marked.copy_embedding.repeat(2, 1))  # copy k gets row k
        full, _ = marked(hidden)
        assert not torch.allclose(full, decoder(hidden)[0], atol=1e-3)
        with marked.streaming(batch_size=2):
            pieces = [marked(hidden[:, a:b])[0] for a, b in [(0, 1), (1, 4), (4, 6)]]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_lookahead_starts_neutral_then_reads_the_next_token_and_streams_like_one_shot():
    torch.manual_seed(6)
    decoder = SpeechDecoder(tiny(copy_position=True)).eval()
    ahead, kept = decoder.reconfigured(lookahead=True)
    assert kept and ahead.lookahead_proj.weight.abs().sum() == 0
    hidden = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(ahead(hidden)[0], decoder(hidden)[0])  # zero at first
        ahead.lookahead_proj.weight.normal_(std=0.1)
        ahead.copy_embedding.normal_()
        full, lengths = ahead(hidden)
        changed = hidden.clone()
        changed[:, 4] += 1.0
        moved = (ahead(changed)[0] - full).abs().amax(-1)  # [B, T]
        assert moved[:, : 3 * 25].max() == 0  # tokens 0-2 never see token 4
        assert moved[:, 3 * 25 : 4 * 25].min() > 0  # token 3 reads it as its next token
        # A padded item: its last real token reads zeros, not the padding after it.
        short, _ = ahead(hidden[:1, :4])
        padded = torch.cat([hidden[:1, :4], torch.randn(1, 3, 64)], 1)
        torch.testing.assert_close(ahead(padded, torch.tensor([4]))[0][:, : 4 * 25], short)
        pieces, units = [], [[], []]
        with ahead.streaming(batch_size=2):
            for start, stop in [(0, 1), (1, 4), (4, 5), (5, 7)]:
                log_probs, _ = ahead(hidden[:, start:stop])
                assert log_probs.shape[1] == (stop - 1 - max(start - 1, 0)) * 25  # one token late
                pieces.append(log_probs)
                for b, new in enumerate(ahead.greedy_units(log_probs)):
                    units[b].extend(new)
            last, _ = ahead.flush()  # the last token, with zeros for its next one
            pieces.append(last)
            for b, new in enumerate(ahead.greedy_units(last)):
                units[b].extend(new)
            assert ahead.flush()[0].shape == (2, 0, 33)  # nothing waits any more
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert units == ahead.greedy_units(full, lengths)


def test_blank_penalty_lets_more_units_through_and_streams_like_one_shot():
    torch.manual_seed(7)
    decoder = SpeechDecoder(tiny()).eval()
    with torch.no_grad():
        decoder.output_proj.bias[decoder.config.blank_id] += 3.0  # a decoder that favours blank
        hidden = torch.randn(2, 6, 64)
        log_probs, lengths = decoder(hidden)
        plain = decoder.greedy_units(log_probs, lengths)
        penalized, _ = decoder.reconfigured(blank_penalty=4.0)
        more = penalized.greedy_units(log_probs, lengths)
        assert all(len(m) > len(p) for m, p in zip(more, plain))
        units = [[], []]
        with penalized.streaming(batch_size=2):
            for start, stop in [(0, 2), (2, 3), (3, 6)]:
                for b, new in enumerate(penalized.greedy_units(penalized(hidden[:, start:stop])[0])):
                    units[b].extend(new)
    assert units == more
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="blank_penalty"):
            tiny(blank_penalty=bad)


@pytest.mark.parametrize("lookahead", [False, True])
def test_speech_path_word_ends_fall_after_the_units_of_the_tokens_before_a_word(lookahead):
    """Chunks cut at word ends need the unit count at each word start; with lookahead a
    step's units are the previous token's, so the boundary is known only after them."""
    torch.manual_seed(8)
    decoder, _ = SpeechDecoder(tiny()).eval().reconfigured(lookahead=lookahead)
    if lookahead:
        with torch.no_grad():
            decoder.lookahead_proj.weight.normal_(std=0.2)
    hidden = torch.randn(1, 8, 64)
    word_starts = [True, False, True, True, False, False, True, False]
    with torch.no_grad():
        full, _ = decoder(hidden)
    with SpeechPath(decoder, None, 1, Clock(), cut_at_word_ends=True) as path:
        for t in range(8):
            path.step(hidden[:, t], [True], [word_starts[t]], [t == 7])
            if word_starts[t] and t < 7:
                before = decoder.greedy_units(full[:, : t * 25])[0]  # tokens 0 .. t-1
                assert path.tracks[0].word_end == len(before), t
        assert path.tracks[0].units == decoder.greedy_units(full)[0]
