"""Typed reads of adapter_config.json fields: each bad value is refused with the field named."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from slserve.adapters.weights import CONFIG_FILE, AdapterError, adapter_error

_MISSING = object()


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    # An int beyond float range would turn into an infinite scale (and math.isfinite raises on it).
    if is_int(x):
        return abs(x) < 2**1023
    return isinstance(x, float) and math.isfinite(x)


class ConfigFields:
    """One adapter's config. A field that is absent takes its default; one present must be valid."""

    def __init__(self, config: dict, name: str) -> None:
        self.config = config
        self.name = name

    def bad(self, reason: str) -> AdapterError:
        return adapter_error(self.name, f"{CONFIG_FILE}: {reason}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def positive_int(self, key: str, default: int | None) -> int:
        value = self.config.get(key, default)
        if not is_int(value) or value < 1:
            raise self.bad(f"{key} must be a positive integer, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.config.get(key, default)
        if not is_number(value):
            raise self.bad(f"{key} must be a finite number, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if not isinstance(value, bool):
            raise self.bad(f"{key} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.config.get(key, default)
        if value not in options:
            listed = ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}"
            raise self.bad(f"{key} must be {listed}, got {value!r}")
        return value

    def equal(self, key: str, expected: Any, why: str) -> None:
        """Refuse a present field whose value is not `expected` (absent is fine); `why` says whose
        value `expected` is, e.g. "the base model's layer count is"."""
        value = self.config.get(key, _MISSING)
        if value is not _MISSING and value != expected:
            raise self.bad(f"{key} is {value!r}, but {why} {expected!r}")

    def str_or_list(self, key: str, required: bool) -> str | list[str] | None:
        value = self.config.get(key)
        if value is None and not required:
            return None
        if isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        ):
            self.regexes(value)
            return value
        raise self.bad(f"{key} must be a regex string or a non-empty list of module names, got {value!r}")

    def int_or_ints(self, key: str) -> int | list[int] | None:
        value = self.config.get(key)
        if not (value is None or is_int(value) or (isinstance(value, list) and all(map(is_int, value)))):
            raise self.bad(f"{key} must be an integer or a list of them, got {value!r}")
        return value

    def pattern(self, key: str, valid_value: Callable[[Any], bool]) -> dict:
        """A {regex: value} object such as rank_pattern; absent or null is empty."""
        pattern = self.config.get(key) or {}
        if not isinstance(pattern, dict):
            raise self.bad(f"{key} must be an object, got {pattern!r}")
        for k, v in pattern.items():
            if not valid_value(v):
                raise self.bad(f"{key}[{k!r}] has an invalid value {v!r}")
            self.regexes(k)
        return pattern

    def regexes(self, patterns: str | Iterable[str] | None) -> None:
        for p in [patterns] if isinstance(patterns, str) else patterns or ():
            try:
                re.compile(p)
            except re.error as e:
                raise self.bad(f"invalid regular expression {p!r}: {e}") from None
