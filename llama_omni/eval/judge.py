"""LLM judge: content and style scores (1-5) of an answer, through any OpenAI-compatible
chat endpoint (SPEC section 6).

The prompt is ours; it states the paper's rubric: content = how well the answer serves
the request, style = how well it suits being spoken. Speech answers are judged from their
ASR transcript; the judge sees the instruction as it was spoken.

Parsing policy (strict): the reply must be one JSON object, optionally inside a single
```/```json fence, with integer "content" and "style" from 1 to 5 (other keys are
ignored; strings, floats, booleans, out-of-range numbers, missing keys and any text
outside the object are malformed). A malformed reply is asked again once, with the
reason, at temperature 0; if it is still malformed, or the request fails, the item is
left unscored with the reason recorded, never guessed, and the report counts it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from llama_omni.data.llm_backends import LLMError, Messages, OpenAIChatBackend

JUDGE_SYSTEM = """You rate the replies of a voice assistant. A user asked something out loud; \
the assistant's reply will be heard, not read. Give two integer scores from 1 to 5.

content: does the reply serve the request? 5 = correct, relevant and helpful, it does \
what was asked; 3 = partly useful or with some errors or gaps; 1 = wrong, off-topic, \
empty or nonsense.

style: is the reply suited to being spoken? 5 = short and to the point, flowing \
conversational sentences, nothing a listener cannot follow (no lists, tables, markup, \
code, symbols or long runs of numbers); 3 = usable aloud but too long, stiff or with \
some written-only features; 1 = unusable as speech.

Reply with one JSON object and nothing else: {"content": <1-5>, "style": <1-5>}"""

_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
SCORE_KEYS = ("content", "style")


class JudgeParseError(ValueError):
    """A judge reply that does not follow the required JSON format."""


@dataclass(frozen=True)
class Judgement:
    content: int
    style: int


def judge_messages(instruction: str, answer: str) -> Messages:
    user = f"User's request (as spoken):\n{instruction}\n\nAssistant's reply:\n{answer or '(no reply)'}"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judgement(reply: str) -> Judgement:
    """The scores of one judge reply; JudgeParseError says why it is malformed."""
    text = reply.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise JudgeParseError(f"not a JSON object ({err.msg} at char {err.pos})") from None
    if not isinstance(data, dict):
        raise JudgeParseError(f"expected a JSON object, got {type(data).__name__}")
    scores = {}
    for key in SCORE_KEYS:
        value = data.get(key)
        if key not in data:
            raise JudgeParseError(f"missing key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise JudgeParseError(f"{key!r} must be an integer, got {value!r}")
        if not 1 <= value <= 5:
            raise JudgeParseError(f"{key!r} must be from 1 to 5, got {value}")
        scores[key] = value
    return Judgement(**scores)


class Judge:
    """Scores (instruction, answer) pairs; see the module doc for the malformed-reply policy.

    url: the endpoint's base URL (e.g. http://127.0.0.1:8000/v1); the API key, if any, is
    read from the environment variable `api_key_env`.
    """

    def __init__(self, url: str, model: str = "judge", *, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, timeout: float = 120.0, max_retries: int = 3,
                 reasks: int = 1, max_tokens: int = 64):
        self.client = OpenAIChatBackend(url, model, os.environ.get(api_key_env),
                                        concurrency=concurrency, timeout=timeout,
                                        max_retries=max_retries)
        self.url, self.model, self.reasks, self.max_tokens = url, model, reasks, max_tokens

    def score(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """Per pair {"content", "style"} or {"content": None, "style": None, "error"}."""
        conversations = [judge_messages(i, a) for i, a in pairs]
        results: list[dict | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))
        for attempt in range(self.reasks + 1):
            replies = self.client.chat([conversations[i] for i in pending], self.max_tokens, 0.0)
            retry = []
            for i, reply in zip(pending, replies):
                results[i], again = self._outcome(reply, conversations[i])
                if again and attempt < self.reasks:
                    retry.append(i)
            pending = retry
            if not pending:
                break
        return results  # type: ignore[return-value]

    @staticmethod
    def _outcome(reply: str | LLMError, conversation: Messages) -> tuple[dict, bool]:
        """(result, ask again?); a malformed reply is added to the conversation with the reason."""
        if isinstance(reply, LLMError):
            return {"content": None, "style": None, "error": f"request failed: {reply}"}, False
        try:
            judgement = parse_judgement(reply)
        except JudgeParseError as err:
            conversation += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"That reply was malformed ({err}). Answer with "
                                            'only {"content": <1-5>, "style": <1-5>}.'},
            ]
            return {"content": None, "style": None, "error": f"malformed: {err}",
                    "reply": reply[:300]}, True
        return {"content": judgement.content, "style": judgement.style}, False
