"""Streaming as one explicit idea: stateful modules keep their state in a small object.

A module that can run on a stream subclasses `StreamingModule[State]` and implements
`_init_streaming_state(batch_size)`. Inside `with module.streaming(batch_size):` the
module and every streaming child hold a fresh state (KV cache, left context, the last
CTC symbol, ...); outside the block they are stateless and process whole inputs. The
contract each streaming module is tested against: feeding the input chunk by chunk
gives the same output as feeding it whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

from torch import nn

State = TypeVar("State")


class StreamingModule(nn.Module, Generic[State]):
    _streaming_state: State | None = None

    def _init_streaming_state(self, batch_size: int) -> State:
        raise NotImplementedError

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    @property
    def streaming_state(self) -> State:
        if self._streaming_state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not streaming: call it inside `with module.streaming(batch_size):`"
            )
        return self._streaming_state

    def _streaming_modules(self) -> Iterator["StreamingModule"]:
        for module in self.modules():
            if isinstance(module, StreamingModule):
                yield module

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        """Give this module and all streaming children a fresh state for the block."""
        modules = list(self._streaming_modules())
        if any(m.is_streaming for m in modules):
            raise RuntimeError(f"{type(self).__name__} is already streaming; blocks do not nest")
        for module in modules:
            module._streaming_state = module._init_streaming_state(batch_size)
        try:
            yield
        finally:
            for module in modules:
                module._streaming_state = None

    def reset_streaming(self) -> None:
        """Start the stream over (same batch size) without leaving the `streaming` block."""
        for module in self._streaming_modules():
            if module._streaming_state is not None:
                module._streaming_state = module._init_streaming_state(
                    module._streaming_batch_size()
                )

    def _streaming_batch_size(self) -> int:
        return getattr(self._streaming_state, "batch_size")
