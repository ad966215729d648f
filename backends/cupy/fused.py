"""Reference op pairs with the fused kernels swapped in, producing the reference's own caches.

Each ``*_forward`` here returns ``(out, cache)`` with the cache type of the matching
function in ``memcore.reference`` (``BmnCache``, ``SlotCache``, ``WriteCache``,
``SparsifyCache``, ``RetrieveCache``), so a fused forward can feed either the fused or the
reference backward. The math lives in the kernels (``kernels.py``) and the reference;
what is here is only the composition the reference also uses (``memory_write`` =
``bmn`` after ``slot_attention``; ``sparse_retrieve`` = scores, sparsify, weighted sum).
The slot-attention kernels run up to a size bound each (``SLOT_KERNEL_MAX_LOGITS``,
``SLOT_BACKWARD_KERNEL_MAX_LOGITS``), and the backward's on float32 only: other dtypes
keep the reference's backward.

Shapes: memory (B, K, D); x (B, L, D); v_bias (K, D); scores (B, N); memories (B, N, Hd).
"""

from __future__ import annotations

import math
from typing import Any

import cupy as cp

from memcore.backends.cupy import kernels
from memcore.reference import attention as ref_attention
from memcore.reference import sab as ref_sab
from memcore.reference._xp import merge_heads, split_heads
from memcore.reference.memory import BmnCache, WriteCache
from memcore.reference.sab import RetrieveCache, SparsifyCache

__all__ = [
    "FUSED_OPS",
    "SLOT_BACKWARD_KERNEL_MAX_LOGITS",
    "SLOT_KERNEL_MAX_LOGITS",
    "bmn_backward",
    "bmn_forward",
    "gated_slot_attention_forward",
    "gated_slot_attention_output",
    "memory_write_backward",
    "memory_write_forward",
    "memory_write_output",
    "slot_attention_backward",
    "slot_attention_backward_kernel",
    "slot_attention_forward",
    "slot_attention_output",
    "slot_backward_kernel_pays",
    "slot_kernel_pays",
    "sparse_retrieve_backward",
    "sparse_retrieve_forward",
    "sparsify_backward",
    "sparsify_forward",
]


# ------------------------------------------------------------------ bmn
def bmn_forward(m: Any, v_bias: Any) -> tuple[Any, BmnCache]:
    """Fused BMN: (B, K, D) unit rows of m + v_bias, and the reference's BmnCache."""
    y, n = kernels.bmn_forward(m, v_bias)
    return y, BmnCache(y, n)


def bmn_backward(cache: BmnCache, d_out: Any) -> tuple[Any, Any]:
    """(dm (B, K, D), dv_bias (K, D)): fused projection backward, batch sum for v_bias."""
    du = kernels.bmn_backward(cache.y, cache.n, d_out)
    return du, du.sum(axis=0)


# ------------------------------------------------------------------ slot attention
def slot_attention_forward(memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """Slot attention with the per-(b, h, slot) pass fused; projections stay in cuBLAS.

    Returns:
        (out (B, K, D), the reference's SlotCache) with weights (B, H, K, L + 1).
    """
    scale = 1.0 / (math.sqrt(memory.shape[-1] // num_heads) * tau)
    q, ks, kx, vx = memory @ wq, memory @ wk, x @ wk, x @ wv
    out, a = kernels.slot_attention_core(
        q, ks, kx, vx, memory, num_heads=num_heads, scale=scale, token_mask=token_mask, store_weights=True
    )
    heads = tuple(split_heads(cp, t, num_heads) for t in (q, ks, kx, vx, memory))
    return out, ref_attention.SlotCache(memory, x, wq, wk, wv, *heads, a, scale, num_heads)


def slot_attention_output(memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """Forward only (no weights stored): out (B, K, D)."""
    scale = 1.0 / (math.sqrt(memory.shape[-1] // num_heads) * tau)
    out, _ = kernels.slot_attention_core(
        memory @ wq, memory @ wk, x @ wk, x @ wv, memory,
        num_heads=num_heads, scale=scale, token_mask=token_mask,
    )
    return out


# Measured on an H200 (bench/results/cupy-kernels-h200.md, float32, projections included):
# the one-warp-per-row slot kernel beats the unfused path (cuBLAS batched matmuls +
# elementwise) 2.1-2.2x up to B*H*K*L = 2**20 logits and loses beyond the crossover
# (0.74x at 2**23, 0.65x at 2**26), where the matmuls' reuse of each token key across
# slots wins. In the whole memory write (docs/performance.md section 2b, L=128 H=8) it
# still wins at 2**22 (B=64 K=64: 1.22x forward+backward, 1.11x with the gate closed) and
# loses at 2**24 (0.96x). Above the bound the backend keeps the unfused slot attention.
SLOT_KERNEL_MAX_LOGITS = 1 << 22

# The backward kernels' bound, B*H*K*L as for the forward, measured on an H200 in the
# whole memory write (bench/results/write-kernel-cupy-v2-h200.json, L=128 H=8): at 2**20
# (B=16 K=64) the fused backward takes the write from 1.28x to 1.85-1.95x forward+backward;
# at 2**22 (B=64 K=64) the write with both kernels is 0.87x of the unfused path, so the
# backward kernel loses there (one warp per (slot, token) row re-reads the token values
# that the batched matmuls reuse) and the bound is 2**20.
SLOT_BACKWARD_KERNEL_MAX_LOGITS = 1 << 20


def slot_kernel_pays(memory, x, num_heads: int) -> bool:
    """Whether B*H*K*L is within the range where the fused slot kernel measured faster."""
    b, k, _ = memory.shape
    return b * num_heads * k * max(x.shape[1], 1) <= SLOT_KERNEL_MAX_LOGITS


def slot_backward_kernel_pays(cache: ref_attention.SlotCache, d_out) -> bool:
    """Whether the fused backward runs: float32 throughout (float64 keeps the reference's
    backward; float16 arrives here upcast to float32 by the backend) and B*H*K*L within
    :data:`SLOT_BACKWARD_KERNEL_MAX_LOGITS`."""
    arrays = (cache.q, cache.ks, cache.kx, cache.vx, cache.ms, cache.a, d_out)
    if any(t.dtype != cp.float32 for t in arrays):
        return False
    b, k, _ = cache.memory.shape
    return b * cache.num_heads * k * max(cache.x.shape[1], 1) <= SLOT_BACKWARD_KERNEL_MAX_LOGITS


def _rows(t):
    """(..., N) -> (prod(...), N), the layout of one GEMM over every batch row."""
    return cp.reshape(t, (-1, t.shape[-1]))


def slot_attention_backward_kernel(cache: ref_attention.SlotCache, d_out):
    """The backward through the fused kernels at any size, float32 or float64; GEMMs in cuBLAS.

    Consumes the reference's SlotCache (from either forward) and returns what
    ``ref_attention.slot_attention_backward`` returns: (dmemory (B, K, D), dx (B, L, D),
    dwq, dwk, dwv (D, D)). The projection gradients are 4 GEMMs on concatenated weights
    ([wq | wk] for the slot side, [wk | wv] for the token side) instead of the reference's 8.
    """
    c = cache
    q, ks, kx, vx, ms = (merge_heads(cp, t) for t in (c.q, c.ks, c.kx, c.vx, c.ms))
    dqk, dms, dkv = kernels.slot_attention_backward_core(
        q, ks, kx, vx, ms, c.a, d_out, num_heads=c.num_heads, scale=c.scale
    )
    d = q.shape[-1]
    dqk_rows, dkv_rows = _rows(dqk), _rows(dkv)  # (B*K, 2D), (B*L, 2D): one GEMM each
    # dmemory = dm_self + dq wq^T + dk_self wk^T = dm_self + [dq | dk_self] [wq | wk]^T.
    dmemory = dms + cp.reshape(dqk_rows @ cp.concatenate([c.wq, c.wk], axis=1).T, dms.shape)
    # dx = dkx wk^T + dvx wv^T = [dkx | dvx] [wk | wv]^T.
    dx = cp.reshape(dkv_rows @ cp.concatenate([c.wk, c.wv], axis=1).T, c.x.shape)
    dw_m = _rows(c.memory).T @ dqk_rows  # (D, 2D): [dwq | dwk from the slot keys]
    dw_x = _rows(c.x).T @ dkv_rows  # (D, 2D): [dwk from the token keys | dwv]
    dwq = cp.ascontiguousarray(dw_m[:, :d])
    dwk = dw_m[:, d:] + dw_x[:, :d]
    dwv = cp.ascontiguousarray(dw_x[:, d:])
    return dmemory, dx, dwq, dwk, dwv


def slot_attention_backward(cache: ref_attention.SlotCache, d_out):
    """(dmemory, dx, dwq, dwk, dwv): the fused backward where it pays, else the reference's.

    Unlike :func:`slot_attention_forward` this one is gated (it is the op's backward in
    :data:`FUSED_OPS` and :func:`memory_write_backward`); the ungated kernel path is
    :func:`slot_attention_backward_kernel`.
    """
    if slot_backward_kernel_pays(cache, d_out):
        return slot_attention_backward_kernel(cache, d_out)
    return ref_attention.slot_attention_backward(cache, d_out)


def gated_slot_attention_forward(memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """The fused slot attention where it pays, else the reference's: (out, SlotCache)."""
    fwd = slot_attention_forward if slot_kernel_pays(memory, x, num_heads) else ref_attention.slot_attention_forward
    return fwd(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)


def gated_slot_attention_output(memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """Forward only, gated like :func:`gated_slot_attention_forward`: (B, K, D)."""
    if slot_kernel_pays(memory, x, num_heads):
        return slot_attention_output(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)
    return ref_attention.slot_attention_forward(
        memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask
    )[0]


# ------------------------------------------------------------------ memory write
def memory_write_forward(memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """bmn(slot_attention(...)): fused BMN, slot attention fused where it pays; WriteCache."""
    m, slot = gated_slot_attention_forward(
        memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask
    )
    y, norm = bmn_forward(m, v_bias)
    return y, WriteCache(slot, norm)


def memory_write_output(memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None):
    """Forward only: bmn(slot_attention(...)) without storing weights, (B, K, D)."""
    m = gated_slot_attention_output(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)
    return kernels.bmn_forward(m, v_bias)[0]


def memory_write_backward(cache: WriteCache, d_out):
    """(dmemory, dx, dwq, dwk, dwv, dv_bias): fused BMN backward, then slot attention's (gated)."""
    dm, dv_bias = bmn_backward(cache.bmn, d_out)
    return slot_attention_backward(cache.slot, dm) + (dv_bias,)


# ------------------------------------------------------------------ sparsify
def sparsify_forward(scores, *, k_top: int, eps: float = 1e-7, threshold_grad: bool = False):
    """Fused sparsifier for N >= 1 (the reference handles N = 0): (B, N), SparsifyCache."""
    if scores.shape[-1] == 0:
        return ref_sab.sparsify_forward(scores, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    w, active, at_thr, denom = kernels.sparsify_forward(scores, k_top, eps)
    return w, SparsifyCache(w, active, denom, at_thr, threshold_grad)


def sparsify_backward(cache: SparsifyCache, d_w):
    """(d_scores,) from the fused backward (the reference's for N = 0)."""
    if d_w.shape[-1] == 0:
        return ref_sab.sparsify_backward(cache, d_w)
    return (kernels.sparsify_backward(d_w, cache.w, cache.active, cache.at_threshold, cache.denom,
                                      cache.threshold_grad),)


# ------------------------------------------------------------------ sparse retrieve
def sparse_retrieve_forward(h_hat, memories, w1, w2, w3, *, k_top: int, eps: float = 1e-7,
                            threshold_grad: bool = False, block_score_grad: bool = False):
    """((s (B, Hd), weights (B, N)), RetrieveCache) with the fused sparsifier."""
    a, sc = ref_sab.sab_scores_forward(h_hat, memories, w1, w2, w3)
    w, sp = sparsify_forward(a, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    s = (w[:, None, :] @ memories)[:, 0, :]
    return (s, w), RetrieveCache(sc, sp, memories, w, block_score_grad)


def sparse_retrieve_backward(cache: RetrieveCache, grad_out):
    """(dh_hat, dmemories, dw1, dw2, dw3): the reference's chain with the fused sparsify backward."""
    ds, d_weights = grad_out
    k = cache
    dw = d_weights + (k.memories @ ds[:, :, None])[:, :, 0]
    dmem = k.w[:, :, None] * ds[:, None, :]
    (da,) = sparsify_backward(k.sparsify, dw)
    dh, dmem_score, dw1, dw2, dw3 = ref_sab.sab_scores_backward(k.scores, da)
    if k.block_score_grad:
        return cp.zeros_like(dh), dmem, dw1, dw2, dw3
    return dh, dmem + dmem_score, dw1, dw2, dw3


# op name -> (forward, backward, forward-only or None)
FUSED_OPS = {
    "bmn": (bmn_forward, bmn_backward, None),
    "slot_attention": (gated_slot_attention_forward, slot_attention_backward, gated_slot_attention_output),
    "memory_write": (memory_write_forward, memory_write_backward, memory_write_output),
    "sparsify": (sparsify_forward, sparsify_backward, None),
    "sparse_retrieve": (sparse_retrieve_forward, sparse_retrieve_backward, None),
}
