"""Sparse Attentive Backtracking retrieval in ``jax.numpy``: scores, the top-k sparsifier
and the read.

Shapes: h_hat (B, Hd); memories (B, N, Hd); w1, w2 (Hd, A); w3 (A,); scores (B, N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._common import upcast_halves

__all__ = [
    "kth_largest",
    "relu0",
    "sab_scores",
    "sparse_retrieve",
    "sparsify",
    "sparsify_threshold",
]


@upcast_halves
def sab_scores(h_hat, memories, w1, w2, w3) -> jax.Array:
    """a_i = w3 . tanh(m_i w1 + h_hat w2) (SAB Alg. 1 lines 4-5; no biases): (B, N)."""
    return jnp.tanh(memories @ w1 + (h_hat @ w2)[:, None, :]) @ w3


def relu0(z: jax.Array) -> jax.Array:
    """max(z, 0) with derivative exactly 0 at z = 0 (the reference's relu'(0) = 0)."""
    return jnp.where(z > 0, z, jnp.zeros_like(z))


def kth_largest(scores: jax.Array, k: int) -> jax.Array:
    """(B, 1): the k-th largest entry of each row, by value (``lax.top_k`` values), 1 <= k <= N."""
    return lax.top_k(scores, k)[0][:, k - 1 : k]


def sparsify_threshold(scores: jax.Array, k: int, threshold_grad: bool) -> jax.Array:
    """The per-row threshold (B, 1): the k-th largest score.

    Its value is exactly the k-th largest (ties change nothing). Without
    ``threshold_grad`` it is a constant. With it, its gradient is shared equally by the
    entries equal to it: thr = sum(a * eq) / sum(eq), eq = (a == kth), whose forward value
    is replaced by the exact kth so that rounding in the mean cannot move it.
    """
    kth = lax.stop_gradient(kth_largest(scores, k))
    if not threshold_grad:
        return kth
    eq = (scores == kth).astype(scores.dtype)
    mean = jnp.sum(scores * eq, axis=-1, keepdims=True) / jnp.sum(eq, axis=-1, keepdims=True)
    return kth + (mean - lax.stop_gradient(mean))


@upcast_halves
def sparsify(scores, *, k_top: int, eps: float = 1e-7, threshold_grad: bool = False) -> jax.Array:
    """Top-k sparsifier (SAB Alg. 1 line 6), per row.

    tau_row = the min(k_top + 1, N)-th largest score; z = relu(a - tau_row) with
    relu'(0) = 0; w = z / (sum z + eps) (a zero denominator, only with eps = 0 and every
    z = 0, gives w = 0). N = 0 gives an empty (B, 0) result.

    Args:
        scores: (B, N).

    Returns:
        weights (B, N).
    """
    n = scores.shape[-1]
    if n == 0:
        return jnp.zeros_like(scores)
    k = min(k_top + 1, n)
    thr = sparsify_threshold(scores, k, threshold_grad)
    # Which entries are active is decided by comparing values, not by the sign of
    # scores - thr: XLA may fuse the scores' last multiply into that subtraction as an FMA,
    # which leaves the threshold entry itself a sub-ulp z instead of exactly 0. Inactive
    # entries (the threshold and below) get z = 0 and derivative 0 (relu'(0) = 0).
    active = scores > lax.stop_gradient(kth_largest(scores, k))
    z = jnp.where(active, scores - thr, jnp.zeros_like(scores))
    denom = jnp.sum(z, axis=-1, keepdims=True) + eps
    denom = jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return z / denom


@upcast_halves
def sparse_retrieve(
    h_hat,
    memories,
    w1,
    w2,
    w3,
    *,
    k_top: int,
    eps: float = 1e-7,
    threshold_grad: bool = False,
    block_score_grad: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """s = sum_i w_i m_i with w = sparsify(sab_scores(h_hat, memories)).

    ``block_score_grad`` stops the score path into h_hat and the memories; the scorer's
    own weights keep their gradient and the value path m_i -> s is untouched.

    Returns:
        (s (B, Hd), weights (B, N)).
    """
    if block_score_grad:
        a = sab_scores(lax.stop_gradient(h_hat), lax.stop_gradient(memories), w1, w2, w3)
    else:
        a = sab_scores(h_hat, memories, w1, w2, w3)
    w = sparsify(a, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    s = jnp.einsum("bn,bnh->bh", w, memories)
    return s, w
