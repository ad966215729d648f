"""Helpers shared by the torch ops: dtype names, half-precision upcasting, head splitting.

Half types (bfloat16, float16) compute in float32: inputs are upcast at the op's entry
and outputs cast back, so every matmul, softmax and normalization accumulates in float32.
Autograd sees the casts, so gradients come back in the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "HALF",
    "compute_dtype",
    "half_safe",
    "merge_heads",
    "split_heads",
    "torch_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HALF = (torch.bfloat16, torch.float16)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a framework-neutral name ('float32', 'bool', 'int64', ...)."""
    if name in DTYPES:
        return DTYPES[name]
    found = getattr(torch, str(name), None)
    if not isinstance(found, torch.dtype):
        from memcore.errors import MemcoreError

        raise MemcoreError(
            f"`dtype` must be a dtype name such as {', '.join(DTYPES)}. Received: dtype={name!r}"
        )
    return found


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (float32 accumulation), the dtype itself otherwise."""
    return torch.float32 if dtype in HALF else dtype


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
        return x.to(dtype)
    return x


def half_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` in float32 when its first input is bfloat16/float16; cast outputs back."""

    def wrapper(*inputs: Any, **attributes: Any) -> Any:
        dtype = inputs[0].dtype
        if dtype not in HALF:
            return fn(*inputs, **attributes)
        out = fn(*(_cast(x, torch.float32) for x in inputs), **attributes)
        if isinstance(out, tuple):
            return tuple(_cast(o, dtype) for o in out)
        return _cast(out, dtype)

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, D) -> (B, H, S, dh)."""
    b, s, d = x.shape
    return x.reshape(b, s, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, dh) -> (B, S, D)."""
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)
