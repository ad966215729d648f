"""Sparse Attentive Backtracking retrieval: scores, the top-k sparsifier and the read.

Shapes: h_hat (B, Hd); memories (B, N, Hd); w1, w2 (Hd, A); w3 (A,); scores (B, N).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace, mT, ones

__all__ = [
    "sab_scores_forward",
    "sab_scores_backward",
    "sparsify_forward",
    "sparsify_backward",
    "sparse_retrieve_forward",
    "sparse_retrieve_backward",
    "kth_largest",
    "sparsify_with_threshold",
]


# ------------------------------------------------------------------ sab_scores
class ScoresCache(NamedTuple):
    h_hat: Any
    memories: Any
    w1: Any
    w2: Any
    w3: Any
    t: Any  # (B, N, A) tanh(m_i w1 + h_hat w2)


def sab_scores_forward(h_hat, memories, w1, w2, w3):
    """a_i = w3 . tanh(m_i w1 + h_hat w2) (SAB Alg. 1 lines 4-5; no biases): (B, N)."""
    xp = array_namespace(h_hat)
    t = xp.tanh(xp.matmul(memories, w1) + xp.matmul(h_hat, w2)[:, None, :])
    return xp.matmul(t, w3), ScoresCache(h_hat, memories, w1, w2, w3, t)


def sab_scores_backward(cache: ScoresCache, d_scores):
    """(dh_hat, dmemories, dw1, dw2, dw3).

    dpre = d_a w3 (1 - t^2) per (b, i); dm_i = dpre w1^T; dh_hat = (sum_i dpre) w2^T;
    dw1 = sum m_i^T dpre; dw2 = h_hat^T sum_i dpre; dw3 = sum_{b,i} d_a t.
    """
    k = cache
    xp = array_namespace(d_scores)
    b, n, a_dim = k.t.shape
    hd = k.memories.shape[-1]
    # Explicit sizes, not -1: a zero-size axis (N, A or Hd = 0) makes -1 ambiguous.
    dw3 = xp.matmul(xp.reshape(d_scores, (1, b * n)), xp.reshape(k.t, (b * n, a_dim)))[0, :]
    dpre = d_scores[..., None] * k.w3 * (1.0 - k.t * k.t)
    dmem = xp.matmul(dpre, mT(xp, k.w1))
    dw1 = xp.matmul(mT(xp, xp.reshape(k.memories, (b * n, hd))), xp.reshape(dpre, (b * n, a_dim)))
    dq = xp.sum(dpre, axis=1)
    return xp.matmul(dq, mT(xp, k.w2)), dmem, dw1, xp.matmul(mT(xp, k.h_hat), dq), dw3


# ------------------------------------------------------------------ sparsify
class SparsifyCache(NamedTuple):
    w: Any  # (B, N) weights
    active: Any  # (B, N) z > 0
    denom: Any  # (B, 1) sum z + eps (1 where that is 0)
    at_threshold: Any  # (B, N) entries equal to the threshold
    threshold_grad: bool


def sparsify_forward(scores, *, k_top: int, eps: float = 1e-7, threshold_grad: bool = False):
    """Top-k sparsifier (SAB Alg. 1 line 6), per row.

    tau_row = the min(k_top + 1, N)-th largest score, found by value (sorting), so ties
    change nothing; z = max(a - tau_row, 0) with relu'(0) = 0; w = z / (sum z + eps).
    N = 0 gives an empty (B, 0) result; N <= k_top leaves the weakest memory at 0, so a
    single memory gets weight 0 (our extension: the paper leaves N <= k_top undefined).
    """
    xp = array_namespace(scores)
    n = scores.shape[-1]
    if n == 0:
        empty = xp.zeros_like(scores)
        unit = ones(xp, (scores.shape[0], 1), scores)
        return empty, SparsifyCache(empty, empty > 0, unit, empty > 0, threshold_grad)
    return sparsify_with_threshold(scores, kth_largest(scores, min(k_top + 1, n)), eps, threshold_grad)


def kth_largest(scores, k: int):
    """(B, 1): the k-th largest entry of each row, by value (1 <= k <= N)."""
    xp = array_namespace(scores)
    n = scores.shape[-1]
    return xp.sort(scores, axis=-1)[:, n - k : n - k + 1]


def sparsify_with_threshold(scores, thr, eps: float, threshold_grad: bool):
    """The sparsifier for a given per-row threshold ``thr`` (B, 1)."""
    xp = array_namespace(scores)
    z = xp.maximum(scores - thr, 0.0)
    denom = xp.sum(z, axis=-1, keepdims=True) + eps
    # Only eps = 0 with every z = 0 gives a zero denominator; the weights are then 0.
    denom = xp.where(denom > 0, denom, xp.ones_like(denom))
    w = z / denom
    return w, SparsifyCache(w, z > 0, denom, scores == thr, threshold_grad)


def sparsify_backward(cache: SparsifyCache, d_w):
    """(d_scores,).

    dz = (d_w - <d_w, w>) / (sum z + eps); d_a = dz where z > 0, else 0.
    With threshold_grad, d tau = -sum(d_a) is shared equally by the entries equal to
    the threshold (the symmetric choice at a tie; exactly one entry when there is none).
    """
    k = cache
    xp = array_namespace(d_w)
    dz = (d_w - xp.sum(d_w * k.w, axis=-1, keepdims=True)) / k.denom
    da = xp.where(k.active, dz, xp.zeros_like(dz))
    if k.threshold_grad and d_w.shape[-1] > 0:
        ties = xp.where(k.at_threshold, xp.ones_like(d_w), xp.zeros_like(d_w))
        d_thr = -xp.sum(da, axis=-1, keepdims=True) / xp.sum(ties, axis=-1, keepdims=True)
        da = da + ties * d_thr
    return (da,)


# ------------------------------------------------------------------ sparse_retrieve
class RetrieveCache(NamedTuple):
    scores: ScoresCache
    sparsify: SparsifyCache
    memories: Any
    w: Any
    block_score_grad: bool


def sparse_retrieve_forward(
    h_hat, memories, w1, w2, w3, *, k_top: int, eps: float = 1e-7,
    threshold_grad: bool = False, block_score_grad: bool = False,
):
    """s = sum_i w_i m_i with w = sparsify(sab_scores(h_hat, memories)).

    Returns:
        ((s (B, Hd), weights (B, N)), cache).
    """
    xp = array_namespace(h_hat)
    a, sc = sab_scores_forward(h_hat, memories, w1, w2, w3)
    w, sp = sparsify_forward(a, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    s = xp.matmul(w[:, None, :], memories)[:, 0, :]
    return (s, w), RetrieveCache(sc, sp, memories, w, block_score_grad)


def sparse_retrieve_backward(cache: RetrieveCache, grad_out):
    """(dh_hat, dmemories, dw1, dw2, dw3) from (ds, dweights).

    dw = dweights + memories ds; dm_i += w_i ds (the value path); the score path runs
    sparsify and sab_scores backward. block_score_grad keeps the scorer's own weight
    gradients but stops the score path into h_hat and the memories.
    """
    ds, d_weights = grad_out
    k = cache
    xp = array_namespace(ds)
    dw = d_weights + xp.matmul(k.memories, ds[:, :, None])[:, :, 0]
    dmem = k.w[:, :, None] * ds[:, None, :]
    (da,) = sparsify_backward(k.sparsify, dw)
    dh, dmem_score, dw1, dw2, dw3 = sab_scores_backward(k.scores, da)
    if k.block_score_grad:
        return xp.zeros_like(dh), dmem, dw1, dw2, dw3
    return dh, dmem + dmem_score, dw1, dw2, dw3
