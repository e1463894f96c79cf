"""The streaming engine against offline references (tiny model, greedy unless stated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_fixtures import (  # noqa: F401 (fixtures)
    engine,
    one_thread_fixture,
    tiny_omni_fixture,
    tiny_vocoder_fixture,
    tone,
    with_stop_ids,
)

from llama_omni.audio import AudioError
from llama_omni.inference.events import AudioChunk, End, TextDelta, Units, collect
from llama_omni.inference.sampling import (
    SamplingOptions,
    TokenSelector,
    penalize_repeats,
    top_p_filter,
)
from llama_omni.inference.session import Conversation, prompt_length
from llama_omni.model.omni import OmniModel
from llama_omni.model.prompt import Turn


def offline_units(model, audio, token_ids) -> list[int]:
    """Units from a teacher-forced pass over the whole answer and one decoder pass."""
    speech = model.encode_speech([audio])
    prompt = model.prompt_ids([Turn.user()])
    _, states, _ = model.answer_states(speech, [prompt], [token_ids])
    return model.speech_decoder.predict_units(states)[0]


@torch.no_grad()
def naive_greedy(model, prompt, speech, max_new_tokens):
    """Greedy decoding that recomputes the whole sequence at every step (no cache)."""
    ids, states = [], []
    for _ in range(max_new_tokens):
        embeds, mask, positions = model.llm.embed_prompt([prompt + ids], speech)
        out = model.llm(embeds, mask, positions)
        ids.append(int(out.logits[0, -1].argmax()))
        states.append(out.hidden[0, -1])
        if ids[-1] in model.llm.stop_token_ids:
            break
    units = model.speech_decoder.predict_units(torch.stack(states)[None])[0]
    return ids, units


def test_streaming_equals_offline_for_every_chunk_size(tiny_omni, tiny_vocoder):
    audio = tone(1.0, 220)
    answers = {
        omega: engine(tiny_omni, tiny_vocoder, chunk_size=omega, max_new_tokens=30).answer([audio])[
            0
        ]
        for omega in (10, 40, None)
    }
    reference = answers[None]
    assert len(reference.token_ids) == 30 and len(reference.units) > 30
    assert reference.units == offline_units(tiny_omni, audio, reference.token_ids)
    whole = tiny_vocoder.vocode(reference.units)
    for omega, answer in answers.items():
        assert answer.token_ids == reference.token_ids, omega
        assert answer.units == reference.units, omega
        assert answer.audio.shape == whole.shape  # durations fixed as in one-shot vocoding
        np.testing.assert_allclose(answer.audio, whole, atol=0.02)


def first_unique_token(answers, i, start) -> int:
    others = {t for j, a in enumerate(answers) if j != i for t in a.token_ids}
    return next(k for k in range(start, 11) if answers[i].token_ids[k] not in others)


def test_batch_equals_one_request_at_a_time_with_per_request_stop(tiny_omni, tiny_vocoder):
    audios = [tone(1.0, 220), tone(0.6, 440, seed=1), tone(1.3, 330, seed=2)]
    alone = [engine(tiny_omni, tiny_vocoder).answer([a])[0] for a in audios]
    assert len({tuple(a.token_ids) for a in alone}) == 3, "the requests should differ"
    # Make requests 0 and 1 stop at different steps, on tokens the other requests avoid.
    at1 = first_unique_token(alone, 1, start=2)
    at0 = first_unique_token(alone, 0, start=at1 + 1)
    model = with_stop_ids(tiny_omni, (alone[0].token_ids[at0], alone[1].token_ids[at1]))
    alone = [engine(model, tiny_vocoder).answer([a])[0] for a in audios]
    batch = engine(model, tiny_vocoder).answer(audios)
    assert [len(a.token_ids) for a in alone] == [at0 + 1, at1 + 1, 12]
    assert [a.end_reason for a in alone] == ["stop", "stop", "length"]
    for single, batched in zip(alone, batch):
        assert batched.token_ids == single.token_ids
        assert batched.units == single.units
        assert batched.end_reason == single.end_reason
        np.testing.assert_allclose(batched.audio, single.audio, atol=1e-4)


@pytest.mark.parametrize("overlap", [True, False])
def test_decoding_loop_equals_naive_full_recompute(tiny_omni, overlap):
    audio = tone(0.8, 300)
    answer = engine(tiny_omni, max_new_tokens=10, overlap=overlap).answer([audio])[0]
    speech = tiny_omni.encode_speech([audio])
    ids, units = naive_greedy(tiny_omni, tiny_omni.prompt_ids([Turn.user()]), speech, 10)
    assert answer.token_ids == ids
    assert answer.units == units


def test_incremental_speech_decoder_equals_recompute_in_the_engine(tiny_omni):
    audio = tone(1.0, 250)
    runs = {}
    for mode in ("incremental", "recompute"):
        events = list(engine(tiny_omni, decoder_mode=mode).stream([audio]))
        runs[mode] = [e.units for e in events if isinstance(e, Units)]
    assert runs["incremental"] == runs["recompute"]
    assert sum(len(u) for u in runs["incremental"]) > 10


def test_sampling_is_reproducible_with_a_seed(tiny_omni):
    audio = tone(1.0, 220)

    def sample(seed, **kw):
        options = SamplingOptions(
            temperature=kw.get("temperature", 1.0), top_p=kw.get("top_p", 0.9), seed=seed
        )
        return engine(tiny_omni, sampling=options, speech=False).answer([audio])[0].token_ids

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    greedy = engine(tiny_omni, speech=False).answer([audio])[0].token_ids
    assert sample(5, top_p=1e-6) == greedy  # the nucleus keeps only the best token
    # A request samples the same tokens alone and inside a batch (one generator each).
    options = SamplingOptions(temperature=1.0, top_p=0.9, seed=3)
    batch = engine(tiny_omni, sampling=options, speech=False).answer([audio, tone(0.5, 500)])
    assert batch[0].token_ids == sample(3)


def test_top_p_filter_and_selector_validation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0)
    assert TokenSelector(SamplingOptions(repetition_penalty=1.0), 1, "cpu")(logits).tolist() == [0]
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingOptions(repetition_penalty=bad)


def test_repetition_penalty_lowers_the_tokens_a_row_already_produced():
    logits = torch.tensor([[2.0, 1.5, -1.0, -3.0]])
    seen = torch.tensor([[True, False, True, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, 1.5, -2.0, -3.0]]
    select = TokenSelector(SamplingOptions(repetition_penalty=2.0), 2, "cpu")
    rows = torch.tensor([[2.0, 1.5, 0.5, 0.1], [0.1, 0.2, 3.0, 2.0]])
    assert select(rows).tolist() == [0, 2]
    assert select(rows).tolist() == [1, 3]  # 2.0 / 2 < 1.5 and 3.0 / 2 < 2.0
    assert select(rows).tolist() == [0, 2]  # once per token, not compounded: 1.0 > 0.75
    plain = TokenSelector(SamplingOptions(repetition_penalty=1.0), 2, "cpu")
    assert [plain(rows).tolist() for _ in range(3)] == [[0, 2]] * 3


def test_the_engine_applies_the_repetition_penalty_at_every_step(tiny_model):
    # An LM head that ignores the state and always ranks token 0 first, then 1, 2, ...:
    # greedy decoding repeats token 0; with the penalty each step takes the next token.
    vocab = tiny_model.llm.model.lm_head.out_features
    head = torch.nn.Linear(tiny_model.llm.model.lm_head.in_features, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(5.0 - 0.01 * torch.arange(vocab))
    tiny_model.llm.model.lm_head = head
    audio = tone(1.0, 220)
    plain = engine(tiny_model, speech=False, max_new_tokens=10).answer([audio])
    assert plain[0].token_ids == [0] * 10
    options = SamplingOptions(repetition_penalty=2.0)  # 5.0 / 2 falls below 4.99 - 0.01 k
    penalized = engine(tiny_model, sampling=options, speech=False, max_new_tokens=10)
    answers = penalized.answer([audio, tone(0.5, 500)])
    assert [a.token_ids for a in answers] == [list(range(10))] * 2
    # No penalty chosen: the model's own (its config) applies; an explicit 1 turns it off.
    tiny_model.config.llm.repetition_penalty = 2.0
    own = engine(tiny_model, speech=False, max_new_tokens=10).answer([audio])
    assert own[0].token_ids == list(range(10))
    off = engine(tiny_model, sampling=SamplingOptions(repetition_penalty=1.0), speech=False,
                 max_new_tokens=10).answer([audio])
    assert off[0].token_ids == [0] * 10
    with pytest.raises(ValueError, match="resolve the repetition penalty"):
        TokenSelector(SamplingOptions(), 1, "cpu")


def test_events_are_typed_ordered_and_stamped(tiny_omni, tiny_vocoder):
    audios = [tone(1.0, 220), tone(0.6, 440, seed=1)]
    events = list(engine(tiny_omni, tiny_vocoder, chunk_size=5, max_new_tokens=20).stream(audios))
    stamps = [e.ms for e in events]
    assert stamps == sorted(stamps) and stamps[0] > 0
    for request in range(2):
        mine = [e for e in events if e.request == request]
        assert isinstance(mine[-1], End) and sum(isinstance(e, End) for e in mine) == 1
        kinds = {type(e) for e in mine}
        assert kinds == {TextDelta, Units, AudioChunk, End}
        chunks = [e for e in mine if isinstance(e, AudioChunk)]
        assert len(chunks) > 1 and all(c.audio.dtype == np.float32 for c in chunks)
        assert all(c.sample_rate == 16000 for c in chunks)
        first_units = next(i for i, e in enumerate(mine) if isinstance(e, Units))
        assert first_units < mine.index(chunks[0])
    answer = collect(events, 2)[0]
    assert answer.first_text_ms <= answer.first_audio_ms <= answer.total_ms
    assert answer.lagging_words is not None and answer.audio_seconds > 0


def test_text_only_and_units_without_vocoder(tiny_omni):
    audio = tone(1.0, 220)
    text_only = engine(tiny_omni, speech=False).answer([audio])[0]
    units_only = engine(tiny_omni).answer([audio])[0]
    assert text_only.token_ids == units_only.token_ids
    assert text_only.units == [] and units_only.units and not units_only.chunks


def test_conversation_equals_the_full_prompt_built_from_scratch(tiny_omni):
    first, second = tone(0.8, 220), tone(0.6, 440, seed=1)
    conversation = Conversation(engine(tiny_omni))
    answers = [collect(conversation.ask(a), 1)[0] for a in (first, second)]
    first_prompt = tiny_omni.prompt_ids([Turn.user()])
    assert conversation.reused >= len(first_prompt)  # the first turn came from the cache
    speech = tiny_omni.encode_speech([first, second])
    turns = [Turn.user(), Turn.assistant(conversation.exchanges[0].answer), Turn.user()]
    prompt = tiny_omni.prompt_ids(turns)
    ids, units = naive_greedy(tiny_omni, prompt, speech, 12)
    assert answers[1].token_ids == ids
    assert answers[1].units == units
    assert answers[1].token_ids != answers[0].token_ids


def test_conversation_drops_the_oldest_turns_at_the_context_limit(tiny_omni):
    eng = engine(tiny_omni, max_new_tokens=6, speech=False)
    conversation = Conversation(eng)
    for hz in (220, 330):
        collect(conversation.ask(tone(0.5, hz)), 1)
    first, second = conversation.exchanges
    third = tone(0.5, 440)
    speech = eng.encode([third])[0]
    conversation.exchanges = [second]
    ids, segments = conversation.prompt(speech)
    conversation.exchanges = [first, second]
    # Room for the last exchange and the new turn, not for both exchanges.
    conversation.max_context = prompt_length(ids, segments) + 6
    collect(conversation.ask(third), 1)
    assert [e.uid for e in conversation.exchanges] == [second.uid, 2]
    expected, _ = naive_greedy(tiny_omni, ids, segments, 6)
    answer = tiny_omni.llm.tokenizer.decode(expected, skip_special_tokens=True)
    assert conversation.exchanges[-1].answer == answer
    with pytest.raises(ValueError, match="context limit"):
        collect(Conversation(eng, max_context=20).ask(third), 1)


def test_bad_audio_is_refused_with_clear_messages(tiny_omni):
    eng = engine(tiny_omni)
    with pytest.raises(AudioError, match="is empty"):
        eng.encode([np.zeros(0, np.float32)])
    with pytest.raises(AudioError, match="at most 30 s"):
        eng.encode([np.zeros(16000 * 31, np.float32)])
    with pytest.raises(AudioError, match="too short"):
        eng.encode([np.zeros(800, np.float32)])
    with pytest.raises(AudioError, match="mono"):
        eng.encode([np.zeros((2, 16000), np.float32)])


def test_token_input_decoder_streams_like_offline_and_reads_the_tokens(tiny_omni, tiny_vocoder):
    """With token_input the decoder also reads each token's embedding: the engine must feed
    the sampled tokens exactly as teacher forcing feeds the reference tokens."""
    width = tiny_omni.config.llm.hidden_size
    decoder, kept = tiny_omni.speech_decoder.reconfigured(token_input=True, input_width=2 * width)
    assert kept
    with torch.no_grad():
        torch.manual_seed(3)
        new_columns = decoder.input_proj.weight[:, width:]  # [D, width], zero so far
        new_columns.copy_(torch.randn(new_columns.shape))
    config = tiny_omni.config.replace(speech_decoder=decoder.config)
    parts = tiny_omni.encoder, tiny_omni.llm, tiny_omni.adaptor, decoder.eval()
    model = OmniModel(config, *parts).eval()
    audio = tone(1.0, 220)
    answers = {
        omega: engine(model, tiny_vocoder, chunk_size=omega, max_new_tokens=20).answer([audio])[0]
        for omega in (10, None)
    }
    reference = offline_units(model, audio, answers[None].token_ids)
    assert answers[10].units == answers[None].units == reference
    assert reference != offline_units(tiny_omni, audio, answers[None].token_ids)


def test_lookahead_decoder_streams_like_offline_when_requests_end_at_different_steps(
    tiny_omni, tiny_vocoder
):
    """With lookahead a token's units wait for the next token; a request that ends while
    the others go on must still get its last token's units, as offline decoding does."""
    decoder, kept = tiny_omni.speech_decoder.reconfigured(lookahead=True)
    assert kept
    with torch.no_grad():
        torch.manual_seed(4)
        decoder.lookahead_proj.weight.normal_(std=0.2)  # zero so far
    config = tiny_omni.config.replace(speech_decoder=decoder.config)
    model = OmniModel(config, tiny_omni.encoder, tiny_omni.llm, tiny_omni.adaptor, decoder.eval())
    audios = [tone(1.0, 220), tone(0.6, 440, seed=1), tone(1.3, 330, seed=2)]
    alone = [engine(model, tiny_vocoder).answer([a])[0] for a in audios]
    at1 = first_unique_token(alone, 1, start=2)
    model = with_stop_ids(model, (alone[1].token_ids[at1],))
    runs = {
        (omega, mode): engine(model, tiny_vocoder, chunk_size=omega, decoder_mode=mode)
        .answer(audios)
        for omega, mode in [(10, "incremental"), (None, "incremental"), (10, "recompute")]
    }
    for b, audio in enumerate(audios):
        reference = runs[None, "incremental"][b]
        offline = offline_units(model, audio, reference.token_ids)
        assert offline != offline_units(tiny_omni, audio, reference.token_ids)  # it reads ahead
        for answer in (r[b] for r in runs.values()):
            assert answer.token_ids == reference.token_ids
            assert answer.units == offline
    assert len(runs[None, "incremental"][1].token_ids) == at1 + 1 < 12  # ended early
