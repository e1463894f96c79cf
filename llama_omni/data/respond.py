"""Step 2: instruction -> concise spoken response (paper section 3.1).

The reply policy of prompting.py applies (key "response"; or plain text with a prompt
whose `json` is off). Accepted answers are normalized for TTS and cut after the last
whole sentence that fits `max_words`. When no reply passes after the retries, the last
raw reply, cleaned, is used if it passes the same checks ("raw_text"); otherwise the
item fails with the last reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_omni.configbase import ConfigBase, require
from llama_omni.data.llm_backends import ChatBackend
from llama_omni.data.normalize import normalize_for_tts
from llama_omni.data.prompting import PromptTemplate, ask

_JSON_PREFIX_RE = re.compile(r'^\s*\{?\s*"?response"?\s*:\s*"?', re.IGNORECASE)


@dataclass
class RespondConfig(ConfigBase):
    """input: answer the "rewritten" (spoken) or the "original" instruction."""

    prompt: str = "respond"
    json: bool = True
    input: str = "rewritten"
    retries: int = 1
    max_new_tokens: int = 160
    min_words: int = 3
    max_words: int = 90

    def __post_init__(self) -> None:
        require(self.input in ("rewritten", "original"),
                f"respond.input {self.input!r}: 'rewritten' or 'original'")
        require(self.retries >= 0, "respond.retries must be >= 0")
        require(0 < self.min_words <= self.max_words, "respond: need 0 < min_words <= max_words")


def fit_sentences(text: str, max_words: int) -> str:
    """The longest run of whole sentences from the start within max_words ('' if none fits).

    A trailing fragment without end punctuation (a reply cut by the token limit) is dropped.
    """
    sentences = re.findall(r"[^.!?]+[.!?]+", text)
    kept, count = [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if count + n > max_words:
            break
        kept.append(sentence.strip())
        count += n
    return " ".join(kept)


def repetitive(text: str) -> bool:
    """Small models loop; a reply whose word trigrams are mostly repeats is one such loop."""
    words = text.lower().split()
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(trigrams) >= 12 and len(set(trigrams)) / len(trigrams) < 0.6


class LLMResponder:
    def __init__(self, backend: ChatBackend, config: RespondConfig, temperature: float = 0.0):
        self.backend, self.config, self.temperature = backend, config, temperature
        self.template = PromptTemplate.load(config.prompt)

    def clean(self, reply: str) -> str:
        return fit_sentences(normalize_for_tts(reply), self.config.max_words)

    def check(self, reply: str) -> str | None:
        if repetitive(reply):
            return "repetitive"
        spoken = self.clean(reply)
        if not spoken:
            return "no_sentence_fits"
        if len(spoken.split()) < self.config.min_words:
            return "too_short"
        return None

    def __call__(self, instructions: list[str]) -> list[dict]:
        conversations = [self.template.render(instruction=text) for text in instructions]
        key = "response" if self.config.json else None
        outcomes = ask(self.backend, conversations, key, retries=self.config.retries,
                       max_new_tokens=self.config.max_new_tokens, temperature=self.temperature,
                       check=lambda i, value: self.check(value))
        records = []
        for out in outcomes:
            record = {"attempts": out.attempts, "rejected": out.history}
            if out.value is not None:
                record.update(ok=True, text=self.clean(out.value), method=f"llm_{out.status}")
            elif out.last_reply and not out.reason.startswith("llm_"):
                raw = _JSON_PREFIX_RE.sub("", out.last_reply).rstrip(' "}\n')
                problem = self.check(raw)
                if problem is None:
                    record.update(ok=True, text=self.clean(raw), method="raw_text",
                                  fallback_reason=out.reason)
                else:
                    record.update(ok=False, reason=f"response_{problem}",
                                  llm_reply=out.last_reply[:300])
            else:
                record.update(ok=False, reason=f"response_{out.reason}")
            records.append(record)
        return records
