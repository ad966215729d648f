"""Memory accounting: bytes of the caches and stored states a driver holds, from the arrays.

``held_bytes`` walks caches (NamedTuples), tuples, lists and dicts, and sums ``nbytes`` of
every distinct array buffer it finds. Arrays are told apart by (data address, nbytes), so a
slot matrix referenced by the read's and the write's cache, or two views of one buffer with
the same extent, count once. Parameters are excluded (every driver holds them alike, and
the caller owns them); gradient accumulators are not caches and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from memcore.reference._xp import nbytes

__all__ = ["PeakTracker", "buffer_key", "held_bytes"]


def buffer_key(x: Any) -> tuple[int, int]:
    """(data address, nbytes) of an array: NumPy, CuPy, or (fallback, e.g. an Array API
    array that exposes no address) the object's id."""
    iface = getattr(x, "__array_interface__", None)
    if iface is not None:
        return iface["data"][0], nbytes(x)
    data = getattr(x, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy's MemoryPointer
    return (int(ptr) if ptr is not None else id(x)), nbytes(x)


def _arrays(obj: Any, out: list[Any]) -> None:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _arrays(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _arrays(v, out)


def held_bytes(objects: Iterable[Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes of the distinct array buffers reachable from ``objects``, minus ``exclude``'s.

    Args:
        objects: caches, states and lists of them alive at one moment.
        exclude: objects whose arrays are not counted (the parameters).
    """
    skip: list[Any] = []
    _arrays(list(exclude), skip)
    seen = {buffer_key(a) for a in skip}
    found: list[Any] = []
    _arrays(list(objects), found)
    total = 0
    for a in found:
        key = buffer_key(a)
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


class PeakTracker:
    """Keeps the largest ``held_bytes`` observed over a driver's checkpoints."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._params = params
        self.peak = 0

    def observe(self, *objects: Any) -> None:
        """Record the bytes held now by ``objects`` (caches, stored states)."""
        self.peak = max(self.peak, held_bytes(objects, exclude=(self._params,)))
