"""Runtime options, scoped by a context variable (never fixed at import time)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import attrs

__all__ = ["Options", "get_options", "options"]


def _bool(inst: object, attribute: attrs.Attribute, value: object) -> None:
    # MemcoreError, not attrs' TypeError: every bad input raises the one error family.
    if not isinstance(value, bool):
        from memcore.errors import MemcoreError

        raise MemcoreError(
            f"`{attribute.name}` must be a bool. Received: {attribute.name}={value!r}"
        )


@attrs.frozen
class Options:
    """Process-wide defaults that a ``with memcore.options(...)`` block can override.

    Attributes:
        check_finite: reject NaN or Inf in any float input with a ``MemcoreError``.
            On by default; turning it off saves one pass over every input.
    """

    check_finite: bool = attrs.field(default=True, validator=_bool)


_current: contextvars.ContextVar[Options] = contextvars.ContextVar("memcore_options", default=Options())


def get_options() -> Options:
    """The options in force in this context."""
    return _current.get()


@contextlib.contextmanager
def options(**changes: object) -> Iterator[Options]:
    """Override options inside a ``with`` block, e.g. ``with memcore.options(check_finite=False):``."""
    unknown = sorted(set(changes) - {f.name for f in attrs.fields(Options)})
    if unknown:
        from memcore.errors import MemcoreError

        known = ", ".join(f.name for f in attrs.fields(Options))
        raise MemcoreError(f"Unknown option(s) {unknown}. Available: {known}")
    token = _current.set(attrs.evolve(_current.get(), **changes))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
