"""The recurrent steps routing works on, and the per-step loss, in ``jax.numpy``.

``memformer_step``: r = memory_read(x_t, M_t), h = x_t + r, y_t = h,
M_{t+1} = memory_write(M_t, h). ``sab_step``: (h_hat, c) = lstm_cell(x_t, h, c),
(s, w) = sparse_retrieve(h_hat, memories), h = h_hat + s, y_t = h v1 + s v2 + b_y.
Both are pure functions of a parameter dict (names in :mod:`memcore.routing_types`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from memcore.backends.jax.attention import memory_read
from memcore.backends.jax.lstm import lstm_cell
from memcore.backends.jax.memory import memory_reset, memory_write
from memcore.backends.jax.sab import sparse_retrieve
from memcore.config import MemoryConfig, SABConfig
from memcore.routing_types import HEAD_PARAM

__all__ = ["memformer_step", "sab_step", "step_loss"]

Params = Mapping[str, jax.Array]


def memformer_step(
    params: Params,
    x: jax.Array,
    memory: jax.Array,
    *,
    config: MemoryConfig,
    token_mask: jax.Array | None = None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One Memformer memory step.

    Args:
        params: read_wq, read_wk, read_wv, read_wo, write_wq, write_wk, write_wv (D, D);
            v_bias (K, D).
        x: (B, L, D) the segment's tokens; memory: (B, K, D) M_t.
        config: K, D, H and tau. token_mask: (B, L) bool or None (write only).
        reset: (B,) bool or None: flagged rows of M_t become normalize(v_bias) first.

    Returns:
        (M_{t+1} (B, K, D), y_t (B, L, D)).
    """
    p = params
    if reset is not None:
        memory = memory_reset(memory, p["v_bias"], reset=reset)
    r = memory_read(
        x, memory, p["read_wq"], p["read_wk"], p["read_wv"], p["read_wo"], num_heads=config.heads
    )
    h = x + r
    m_next = memory_write(
        memory,
        h,
        p["write_wq"],
        p["write_wk"],
        p["write_wv"],
        p["v_bias"],
        num_heads=config.heads,
        tau=config.tau,
        token_mask=token_mask,
    )
    return m_next, h


def sab_step(
    params: Params,
    x: jax.Array,
    h: jax.Array,
    c: jax.Array,
    memories: jax.Array,
    *,
    config: SABConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of the SAB-augmented LSTM (SAB Alg. 1), without the memory append.

    Args:
        params: lstm_w (I+Hd, 4Hd), lstm_b (4Hd,), w1, w2 (Hd, A), w3 (A,),
            v1, v2 (Hd, O), b_y (O,).
        x: (B, I); h, c: (B, Hd) entering the step; memories: (B, N, Hd), N may be 0.

    Returns:
        (h (B, Hd), c (B, Hd), y (B, O)).
    """
    p = params
    h_hat, c = lstm_cell(x, h, c, p["lstm_w"], p["lstm_b"])
    s, _ = sparse_retrieve(
        h_hat,
        memories,
        p["w1"],
        p["w2"],
        p["w3"],
        k_top=config.k_top,
        eps=config.eps,
        threshold_grad=config.threshold_grad,
        block_score_grad=config.block_score_grad,
    )
    h = h_hat + s
    return h, c, h @ p["v1"] + s @ p["v2"] + p["b_y"]


def step_loss(params: Params, y: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """l_t: mean of (y - target)^2 over all elements ("mse"), or the mean over positions of
    the softmax cross-entropy of y @ head_w against integer class ids ("xent").

    Args:
        y: (..., Dy); target: like y (mse) or (...) integers (xent).
    """
    if kind == "mse":
        return jnp.mean(jnp.square(y - target))
    logits = y @ params[HEAD_PARAM] if HEAD_PARAM in params else y  # no head: y gives logits
    picked = jnp.take_along_axis(logits, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)
