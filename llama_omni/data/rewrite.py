"""Step 1: written instruction -> spoken-style instruction (paper section 3.1).

`LLMRewriter` asks an LLM (prompts/rewrite.txt) under the reply policy of prompting.py and
checks that the rewrite still asks the same thing (content words kept, not an answer, not
bloated). When the LLM output is unusable after its retries, the `RuleRewriter` takes
over: numbers and symbols spelled out, markup removed, a filler or two added.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llama_omni.configbase import ConfigBase, require
from llama_omni.data.llm_backends import ChatBackend
from llama_omni.data.normalize import normalize_for_tts
from llama_omni.data.prompting import PromptTemplate, ask
from llama_omni.data.sources import Instruction

LEADING_FILLERS = ("So", "Hey", "Um", "Uh", "Okay so", "Hey so", "So um")
INNER_FILLERS = ("uh", "um", "like")
FILLER_WORDS = frozenset({"so", "hey", "um", "uh", "like", "okay", "well"})
_STOP = frozenset("the a an and or but of to in on at for with from by about as is are was were "
                  "be can could would should will you your me my i it this that what how".split())
_ANSWER_START = re.compile(
    r"^(?:sure|certainly|of course|here (?:is|are)|yes|no|as an ai|i'm|i am)\b", re.IGNORECASE)
_QUESTION_START = re.compile(r"^(?:who|what|when|where|why|how|which|can|could|would|should|"
                             r"is|are|do|does|did|will|have|has)\b", re.IGNORECASE)


@dataclass
class RewriteConfig(ConfigBase):
    """method "llm" (with rule fallback) or "rules"; prompt: packaged name or file path."""

    method: str = "llm"
    prompt: str = "rewrite"
    retries: int = 1
    max_new_tokens: int = 96
    min_overlap: float = 0.6
    filler_prob: float = 0.6

    def __post_init__(self) -> None:
        require(self.method in ("llm", "rules"),
                f"rewrite.method {self.method!r}: 'llm' or 'rules'")
        require(self.retries >= 0, "rewrite.retries must be >= 0")
        require(0 <= self.min_overlap <= 1, "rewrite.min_overlap must be in [0, 1]")
        require(0 <= self.filler_prob <= 1, "rewrite.filler_prob must be in [0, 1]")


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) > 2 and w not in _STOP}


def _lower_first(text: str) -> str:
    """Lower-case the first letter, unless the first word is "I" or an acronym ("NASA")."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[1:].islower():
        return text[0].lower() + text[1:]
    return text


class RuleRewriter:
    """Deterministic spoken-style rewrite: the same (seed, id) always gives the same text."""

    def __init__(self, seed: int = 0, filler_prob: float = 0.6, inner_prob: float = 0.25):
        self.seed, self.filler_prob, self.inner_prob = seed, filler_prob, inner_prob

    def __call__(self, item_id: str, text: str) -> str:
        rng = random.Random(f"{self.seed}:{item_id}")
        spoken = normalize_for_tts(text)
        if not re.search(r"[.!?]$", spoken):
            spoken += "?" if _QUESTION_START.match(spoken) else "."
        words = spoken.split(" ")
        if len(words) > 8 and rng.random() < self.inner_prob:
            at = rng.randrange(3, min(len(words) - 2, 8))
            if not re.search(r"[,.;:!?]$", words[at - 1]):
                words.insert(at, f"{rng.choice(INNER_FILLERS)},")
                words[at - 1] += ","
        spoken = " ".join(words)
        if rng.random() < self.filler_prob:
            spoken = f"{rng.choice(LEADING_FILLERS)}, {_lower_first(spoken)}"
        return spoken


class LLMRewriter:
    """Batched LLM rewriting with the reply policy; falls back to `rules` per item."""

    def __init__(self, backend: ChatBackend, config: RewriteConfig, rules: RuleRewriter,
                 temperature: float = 0.0):
        self.backend, self.config, self.rules = backend, config, rules
        self.template = PromptTemplate.load(config.prompt)
        self.temperature = temperature

    def check(self, original: str, rewritten: str) -> str | None:
        """Why `rewritten` is not a faithful spoken version of `original`, or None."""
        spoken = normalize_for_tts(rewritten)
        words = spoken.split()
        wanted = content_words(normalize_for_tts(original))
        if wanted and len(wanted & content_words(spoken)) / len(wanted) < self.config.min_overlap:
            return "meaning_lost"
        if _ANSWER_START.match(spoken) and not _ANSWER_START.match(normalize_for_tts(original)):
            return "answered"  # the model replied to the request instead of rewording it
        if len(words) > 1.5 * len(original.split()) + 6:  # an answer, not a rewrite
            return "too_long"
        if sum(w.strip(",.?!").lower() in FILLER_WORDS for w in words) > 4:
            return "too_many_fillers"
        return None

    def __call__(self, items: list[Instruction]) -> list[dict]:
        conversations = [self.template.render(instruction=item.text) for item in items]
        outcomes = ask(self.backend, conversations, "instruction", retries=self.config.retries,
                       max_new_tokens=self.config.max_new_tokens, temperature=self.temperature,
                       check=lambda i, value: self.check(items[i].text, value))
        records = []
        for item, out in zip(items, outcomes):
            record = {"attempts": out.attempts, "rejected": out.history}
            if out.value is not None:
                record.update(text=normalize_for_tts(out.value), method=f"llm_{out.status}")
            else:
                record.update(text=self.rules(item.id, item.text), method="rules",
                              fallback_reason=out.reason, llm_reply=(out.last_reply or "")[:300])
            records.append(record)
        return records

