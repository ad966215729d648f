"""TArray: the template's array type, a read-only NumPy buffer behind a small wrapper.

A stand-in for a framework's tensor: memcore never looks inside it; the backend converts
at its boundary (``from_numpy``/``to_numpy``) and unwraps it to run the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["TArray", "unwrap", "wrap"]


class TArray:
    """An immutable array on the template's only device, "cpu".

    Attributes read by memcore: ``shape``, ``dtype`` (a NumPy dtype, so its name is
    "float32" etc.), ``ndim`` and ``device``. It exports DLPack (``__dlpack__``).
    """

    __slots__ = ("_data",)

    def __init__(self, data: np.ndarray):
        data = np.array(data, copy=True)
        data.flags.writeable = False  # never mutated: the protocol forbids writing into inputs
        self._data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def device(self) -> str:
        return "cpu"

    def numpy(self) -> np.ndarray:
        """A writable NumPy copy."""
        return np.array(self._data, copy=True)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._data.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._data.__dlpack_device__()

    def __repr__(self) -> str:
        return f"TArray({self._data!r})"


def unwrap(value: Any) -> Any:
    """TArrays (also inside dicts, tuples and lists) as read-only NumPy arrays; others unchanged."""
    if isinstance(value, TArray):
        return value._data
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(unwrap(v) for v in value)
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def wrap(value: Any) -> Any:
    """NumPy arrays (also inside dicts, tuples and lists) as TArrays; others unchanged."""
    if isinstance(value, np.ndarray):
        return TArray(value)
    if isinstance(value, dict):
        return {k: wrap(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(wrap(v) for v in value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value
