"""attrs validators for the training config: each raises a ``MemcoreError`` naming the key,
what it must be and what was received."""

from __future__ import annotations

import math
from typing import Any

import attrs

from memcore.errors import MemcoreError

__all__ = ["bool_", "int_min", "lengths", "one_of", "path_", "real", "to_tuple"]


def int_min(low: int):
    def check(inst: Any, a: attrs.Attribute, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MemcoreError(f"`{a.name}` must be an integer >= {low}. Received: {a.name}={v!r}")

    return check


def real(low: float, high: float = math.inf, *, low_open: bool = False):
    def check(inst: Any, a: attrs.Attribute, v: Any) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and v <= high
        if not ok:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise MemcoreError(
                f"`{a.name}` must be a real number in {left}{low}, {high}{right}. "
                f"Received: {a.name}={v!r}"
            )

    return check


def one_of(*choices: str):
    def check(inst: Any, a: attrs.Attribute, v: Any) -> None:
        if v not in choices:
            raise MemcoreError(
                f"`{a.name}` must be one of {', '.join(repr(c) for c in choices)}. "
                f"Received: {a.name}={v!r}"
            )

    return check


def bool_(inst: Any, a: attrs.Attribute, v: Any) -> None:
    if not isinstance(v, bool):
        raise MemcoreError(f"`{a.name}` must be true or false. Received: {a.name}={v!r}")


def lengths(inst: Any, a: attrs.Attribute, v: Any) -> None:
    ok = isinstance(v, tuple) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in v
    )
    if not ok:
        raise MemcoreError(f"`{a.name}` must be a list of integers >= 1. Received: {a.name}={v!r}")


def to_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def path_(inst: Any, a: attrs.Attribute, v: Any) -> None:
    if not isinstance(v, str) or not v or "\x00" in v:
        raise MemcoreError(
            f"`{a.name}` must be a non-empty folder path string. Received: {a.name}={v!r}"
        )
