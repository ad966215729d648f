"""Shared helpers of the JAX backend: half-precision upcasting, heads, a stable softmax.

Half types (float16, bfloat16) are computed in float32 and the results cast back to the
input dtype, so every reduction, softmax and norm accumulates in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "HALF_DTYPES",
    "compute_dtype",
    "merge_heads",
    "scaled_softmax",
    "softmax",
    "split_heads",
    "upcast_halves",
]

HALF_DTYPES = (jnp.float16, jnp.bfloat16)


def compute_dtype(dtype: Any) -> Any:
    """float32 for half types, the dtype itself otherwise."""
    return (
        jnp.float32 if jnp.dtype(dtype) in [jnp.dtype(d) for d in HALF_DTYPES] else jnp.dtype(dtype)
    )


def _is_half(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.dtype(x.dtype) in (
        jnp.dtype(jnp.float16),
        jnp.dtype(jnp.bfloat16),
    )


def upcast_halves(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` in float32 when its float inputs are half; cast float outputs back.

    Keyword arguments (attributes, boolean masks) pass through unchanged. The casts are
    ordinary JAX ops, so ``jax.vjp`` of the wrapped function returns half gradients.
    """

    @functools.wraps(fn)
    def wrapped(*inputs: Any, **attributes: Any) -> Any:
        half = next((x.dtype for x in inputs if _is_half(x)), None)
        if half is None:
            return fn(*inputs, **attributes)
        up = tuple(x.astype(jnp.float32) if _is_half(x) else x for x in inputs)
        out = fn(*up, **attributes)
        return jax.tree_util.tree_map(
            lambda y: y.astype(half) if jnp.issubdtype(y.dtype, jnp.floating) else y, out
        )

    return wrapped


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, S, D) -> (B, H, S, dh)."""
    b, s, d = x.shape
    return jnp.transpose(jnp.reshape(x, (b, s, num_heads, d // num_heads)), (0, 2, 1, 3))


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, S, dh) -> (B, S, D)."""
    b, h, s, dh = x.shape
    return jnp.reshape(jnp.transpose(x, (0, 2, 1, 3)), (b, s, h * dh))


def softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis; -inf entries get weight 0.

    The row max is a constant shift (softmax is invariant to it), so it is stop-gradiented:
    the VJP is then exactly p * (dp - <p, dp>), with no rounding noise from the max's path.
    """
    shift = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - shift)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def scaled_softmax(s: jax.Array, scale: float) -> jax.Array:
    """softmax(scale * s) over the last axis, computed as exp((s - max s) * scale) / sum.

    The max is subtracted before the scale multiplies (docs/semantics.md §2): every
    exponent is <= 0, the row max's exactly 0. Scaling first made ``jit``-compiled float32
    writes NaN at tau = 1e-3 with inputs of size 1e3-1e4 (and at tau <= 3e-10): with
    logits ~1e12 the compiled max and the compiled logits can differ by more than 88 in
    the last bits, so exp overflowed to inf / inf. The max is a stop-gradient constant
    shift, as in :func:`softmax`; -inf entries (masked) get weight 0.
    """
    shift = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp((s - shift) * scale)
    return e / jnp.sum(e, axis=-1, keepdims=True)
