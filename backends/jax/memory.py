"""Biased Memory Normalization and the memory write, init and reset, in ``jax.numpy``.

Shapes: memory / m (B, K, D); v_bias (K, D), one bias per slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._common import upcast_halves
from memcore.backends.jax.attention import slot_attention

__all__ = ["NORM_EPS", "bmn", "memory_init", "memory_reset", "memory_write", "normalize"]

NORM_EPS = 1e-12  # the reference's clamp: u / max(||u||, eps), F.normalize's convention


def normalize(u: jax.Array) -> jax.Array:
    """u / max(||u||_2, 1e-12) over the last axis, with gradients finite everywhere.

    The reference's clamp rule: where ||u|| <= eps the denominator is the constant eps
    (gradient dy / eps). The square root only ever sees a positive argument (where-guard),
    so a zero row gives no NaN in the VJP; a plain ``jnp.maximum`` would also split the
    gradient at a tie, which the reference does not.

    No overflow (docs/semantics.md §9): u * u alone overflows float32 for rows of norm
    ~1e19, so the row is first divided by s = max|u| / 16 (a stop-gradient: the result
    does not depend on s) and the output is v / ||v|| with v = u / s. Why not divide by
    the norm itself: XLA on CPU divides through a flushed-to-zero reciprocal, so x / n is
    0 for any n > 2**126; 1 / s = 16 / max|u| stays a normal float32.
    """
    if u.shape[-1] == 0:
        return u / 1.0
    a = lax.stop_gradient(jnp.max(jnp.abs(u), axis=-1, keepdims=True))
    s = jnp.where(a > 0, a * 0.0625, jnp.ones_like(a))
    v = u / s
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    positive = sq > 0
    root = jnp.sqrt(jnp.where(positive, sq, jnp.ones_like(sq)))
    unclamped = positive & (s * root > NORM_EPS)
    return jnp.where(unclamped, v / root, u / NORM_EPS)


@upcast_halves
def bmn(m, v_bias) -> jax.Array:
    """Biased Memory Normalization: (m + v_bias) / max(||m + v_bias||, 1e-12) per slot.

    Args:
        m: (B, K, D); v_bias: (K, D).

    Returns:
        (B, K, D) rows of unit norm (zero where m + v_bias = 0).
    """
    return normalize(m + v_bias)


@upcast_halves
def memory_write(
    memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None
):
    """bmn(slot_attention(memory, x, wq, wk, wv), v_bias): (B, K, D)."""
    m = slot_attention(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)
    return normalize(m + v_bias)


@upcast_halves
def memory_init(v_bias, *, batch_size: int) -> jax.Array:
    """M_0 = normalize(v_bias) broadcast to (batch_size, K, D); differentiable in v_bias."""
    y = normalize(v_bias)
    return jnp.broadcast_to(y[None], (batch_size,) + y.shape)


@upcast_halves
def memory_reset(memory, v_bias, *, reset) -> jax.Array:
    """Rows b with reset[b] (B,) bool become normalize(v_bias); the others pass through."""
    m0 = memory_init(v_bias, batch_size=memory.shape[0])
    return jnp.where(jnp.asarray(reset)[:, None, None], m0, memory)
