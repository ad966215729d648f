"""Arguments every backend checks the same way: whose array it is, a dtype name, what
``to_numpy`` may convert. Frameworks are found in ``sys.modules``, never imported."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from memcore.errors import MemcoreError

__all__ = ["array_framework", "check_dtype_arg", "check_to_numpy_arg"]


def array_framework(x: Any) -> str | None:
    """"numpy", "torch", "jax" or "cupy" when ``x`` is that framework's array, else None.

    Looks the frameworks up in ``sys.modules`` and never imports one: an array of a
    framework that is not imported cannot exist.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    for module, attr in (("torch", "Tensor"), ("jax", "Array"), ("cupy", "ndarray")):
        mod = sys.modules.get(module)
        kind = getattr(mod, attr, None) if mod is not None else None
        if isinstance(kind, type) and isinstance(x, kind):
            return module
    return None


def check_dtype_arg(dtype: Any) -> str | None:
    """The dtype name ``from_numpy`` was given (None stays None), or ``MemcoreError``.

    Accepts NumPy dtype names and objects ("float32", np.float64, "bool", "int64") and
    "bfloat16", which NumPy lacks.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype
    try:
        return np.dtype(dtype).name
    except (TypeError, ValueError):
        raise MemcoreError(
            "`dtype` must be a dtype name such as float32, float64, bfloat16, float16, bool "
            f"or int64. Received: dtype={dtype!r}"
        ) from None


def check_to_numpy_arg(backend: Any, x: Any) -> None:
    """Raise ``MemcoreError`` unless ``x`` is an array ``backend.to_numpy`` can convert."""
    frameworks = getattr(backend, "array_frameworks", ())
    found = array_framework(x)
    kind = getattr(backend, "array_kind", "an array")
    if (found is not None and frameworks and found not in frameworks) or not (
        hasattr(x, "shape") and hasattr(x, "dtype")
    ):
        shown = "None" if x is None else f"{type(x).__module__}.{type(x).__name__}"
        raise MemcoreError(
            f"`x` of to_numpy must be {kind} of the {backend.name} backend. Received: {shown}"
        )
