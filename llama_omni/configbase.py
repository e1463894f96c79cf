"""Typed, validated component configs that round-trip through JSON.

Every component (encoder, adaptor, LLM, speech decoder, vocoder) has one dataclass
deriving from `ConfigBase`. Validation lives in `__post_init__` (raise ValueError
naming the field and what to do); `to_dict`/`from_dict` are what checkpoints store,
so a config read back from disk is validated exactly like one built in code.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Self


class ConfigBase:
    """Mixin for dataclass configs: JSON round trip with unknown-key errors."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _config_class(hints.get(name))
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif isinstance(value, list) and _is_tuple(hints.get(name)):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _config_class(hint: Any) -> type[ConfigBase] | None:
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, ConfigBase):
            return c
    return None


def _is_tuple(hint: Any) -> bool:
    candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(typing.get_origin(c) is tuple or c is tuple for c in candidates)


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds: one line per validation rule."""
    if not condition:
        raise ValueError(message)
