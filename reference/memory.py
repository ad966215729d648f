"""Biased Memory Normalization and the memory write, init and reset built on it.

Shapes: memory / m (B, K, D); v_bias (K, D), one bias per slot.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace, zeros
from memcore.reference.attention import SlotCache, slot_attention_backward, slot_attention_forward

__all__ = [
    "NORM_EPS",
    "norm",
    "bmn_forward",
    "bmn_backward",
    "normalize",
    "normalize_backward",
    "memory_write_forward",
    "memory_write_backward",
    "memory_init_forward",
    "memory_init_backward",
    "memory_reset_forward",
    "memory_reset_backward",
]

NORM_EPS = 1e-12  # the clamp of normalize(u) = u / max(||u||, eps), F.normalize's convention


def norm(xp, u):
    """||u||_2 over the last axis (keepdims), computed as a ||u / a|| with a = max|u|.

    Scaling before squaring keeps u * u from overflowing: in float32 a row of norm ~1e20
    would square to inf and normalize to 0 (docs/semantics.md §3.3). a = 1 for a zero row.
    """
    if u.shape[-1] == 0:
        return xp.sum(u, axis=-1, keepdims=True)  # zeros of shape (..., 1)
    a = xp.max(xp.abs(u), axis=-1, keepdims=True)
    a = xp.where(a > 0, a, xp.ones_like(a))
    v = u / a
    return a * xp.sqrt(xp.sum(v * v, axis=-1, keepdims=True))


def normalize(xp, u):
    """y = u / max(||u||_2, 1e-12) over the last axis; returns (y, n) with n the clamped norm."""
    n = xp.maximum(norm(xp, u), NORM_EPS)
    return u / n, n


def normalize_backward(xp, y, n, dy):
    """du for y = u / max(||u||, eps).

    Where ||u|| >= eps: du = (dy - y <y, dy>) / ||u||  (the (I - y y^T) / ||u|| projection).
    Where ||u|| < eps the denominator is the constant eps: du = dy / eps.
    """
    clamped = n <= NORM_EPS
    proj = xp.sum(y * dy, axis=-1, keepdims=True)
    return xp.where(clamped, dy, dy - y * proj) / n


# ------------------------------------------------------------------ bmn
class BmnCache(NamedTuple):
    y: Any  # (B, K, D) output
    n: Any  # (B, K, 1) clamped norms


def bmn_forward(m, v_bias):
    """Biased Memory Normalization: M = (m + v_bias) / max(||m + v_bias||_2, 1e-12) per slot.

    Args:
        m: (B, K, D); v_bias: (K, D).

    Returns:
        (B, K, D) rows of unit norm (or zero where m + v_bias = 0), and the cache.
    """
    xp = array_namespace(m)
    y, n = normalize(xp, m + v_bias)
    return y, BmnCache(y, n)


def bmn_backward(cache: BmnCache, d_out):
    """(dm, dv_bias): du from normalize_backward; dm = du, dv_bias = sum over batch of du."""
    xp = array_namespace(d_out)
    du = normalize_backward(xp, cache.y, cache.n, d_out)
    return du, xp.sum(du, axis=0)


# ------------------------------------------------------------------ memory_write
class WriteCache(NamedTuple):
    slot: SlotCache
    bmn: BmnCache


def memory_write_forward(memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """memory_write = bmn(slot_attention(memory, x, wq, wk, wv), v_bias): (B, K, D)."""
    m, slot = slot_attention_forward(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)
    y, norm = bmn_forward(m, v_bias)
    return y, WriteCache(slot, norm)


def memory_write_backward(cache: WriteCache, d_out):
    """(dmemory, dx, dwq, dwk, dwv, dv_bias): bmn's backward chained into slot attention's."""
    dm, dv_bias = bmn_backward(cache.bmn, d_out)
    return slot_attention_backward(cache.slot, dm) + (dv_bias,)


# ------------------------------------------------------------------ memory_init
class InitCache(NamedTuple):
    y: Any  # (K, D)
    n: Any  # (K, 1)
    batch_size: int


def memory_init_forward(v_bias, *, batch_size: int):
    """M_0 = normalize(v_bias) broadcast to (batch_size, K, D); differentiable in v_bias."""
    xp = array_namespace(v_bias)
    y, n = normalize(xp, v_bias)
    # A fresh (not broadcast-view) array, so callers may write into it safely.
    out = zeros(xp, (batch_size,) + tuple(y.shape), y) + y[None, ...]
    return out, InitCache(y, n, batch_size)


def memory_init_backward(cache: InitCache, d_out):
    """(dv_bias,): normalize's backward of the batch-summed cotangent."""
    xp = array_namespace(d_out)
    return (normalize_backward(xp, cache.y, cache.n, xp.sum(d_out, axis=0)),)


# ------------------------------------------------------------------ memory_reset
class ResetCache(NamedTuple):
    reset: Any  # (B, 1, 1) bool
    init: InitCache


def memory_reset_forward(memory, v_bias, *, reset):
    """Rows b with reset[b] become normalize(v_bias); the others pass through: (B, K, D)."""
    xp = array_namespace(memory)
    m0, init = memory_init_forward(v_bias, batch_size=memory.shape[0])
    flags = xp.asarray(reset)[:, None, None]
    return xp.where(flags, m0, memory), ResetCache(flags, init)


def memory_reset_backward(cache: ResetCache, d_out):
    """(dmemory, dv_bias): dmemory = d_out on kept rows, 0 on reset rows; reset rows feed v_bias."""
    xp = array_namespace(d_out)
    zero = xp.zeros_like(d_out)
    dmemory = xp.where(cache.reset, zero, d_out)
    (dv,) = memory_init_backward(cache.init, xp.where(cache.reset, d_out, zero))
    return dmemory, dv
