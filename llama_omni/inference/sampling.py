"""Token selection as small pieces: logit filters, then a greedy or a seeded sampling choice.

`TokenSelector` turns the last logits of a batch into one token per row. Greedy is the
reproducible default (the paper evaluates with it); sampling applies a temperature and a
nucleus (top-p) filter and draws with one seeded generator per request, so a request
samples the same tokens alone or inside a batch. An optional repetition penalty (as in
CTRL) makes the tokens a row has already produced less likely, greedy or sampled: small
backbones otherwise tend to repeat a phrase until the token limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from llama_omni.configbase import require


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_p 1 disables the nucleus filter; repetition_penalty
    1 disables the penalty on tokens the answer already holds, None takes the model's own
    (`LLMConfig.repetition_penalty`, see `for_model`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
        )
        require(0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}")
        require(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        require(
            self.repetition_penalty is None
            or (math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 1),
            f"repetition_penalty must be >= 1 (1 = off), got {self.repetition_penalty}",
        )

    def for_model(self, model_penalty: float) -> SamplingOptions:
        """These options with the model's repetition penalty where none was chosen."""
        if self.repetition_penalty is not None:
            return self
        return replace(self, repetition_penalty=model_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, V] logits scaled by 1 / temperature, in float32."""
    return logits.float() / temperature


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """[B, V] logits with the `seen` [B, V] tokens made less likely: positive logits divided
    by `penalty`, negative ones multiplied by it (CTRL's rule), in float32."""
    logits = logits.float()
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p; others get -inf.

    The most likely token always stays, so the filter never empties a row.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


class TokenSelector:
    """Greedy or sampled choice of the next token for each row of a batch."""

    def __init__(self, options: SamplingOptions, batch_size: int, device: torch.device | str):
        if options.repetition_penalty is None:
            raise ValueError("resolve the repetition penalty first: options.for_model(...)")
        self.options = options
        self.seen: torch.Tensor | None = None  # [B, V] tokens each row produced, if penalized
        self.generators: list[torch.Generator] = []
        if not options.greedy:
            for _ in range(batch_size):
                generator = torch.Generator(device=device)
                generator.manual_seed(options.seed)
                self.generators.append(generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits -> [B] token ids (long)."""
        if self.options.repetition_penalty == 1:
            return self._choose(logits)
        if self.seen is None:
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        if self.seen.shape != logits.shape:
            raise ValueError(f"the selector saw logits of shape {tuple(self.seen.shape)}, "
                             f"now {tuple(logits.shape)}")
        tokens = self._choose(penalize_repeats(logits, self.seen, self.options.repetition_penalty))
        self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.options.greedy:
            return logits.argmax(dim=-1)
        if logits.shape[0] != len(self.generators):
            raise ValueError(
                f"the selector was built for {len(self.generators)} rows, got {logits.shape[0]}"
            )
        scaled = top_p_filter(
            apply_temperature(logits, self.options.temperature), self.options.top_p
        )
        probs = scaled.softmax(dim=-1)  # [B, V]
        picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)]
        return torch.cat(picks)  # [B]
