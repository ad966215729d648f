"""Memformer memory reading and slot-attention writing in ``jax.numpy``.

Shapes: x (B, L, D) tokens; memory (B, K, D) slots; projections (D, D); H heads,
dh = D / H. Gradients come from JAX autodiff of these functions, never from the
reference's hand-written backward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from memcore.backends.jax._common import merge_heads, scaled_softmax, split_heads, upcast_halves

__all__ = ["memory_read", "slot_attention"]


@upcast_halves
def memory_read(x, memory, wq, wk, wv, wo, *, num_heads: int) -> jax.Array:
    """Cross-attention from tokens to memory slots (Memformer Eq. 1-3).

    Args:
        x: (B, L, D) tokens (the queries); memory: (B, K, D) slots (keys and values).
        wq, wk, wv, wo: (D, D) projections.
        num_heads: H, dividing D.

    Returns:
        (B, L, D): concat_h(softmax(q_h k_h^T / sqrt(dh)) v_h) wo.
    """
    scale = 1.0 / math.sqrt(x.shape[-1] // num_heads)
    q = split_heads(x @ wq, num_heads)
    k = split_heads(memory @ wk, num_heads)
    v = split_heads(memory @ wv, num_heads)
    p = scaled_softmax(q @ jnp.swapaxes(k, -1, -2), scale)
    return merge_heads(p @ v) @ wo


@upcast_halves
def slot_attention(
    memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None
) -> jax.Array:
    """Slot attention write (Memformer Eq. 4-8): slot i attends to [itself; tokens].

    Args:
        memory: (B, K, D) slots; x: (B, L, D) tokens; wq, wk, wv: (D, D).
        num_heads: H; tau: temperature in (0, 1]; token_mask: (B, L) bool or None
            (False tokens get weight 0; the self entry is never masked).

    Returns:
        (B, K, D): per head a_self * m_i + sum_j a_j vx_j with
        a = softmax([<q_i, k_i>, <q_i, kx_j>] / (sqrt(dh) tau)).
    """
    scale = 1.0 / (math.sqrt(memory.shape[-1] // num_heads) * tau)
    q = split_heads(memory @ wq, num_heads)
    ks = split_heads(memory @ wk, num_heads)
    kx = split_heads(x @ wk, num_heads)
    vx = split_heads(x @ wv, num_heads)
    ms = split_heads(memory, num_heads)
    s_self = jnp.sum(q * ks, axis=-1, keepdims=True)  # (B, H, K, 1)
    s_tok = q @ jnp.swapaxes(kx, -1, -2)  # (B, H, K, L)
    if token_mask is not None:
        # Eq. 6 mask; the self column stays, so every row keeps a finite max.
        s_tok = jnp.where(jnp.asarray(token_mask)[:, None, None, :], s_tok, -jnp.inf)
    a = scaled_softmax(jnp.concatenate([s_self, s_tok], axis=-1), scale)
    return merge_heads(a[..., :1] * ms + a[..., 1:] @ vx)
