"""Release-compatible SAB retrieval in JAX (issue 14.4; docs/semantics.md,
"Release-compatible mode"): entries "release" of :data:`.sab_bank.SCORERS` and
:data:`.sab_bank.SPARSIFIERS`, selected by ``config.scorer`` / ``config.sparsify``.

* Scorer: ``a_i = w_score . tanh([h_hat; m_i])`` = ``tanh(m_i) . w_m + tanh(h_hat) . w_h``;
  the key of a memory is its one number ``tanh(m_i) . w_m`` (B, 1), stored at the write.
* Sparsifier: threshold = the k_top-th largest live score + eps, the index taken from
  ``lax.top_k`` (lower index first at a tie, the reference's stable order), its gradient
  (with ``threshold_grad``) going whole to that index; w = relu(a - thr) / (sum + eps);
  the raw scores of the live slots when n <= k_top.

Shapes: h_hat (B, Hd); keys (B, N_max, 1); scores (B, N_max); weights, ids (B, K) with
K = min(k_top + 1, N_max).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["release_key", "release_score", "release_sparsify"]


def release_key(params: Mapping[str, Any], m: jax.Array) -> jax.Array:
    """(B, 1): tanh(m) . w_score[Hd:] for memory m (B, Hd)."""
    hd = m.shape[-1]
    return (jnp.tanh(m) @ params["w_score"][hd:])[:, None]


def release_score(params: Mapping[str, Any], h_hat: jax.Array, keys: jax.Array) -> jax.Array:
    """(B, N): keys[..., 0] + tanh(h_hat) . w_score[:Hd]."""
    hd = h_hat.shape[-1]
    return keys[..., 0] + (jnp.tanh(h_hat) @ params["w_score"][:hd])[:, None]


def release_sparsify(
    scores: jax.Array, n: jax.Array, *, k_top: int, eps: float, threshold_grad: bool
) -> tuple[jax.Array, jax.Array]:
    """The release's sparsifier over the first ``n`` slots (see the module docstring).

    Returns:
        (weights (B, K), slot ids (B, K)); dead slots may appear with weight 0.
    """
    big = scores.shape[1]
    k_sel = min(k_top + 1, big)
    live = jnp.broadcast_to(jnp.arange(big) < n, scores.shape)
    masked = jnp.where(live, lax.stop_gradient(scores), -jnp.inf)
    _, idx = lax.top_k(masked, k_sel)
    picked = jnp.take_along_axis(scores, idx, axis=1)
    live_sel = jnp.take_along_axis(live, idx, axis=1)
    raw = jnp.where(live_sel, picked, jnp.zeros_like(picked))
    if big <= k_top:  # n <= N_max <= k_top: always the raw scores
        return raw, idx
    kth = picked[:, k_top - 1 : k_top]
    thr = (kth if threshold_grad else lax.stop_gradient(kth)) + eps
    diff = picked - thr
    active = live_sel & (lax.stop_gradient(diff) > 0)
    z = jnp.where(active, diff, jnp.zeros_like(diff))
    denom = jnp.sum(z, axis=-1, keepdims=True) + eps
    w = z / jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return jnp.where(n <= k_top, raw, w), idx
