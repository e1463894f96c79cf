"""Multi-turn conversations: earlier turns stay in the prompt and in the KV cache.

Each `ask` builds the whole conversation's prompt (system, then every kept exchange as a
user turn holding its speech embeddings and an assistant turn holding the answer text,
then the new user turn) exactly as a from-scratch prompt would be built, and feeds the
LLM only what its KV cache does not already hold: the cache is cut back to the longest
common prefix of what it holds and the new prompt (the answer's re-tokenized text can
differ from the generated ids; the cache then keeps the part before the difference).

Truncation policy: a turn needs its prompt plus max_new_tokens positions within
`max_context` (default: the backbone's max_position_embeddings). When the conversation
does not fit, the oldest whole exchanges (user speech + assistant answer) are dropped,
one at a time, until it does; the system prompt and the new turn are always kept. The
prefix then changes, so the cache is cut back to the system prompt and the rest is
prefilled again. A new turn that does not fit even alone is refused with an error.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from llama_omni.inference.engine import Decoded, Engine
from llama_omni.inference.events import Clock, Event
from llama_omni.model.prompt import SPEECH_TOKEN_INDEX, Turn

PositionKey = int | tuple[int, int]  # a token id, or (speech uid, frame) for a speech position


@dataclass
class Exchange:
    """One finished turn: the user's speech embeddings and the assistant's answer text."""

    uid: int
    speech: torch.Tensor  # [N, D]
    answer: str


class Conversation:
    def __init__(self, engine: Engine, max_context: int | None = None):
        self.engine = engine
        backbone = engine.model.llm.model.config.get_text_config()
        self.max_context = max_context or backbone.max_position_embeddings
        self.exchanges: list[Exchange] = []
        self._uids = itertools.count()
        self._cache = None
        self._cached: list[PositionKey] = []  # what each cached position holds
        self.reused = 0  # positions the last turn took from the cache instead of prefilling

    def reset(self) -> None:
        """Forget every turn and the cache."""
        self.exchanges, self._cache, self._cached, self.reused = [], None, [], 0

    def prompt(self, speech: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """(prompt ids, speech segments) of the kept exchanges followed by a new user turn."""
        turns: list[Turn] = []
        for exchange in self.exchanges:
            turns += [Turn.user(), Turn.assistant(exchange.answer)]
        turns.append(Turn.user())
        segments = [e.speech for e in self.exchanges] + [speech]
        return self.engine.model.prompt_ids(turns), segments

    def ask(self, audio: np.ndarray, clock: Clock | None = None) -> Generator[Event, None, Decoded]:
        """Answer the next spoken turn; events as in Engine.stream (request 0)."""
        clock = clock or Clock()
        speech = self.engine.encode([audio])[0]  # [N, D]
        uid = next(self._uids)
        ids, segments = self._fit(speech)
        keys = position_keys(ids, [e.uid for e in self.exchanges] + [uid], segments)
        # Keep at least one position to feed: its output chooses the first answer token.
        keep = min(common_prefix(self._cached, keys), len(keys) - 1)
        cache = self._cut_cache(keep)
        self.reused = keep if cache is not None else 0
        llm = self.engine.model.llm
        embeds, mask, _ = llm.embed_prompt([ids], segments)  # [1, L, D], [1, L]
        positions = torch.arange(keep, len(keys), device=mask.device)[None]  # [1, L - keep]
        decoded = yield from self.engine.decode(embeds[:, keep:], mask, positions, clock, cache)
        answer_ids = decoded.token_ids[0]
        text = llm.tokenizer.decode(answer_ids, skip_special_tokens=True)
        self.exchanges.append(Exchange(uid, speech, text))
        self._cache, self._cached = decoded.cache, keys + answer_ids[:-1]
        return decoded

    def _fit(self, speech: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """Drop the oldest exchanges until prompt + max_new_tokens fits (module doc)."""
        budget = self.max_context - self.engine.options.max_new_tokens
        while True:
            ids, segments = self.prompt(speech)
            length = prompt_length(ids, segments)
            if length <= budget:
                return ids, segments
            if not self.exchanges:
                raise ValueError(
                    f"this turn needs {length} prompt positions + max_new_tokens "
                    f"{self.engine.options.max_new_tokens}, more than the context limit "
                    f"{self.max_context}; use shorter audio or fewer max_new_tokens"
                )
            self.exchanges.pop(0)

    @torch.inference_mode()
    def _cut_cache(self, keep: int):
        """The cache holding only the first `keep` positions (None when keep is 0)."""
        if keep == 0 or self._cache is None:
            return None
        self._cache.crop(keep - self._cache.get_seq_length())  # a negative count removes
        return self._cache


def prompt_length(ids: list[int], segments: list[torch.Tensor]) -> int:
    """Positions a prompt takes once each speech slot holds its segment."""
    slots = ids.count(SPEECH_TOKEN_INDEX)
    return len(ids) - slots + sum(s.shape[0] for s in segments)


def position_keys(
    ids: list[int], uids: list[int], segments: list[torch.Tensor]
) -> list[PositionKey]:
    """What each position of a spliced prompt holds: token ids, speech frames by uid.

    Two prompts share cached positions exactly as far as their keys agree.
    """
    keys: list[PositionKey] = []
    slots = iter(zip(uids, segments, strict=True))
    for token in ids:
        if token == SPEECH_TOKEN_INDEX:
            uid, segment = next(slots)
            keys += [(uid, frame) for frame in range(segment.shape[0])]
        else:
            keys.append(token)
    return keys


def common_prefix(a: list[PositionKey], b: list[PositionKey]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
