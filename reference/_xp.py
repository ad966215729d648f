"""Array-namespace helpers: the reference is written against ``xp`` so the same
hand-written forward and backward run on NumPy, CuPy or an Array API library.

Detection looks at the array's type and ``sys.modules``; it never imports a framework.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "all_finite",
    "arange",
    "array_namespace",
    "concat",
    "mT",
    "merge_heads",
    "nbytes",
    "ones",
    "permute",
    "split_heads",
    "zeros",
]


def array_namespace(*arrays: Any) -> ModuleType:
    """The namespace of the first non-None array (NumPy for NumPy arrays and scalars)."""
    for x in arrays:
        if x is None or isinstance(x, (bool, int, float)):
            continue
        top = type(x).__module__.split(".")[0]
        if top == "numpy":
            return np
        if top == "cupy" and "cupy" in sys.modules:
            return sys.modules["cupy"]
        if hasattr(x, "__array_namespace__"):
            return x.__array_namespace__()
    return np


def _device_kw(xp: ModuleType, like: Any) -> dict[str, Any]:
    """``device=`` for creation functions, so new arrays live on ``like``'s device.

    The Array API puts creation on the default device unless told otherwise (and refuses
    to combine arrays of two devices); NumPy and CuPy have one current device and CuPy's
    creation functions take no ``device`` argument.
    """
    if xp.__name__.split(".")[0] in ("numpy", "cupy"):
        return {}
    device = getattr(like, "device", None)
    return {} if device is None else {"device": device}


def zeros(xp: ModuleType, shape: tuple[int, ...], like: Any, dtype: Any = None) -> Any:
    """Zeros of ``shape`` with ``like``'s dtype (or ``dtype``) on ``like``'s device."""
    return xp.zeros(shape, dtype=like.dtype if dtype is None else dtype, **_device_kw(xp, like))


def ones(xp: ModuleType, shape: tuple[int, ...], like: Any, dtype: Any = None) -> Any:
    """Ones of ``shape`` with ``like``'s dtype (or ``dtype``) on ``like``'s device."""
    return xp.ones(shape, dtype=like.dtype if dtype is None else dtype, **_device_kw(xp, like))


def arange(xp: ModuleType, n: int, like: Any) -> Any:
    """0..n-1 in the namespace's default integer dtype, on ``like``'s device."""
    return xp.arange(n, **_device_kw(xp, like))


def permute(xp: ModuleType, x: Any, axes: tuple[int, ...]) -> Any:
    fn = getattr(xp, "permute_dims", None) or xp.transpose
    return fn(x, axes)


def mT(xp: ModuleType, x: Any) -> Any:
    """Swap the last two axes."""
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return permute(xp, x, axes)


def concat(xp: ModuleType, arrays: list[Any], axis: int) -> Any:
    fn = getattr(xp, "concat", None) or xp.concatenate
    return fn(arrays, axis=axis)


def split_heads(xp: ModuleType, x: Any, num_heads: int) -> Any:
    """(B, S, D) -> (B, H, S, dh)."""
    b, s, d = x.shape
    return permute(xp, xp.reshape(x, (b, s, num_heads, d // num_heads)), (0, 2, 1, 3))


def merge_heads(xp: ModuleType, x: Any) -> Any:
    """(B, H, S, dh) -> (B, S, D)."""
    b, h, s, dh = x.shape
    return xp.reshape(permute(xp, x, (0, 2, 1, 3)), (b, s, h * dh))


def all_finite(x: Any) -> bool:
    """True when no entry is NaN or Inf (any namespace).

    Also True for a JAX tracer (inside ``jit``, ``grad``, ``vmap``): it has no concrete
    values to check, and ``bool`` of one raises (docs/semantics.md §9).
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer):
            return True
        # A concrete array closed over inside jit: evaluate now, not as a traced op.
        with jax.ensure_compile_time_eval():
            return bool(jax.numpy.all(jax.numpy.isfinite(x)))
    xp = array_namespace(x)
    return bool(xp.all(xp.isfinite(x)))


def nbytes(x: Any) -> int:
    """Bytes of an array's elements: ``x.nbytes``, or size times item size where the
    namespace has no ``nbytes`` (the Array API standard does not require one)."""
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "bool"):
        item = 1
    elif xp.isdtype(x.dtype, "integral"):
        item = xp.iinfo(x.dtype).bits // 8
    else:
        item = xp.finfo(x.dtype).bits // 8
    size = 1
    for d in x.shape:
        size *= int(d)
    return size * item
