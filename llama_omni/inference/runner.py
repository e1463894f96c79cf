"""Where the LLM's decoding steps run: on a helper thread, overlapping the speech path.

While the helper thread computes token i+1, the engine's own thread turns token i's
state into units and audio. Torch releases the GIL inside its kernels, so on two free
cores the speech path costs little extra time. Results are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

import torch

from llama_omni.model.llm import LLMOutput


class StepRunner:
    """Runs LLM steps on one helper thread (overlap) or lazily in the caller's thread.

    Lazily: the step then runs when its result is asked for, after the speech path.
    """

    def __init__(self, overlap: bool):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llm-step") if overlap else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def submit(self, fn: Callable[..., LLMOutput], *args) -> Future | _Deferred:
        if self.pool is None:
            return _Deferred(fn, args)
        return self.pool.submit(_in_inference_mode, fn, *args)


@dataclass
class _Deferred:
    fn: Callable[..., LLMOutput]
    args: tuple

    def result(self) -> LLMOutput:
        return self.fn(*self.args)


def _in_inference_mode(fn: Callable[..., LLMOutput], *args) -> LLMOutput:
    with torch.inference_mode():  # a per-thread mode: the helper thread sets its own
        return fn(*args)
