"""Prompt templates (editable text files) and the JSON reply policy shared by the LLM steps.

Reply policy, in order:
1. strict: the whole reply (optionally inside one ``` fence) is a JSON object whose `key`
   holds a non-empty string;
2. repair: otherwise the first JSON object embedded in the reply that has `key` is taken
   (prose around it is dropped; nothing inside it is guessed or rewritten);
3. retry: otherwise, or when the value fails the caller's check, the model is asked again
   up to `retries` times, shown its previous reply and what was wrong with it;
4. give up: the outcome keeps the last reason and raw reply, so the caller can fall back
   (rule-based rewriting, or the cleaned raw text of a response).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llama_omni.data.llm_backends import ChatBackend, LLMError, Messages

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
ROLES = ("system", "user", "assistant")
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


@dataclass(frozen=True)
class PromptTemplate:
    """Messages with $placeholders, read from a file of [system]/[user]/[assistant] sections."""

    name: str
    messages: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls, name_or_path: str | Path) -> PromptTemplate:
        """A packaged prompt by name ("rewrite", "respond", ...) or a path to a .txt file."""
        path = Path(name_or_path)
        if not path.is_file():
            path = PROMPTS_DIR / f"{name_or_path}.txt"
        if not path.is_file():
            packaged = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
            raise FileNotFoundError(f"prompt {name_or_path!r} not found: give a file path or one "
                                    f"of the packaged prompts {packaged}")
        return cls.parse(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def parse(cls, text: str, name: str = "<prompt>") -> PromptTemplate:
        messages: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            header = re.fullmatch(r"\[(\w+)\]\s*", line)
            if header:
                if header.group(1) not in ROLES:
                    raise ValueError(f"{name}: unknown section [{header.group(1)}]; use {ROLES}")
                messages.append((header.group(1), []))
            elif line.startswith("#"):
                continue  # comment
            elif messages:
                messages[-1][1].append(line)
            elif line.strip():
                raise ValueError(f"{name}: text before the first [system]/[user] section")
        if not messages or messages[-1][0] != "user":
            raise ValueError(f"{name}: the last section must be [user]")
        return cls(name, tuple((role, "\n".join(lines).strip()) for role, lines in messages))

    def render(self, **values: str) -> Messages:
        try:
            return [{"role": role, "content": string.Template(text).substitute(values)}
                    for role, text in self.messages]
        except KeyError as err:
            raise ValueError(f"{self.name}: no value for placeholder ${err.args[0]} "
                             f"(given: {sorted(values)})") from None
        except ValueError as err:
            raise ValueError(f"{self.name}: {err} (write a literal dollar sign as $$)") from None


class ReplyError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_json_reply(reply: str, key: str) -> tuple[str, bool]:
    """(value of `key`, whether the repair step was needed); ReplyError(reason) otherwise."""
    body = reply.strip()
    if not body:
        raise ReplyError("empty_reply")
    fenced = _FENCE_RE.fullmatch(body)
    try:
        obj, repaired = json.loads(fenced.group(1) if fenced else body), False
    except json.JSONDecodeError:
        obj, repaired = _embedded_object(body, key), True
    if not isinstance(obj, dict):
        raise ReplyError("not_object")
    if key not in obj:
        raise ReplyError("missing_key")
    value = obj[key]
    if not isinstance(value, str):
        raise ReplyError("not_string")
    if not value.strip():
        raise ReplyError("empty_value")
    return value.strip(), repaired


def _embedded_object(text: str, key: str) -> dict:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and key in obj:
            return obj
    raise ReplyError("not_json")


@dataclass
class Outcome:
    """What the reply policy got for one conversation."""

    value: str | None = None
    status: str = "failed"  # "json" | "repaired" | "text" | "failed"
    attempts: int = 0
    reason: str | None = None  # why the last attempt was not accepted
    last_reply: str | None = None
    history: list[str] = field(default_factory=list)  # reasons of rejected attempts


def ask(backend: ChatBackend, conversations: list[Messages], key: str | None, *,
        retries: int, max_new_tokens: int, temperature: float = 0.0,
        check: Callable[[int, str], str | None] = lambda index, value: None) -> list[Outcome]:
    """Run the reply policy (module docstring) on a batch; key None takes the reply as text.

    check(index, value) returns why the value of conversation `index` is unusable, or None.
    """
    outcomes = [Outcome() for _ in conversations]
    pending = {i: list(c) for i, c in enumerate(conversations)}
    for _ in range(retries + 1):
        if not pending:
            break
        ids = list(pending)
        replies = backend.chat([pending[i] for i in ids], max_new_tokens, temperature)
        for i, reply in zip(ids, replies):
            out = outcomes[i]
            out.attempts += 1
            if isinstance(reply, LLMError):
                out.reason = f"llm_{reply.reason}"  # the backend already retried transport errors
                del pending[i]
                continue
            out.last_reply = reply
            try:
                if key is None:
                    value, status = reply.strip(), "text"
                    if not value:
                        raise ReplyError("empty_reply")
                else:
                    value, repaired = parse_json_reply(reply, key)
                    status = "repaired" if repaired else "json"
                problem = check(i, value)
                if problem:
                    raise ReplyError(problem)
            except ReplyError as err:
                out.reason = err.reason
                out.history.append(err.reason)
                again = _retry_request(key, err.reason)
                pending[i] = pending[i] + [{"role": "assistant", "content": reply},
                                           {"role": "user", "content": again}]
                continue
            out.value, out.status, out.reason = value, status, None
            del pending[i]
    return outcomes


def _retry_request(key: str | None, reason: str) -> str:
    problem = reason.replace("_", " ")
    if key is None:
        return f"That answer cannot be used ({problem}). Answer again, following the rules."
    return (f"That reply cannot be used ({problem}). Reply again with only the JSON object "
            f'{{"{key}": "..."}}, following the rules.')
