"""Text side of the data pipeline: TTS normalization, JSON reply policy, rewriting, responses."""

import pytest

from llama_omni.data.llm_backends import ChatBackend, LLMError
from llama_omni.data.normalize import normalize_for_tts, number_to_words, unreadable
from llama_omni.data.prompting import PromptTemplate, ReplyError, ask, parse_json_reply
from llama_omni.data.respond import LLMResponder, RespondConfig, fit_sentences
from llama_omni.data.rewrite import LLMRewriter, RewriteConfig, RuleRewriter
from llama_omni.data.sources import Instruction


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (105, "one hundred five"),
    (1234, "one thousand two hundred thirty four"), (2_000_000, "two million"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("text,spoken", [
    ("I paid $1,234.50 (25% off).", "I paid one thousand two hundred thirty four dollars and "
     "fifty cents, twenty five percent off."),
    ("Born in 1984, 1st in class", "Born in nineteen eighty four, first in class"),
    ("Meet at 3:30 & bring 2/3 cup", "Meet at three thirty and bring two thirds cup"),
    ("**Tips:**\n1. Sleep\n2. Eat", "Tips: Sleep. Eat"),
    ("See [the docs](http://x.y) or https://a.b/c", "See the docs or a link"),
    ("3.14 * 2 = 6.28", "three point one four times two equals six point two eight"),
    ("From 2013-2014 on", "From twenty thirteen to twenty fourteen on"),
    ("Code 12345678901234567", "Code one two three four five six seven eight nine zero one two "
     "three four five six seven"),
])
def test_normalize_for_tts(text, spoken):
    out = normalize_for_tts(text)
    assert out == spoken and unreadable(out) is None


@pytest.mark.parametrize("reply,value,repaired", [
    ('{"instruction": "hey, so what time is it?"}', "hey, so what time is it?", False),
    ('```json\n{"instruction": "what time is it"}\n```', "what time is it", False),
    ('Sure! Here it is: {"instruction": "um, what time is it"} Hope it helps.',
     "um, what time is it", True),
])
def test_json_reply_strict_and_repaired(reply, value, repaired):
    assert parse_json_reply(reply, "instruction") == (value, repaired)


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"),
    ("What time is it?", "not_json"),
    ('{"instruction": "what time', "not_json"),  # cut off by the token limit
    ("[1, 2]", "not_object"),
    ('{"response": "x"}', "missing_key"),
    ('{"instruction": 3}', "not_string"),
    ('{"instruction": "  "}', "empty_value"),
    ("{'instruction': 'single quotes are not JSON'}", "not_json"),
])
def test_json_reply_malformed(reply, reason):
    with pytest.raises(ReplyError) as err:
        parse_json_reply(reply, "instruction")
    assert err.value.reason == reason


class Scripted(ChatBackend):
    """Replies from a script, one list per round; records what it was asked."""

    def __init__(self, *rounds):
        self.rounds, self.seen = list(rounds), []

    def chat(self, conversations, max_new_tokens, temperature=0.0):
        self.seen.append(conversations)
        return self.rounds.pop(0)[: len(conversations)]


def test_retry_shows_the_model_its_bad_reply():
    backend = Scripted(["not json", '{"instruction": "ok"}'], ['{"instruction": "fixed"}'])
    outcomes = ask(backend, [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                   "instruction", retries=1, max_new_tokens=8)
    assert [(o.value, o.status, o.attempts) for o in outcomes] == [("fixed", "json", 2),
                                                                  ("ok", "json", 1)]
    retry = backend.seen[1][0]
    assert retry[1] == {"role": "assistant", "content": "not json"} and "not json" in retry[2]["content"]


def test_transport_errors_are_not_retried_by_the_policy():
    backend = Scripted([LLMError("timeout", "slow")])
    (out,) = ask(backend, [[{"role": "user", "content": "a"}]], "x", retries=3, max_new_tokens=8)
    assert out.value is None and out.reason == "llm_timeout" and out.attempts == 1


def test_rewriter_falls_back_to_rules_when_the_llm_fails():
    items = [Instruction("a", "t", "Give me 3 tips for better sleep."),
             Instruction("b", "t", "Name 2 famous painters.")]
    backend = Scripted(['{"instruction": "So, give me three tips for better sleep."}',
                        "Sure! Picasso and Monet."])  # item b: an answer, not a rewrite
    rules = RuleRewriter(seed=0)
    records = LLMRewriter(backend, RewriteConfig(retries=0), rules)(items)
    assert records[0]["method"] == "llm_json"
    assert records[0]["text"] == "So, give me three tips for better sleep."
    assert records[1]["method"] == "rules" and records[1]["fallback_reason"] == "not_json"
    assert records[1]["text"] == rules("b", "Name 2 famous painters.")


def test_rewriter_rejects_unfaithful_rewrites():
    rewriter = LLMRewriter(Scripted(), RewriteConfig(), RuleRewriter())
    original = "What are the health benefits of green tea?"
    assert rewriter.check(original, "Um, so what are the health benefits of green tea?") is None
    assert rewriter.check(original, "Green tea is a drink from China.") == "meaning_lost"
    assert rewriter.check(original, "Sure, here are the health benefits of green tea.") == "answered"


def test_rule_rewriter_is_seeded_and_spoken():
    rules = RuleRewriter(seed=1, filler_prob=1.0)
    text = rules("x", "Give me 5 tips (quick ones) for 2024")
    assert text == rules("x", "Give me 5 tips (quick ones) for 2024")
    assert unreadable(text) is None and "five" in text and "twenty twenty four" in text
    assert text.split(",")[0] in {"So", "Hey", "Um", "Uh", "Okay so", "Hey so", "So um"}


def test_responder_json_raw_text_fallback_and_failures():
    backend = Scripted([
        '{"response": "The moon has no air. So it has no weather."}',
        "The moon is about 384,000 km away. It takes light over a second to get there.",
        "I'm here to help you " * 10,
    ])
    records = LLMResponder(backend, RespondConfig(retries=0))(["a", "b", "c"])
    assert records[0] == {"attempts": 1, "rejected": [], "ok": True, "method": "llm_json",
                          "text": "The moon has no air. So it has no weather."}
    assert records[1]["method"] == "raw_text" and "three hundred eighty four thousand" in records[1]["text"]
    assert records[2] == {"attempts": 1, "rejected": ["not_json"], "ok": False,
                          "reason": "response_repetitive", "llm_reply": ("I'm here to help you " * 10)}


def test_fit_sentences_drops_the_cut_off_tail():
    assert fit_sentences("One two. Three four five. Six", 4) == "One two."
    assert fit_sentences("cut off by the token limit", 10) == ""


def test_prompt_templates_render_and_validate(tmp_path):
    messages = PromptTemplate.load("rewrite").render(instruction="Cost in $?")
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "Cost in $?"}
    bad = tmp_path / "bad.txt"
    bad.write_text("[system]\nhi\n[user]\n$missing\n")
    with pytest.raises(ValueError, match=r"\$missing"):
        PromptTemplate.load(bad).render(instruction="x")
    with pytest.raises(FileNotFoundError, match="packaged prompts"):
        PromptTemplate.load("no-such-prompt")
