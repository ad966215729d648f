"""One error family for every bad input memcore sees.

Messages follow one shape: what the argument must be, then what was received,
e.g. "`memory` must have shape (B, K, D) = (2, 8, 16). Received: memory.shape=(2, 16, 8)".
"""

from __future__ import annotations

__all__ = ["MemcoreError", "expect"]


class MemcoreError(ValueError):
    """Raised for every invalid input, config or backend choice.

    A subclass of ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """


def expect(condition: bool, argument: str, expected: str, received: str) -> None:
    """Raise ``MemcoreError`` unless ``condition`` holds.

    Args:
        condition: the check that must hold.
        argument: the argument's name, as the caller spelled it.
        expected: what the argument must be, e.g. "shape (B, K, D) = (2, 8, 16)".
        received: what was seen, e.g. "memory.shape=(2, 16, 8)".
    """
    if not condition:
        raise MemcoreError(f"`{argument}` must {expected}. Received: {received}")
