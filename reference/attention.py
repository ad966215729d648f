"""Memformer memory reading and slot-attention writing: forward and hand-written backward.

Shapes: x (B, L, D) tokens; memory (B, K, D) slots; projections (D, D); H heads, dh = D / H.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace, concat, merge_heads, mT, ones, split_heads

__all__ = [
    "memory_read_forward",
    "memory_read_backward",
    "slot_attention_forward",
    "slot_attention_backward",
    "slot_attention_head_grads",
    "softmax_backward",
]


def _rows(xp, x):
    """(..., D) -> (prod(...), D) for weight gradients."""
    return xp.reshape(x, (-1, x.shape[-1]))


def _wgrad(xp, a, g):
    """sum over batch and positions of a^T g: the gradient of a projection a @ w."""
    return xp.matmul(mT(xp, _rows(xp, a)), _rows(xp, g))


def softmax_backward(xp, p: Any, dp: Any) -> Any:
    """d logits = p * (dp - sum(p * dp)) along the last axis."""
    return p * (dp - xp.sum(p * dp, axis=-1, keepdims=True))


# ------------------------------------------------------------------ memory_read
class ReadCache(NamedTuple):
    x: Any
    memory: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    q: Any  # (B, H, L, dh)
    k: Any  # (B, H, K, dh)
    v: Any  # (B, H, K, dh)
    p: Any  # (B, H, L, K) attention weights
    o: Any  # (B, L, D) merged heads before wo
    scale: float
    num_heads: int


def memory_read_forward(x, memory, wq, wk, wv, wo, *, num_heads: int):
    """Cross-attention from tokens to memory slots (Memformer Eq. 1-3).

    Args:
        x: (B, L, D) tokens; memory: (B, K, D) slots; wq, wk, wv, wo: (D, D).
        num_heads: H, dividing D.

    Returns:
        out (B, L, D) = concat_h(softmax(q_h k_h^T / sqrt(dh)) v_h) wo, and the cache.
    """
    xp = array_namespace(x)
    scale = 1.0 / math.sqrt(x.shape[-1] // num_heads)
    q = split_heads(xp, xp.matmul(x, wq), num_heads)
    k = split_heads(xp, xp.matmul(memory, wk), num_heads)
    v = split_heads(xp, xp.matmul(memory, wv), num_heads)
    s = xp.matmul(q, mT(xp, k))
    s = (s - xp.max(s, axis=-1, keepdims=True)) * scale  # max first, then scale (§2)
    e = xp.exp(s)
    p = e / xp.sum(e, axis=-1, keepdims=True)
    o = merge_heads(xp, xp.matmul(p, v))
    out = xp.matmul(o, wo)
    return out, ReadCache(x, memory, wq, wk, wv, wo, q, k, v, p, o, scale, num_heads)


def memory_read_backward(cache: ReadCache, d_out):
    """Gradients (dx, dmemory, dwq, dwk, dwv, dwo) of memory_read.

    With P = softmax(S), S = Q K^T c, O = P V, out = O wo:
    dO = d_out wo^T, dwo = O^T d_out, dP = dO V^T, dV = P^T dO,
    dS = P * (dP - rowsum(P * dP)), dQ = c dS K, dK = c dS^T Q;
    dx = dQ wq^T, dmemory = dK wk^T + dV wv^T, dw* = input^T d(projection).
    """
    c = cache
    xp = array_namespace(d_out)
    h = c.num_heads
    dwo = _wgrad(xp, c.o, d_out)
    do = split_heads(xp, xp.matmul(d_out, mT(xp, c.wo)), h)
    dp = xp.matmul(do, mT(xp, c.v))
    dv = xp.matmul(mT(xp, c.p), do)
    ds = softmax_backward(xp, c.p, dp) * c.scale
    dq = merge_heads(xp, xp.matmul(ds, c.k))
    dk = merge_heads(xp, xp.matmul(mT(xp, ds), c.q))
    dv = merge_heads(xp, dv)
    dx = xp.matmul(dq, mT(xp, c.wq))
    dmemory = xp.matmul(dk, mT(xp, c.wk)) + xp.matmul(dv, mT(xp, c.wv))
    return (
        dx,
        dmemory,
        _wgrad(xp, c.x, dq),
        _wgrad(xp, c.memory, dk),
        _wgrad(xp, c.memory, dv),
        dwo,
    )


# ------------------------------------------------------------------ slot_attention
class SlotCache(NamedTuple):
    memory: Any
    x: Any
    wq: Any
    wk: Any
    wv: Any
    q: Any  # (B, H, K, dh) slot queries
    ks: Any  # (B, H, K, dh) slot keys
    kx: Any  # (B, H, L, dh) token keys
    vx: Any  # (B, H, L, dh) token values
    ms: Any  # (B, H, K, dh) raw slots split into heads (the self value)
    a: Any  # (B, H, K, L + 1) weights, [self, tokens...]
    scale: float
    num_heads: int


def slot_attention_forward(memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """Slot attention write (Memformer Eq. 4-8): slot i attends to [itself; tokens].

    Args:
        memory: (B, K, D) slots; x: (B, L, D) tokens; wq, wk, wv: (D, D).
        num_heads: H; tau: temperature in (0, 1]; token_mask: (B, L) bool or None.

    Returns:
        (B, K, D): per head, a_self * m_i + sum_j a_j vx_j with
        a = softmax([<q_i, k_i>, <q_i, kx_j>] / (sqrt(dh) tau)); masked tokens get weight 0.
    """
    xp = array_namespace(memory)
    scale = 1.0 / (math.sqrt(memory.shape[-1] // num_heads) * tau)
    q = split_heads(xp, xp.matmul(memory, wq), num_heads)
    ks = split_heads(xp, xp.matmul(memory, wk), num_heads)
    kx = split_heads(xp, xp.matmul(x, wk), num_heads)
    vx = split_heads(xp, xp.matmul(x, wv), num_heads)
    ms = split_heads(xp, memory, num_heads)
    s_self = xp.sum(q * ks, axis=-1, keepdims=True)  # (B, H, K, 1)
    s_tok = xp.matmul(q, mT(xp, kx))  # (B, H, K, L)
    logits = concat(xp, [s_self, s_tok], axis=-1)
    if token_mask is not None:
        keep = xp.asarray(token_mask)[:, None, None, :]
        # The self entry is never masked, so every row keeps a finite max (Eq. 6 mask).
        self_col = ones(xp, keep.shape[:-1] + (1,), keep)
        allowed = concat(xp, [self_col, keep], axis=-1)
        logits = xp.where(allowed, logits, -math.inf)
    # Subtract the row max, then scale (§2): every scaled logit is <= 0, the row max exactly
    # 0, so exp stays finite for every allowed tau (1/tau up to 2**126), where scaling first
    # overflows to inf - inf = NaN for small tau or large inputs.
    logits = (logits - xp.max(logits, axis=-1, keepdims=True)) * scale
    e = xp.exp(logits)
    a = e / xp.sum(e, axis=-1, keepdims=True)
    out_h = a[..., :1] * ms + xp.matmul(a[..., 1:], vx)
    out = merge_heads(xp, out_h)
    return out, SlotCache(memory, x, wq, wk, wv, q, ks, kx, vx, ms, a, scale, num_heads)


def slot_attention_head_grads(cache: SlotCache, d_out):
    """The attention part of :func:`slot_attention_backward`, before the projections.

    Per head with c = 1 / (sqrt(dh) tau) and dO the head slice of d_out:
    da_self = <dO, m>, da_tok = dO vx^T, dm_self = a_self dO, dvx = a_tok^T dO;
    dlogits = a * (da - rowsum(a * da)) (zero where a = 0: masked tokens get no gradient);
    dq = c (dl_self k_s + dl_tok kx), dk_s = c dl_self q, dkx = c dl_tok^T q.
    Fused kernels compute exactly this part (the CuPy backend's slot backward).

    Returns:
        (dq, dk_self, dm_self) (B, K, D) and (dkx, dvx) (B, L, D), heads merged, in the
        order (dq, dk_self, dkx, dvx, dm_self).
    """
    c = cache
    xp = array_namespace(d_out)
    do = split_heads(xp, d_out, c.num_heads)
    a_self, a_tok = c.a[..., :1], c.a[..., 1:]
    da = concat(xp, [xp.sum(do * c.ms, axis=-1, keepdims=True), xp.matmul(do, mT(xp, c.vx))], axis=-1)
    dms = a_self * do
    dvx = xp.matmul(mT(xp, a_tok), do)
    dl = softmax_backward(xp, c.a, da) * c.scale
    dl_self, dl_tok = dl[..., :1], dl[..., 1:]
    dq = dl_self * c.ks + xp.matmul(dl_tok, c.kx)
    dks = dl_self * c.q
    dkx = xp.matmul(mT(xp, dl_tok), c.q)
    return tuple(merge_heads(xp, t) for t in (dq, dks, dkx, dvx, dms))


def slot_attention_backward(cache: SlotCache, d_out):
    """Gradients (dmemory, dx, dwq, dwk, dwv) of slot_attention.

    With the head gradients of :func:`slot_attention_head_grads`:
    dmemory = dm_self + dq wq^T + dk_s wk^T; dx = dkx wk^T + dvx wv^T;
    dwq = m^T dq, dwk = m^T dk_s + x^T dkx, dwv = x^T dvx.
    """
    c = cache
    xp = array_namespace(d_out)
    dq, dks, dkx, dvx, dms = slot_attention_head_grads(cache, d_out)
    dmemory = dms + xp.matmul(dq, mT(xp, c.wq)) + xp.matmul(dks, mT(xp, c.wk))
    dx = xp.matmul(dkx, mT(xp, c.wk)) + xp.matmul(dvx, mT(xp, c.wv))
    dwq = _wgrad(xp, c.memory, dq)
    dwk = _wgrad(xp, c.memory, dks) + _wgrad(xp, c.x, dkx)
    dwv = _wgrad(xp, c.x, dvx)
    return dmemory, dx, dwq, dwk, dwv
