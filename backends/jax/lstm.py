"""The LSTM cell SAB is built on, in ``jax.numpy``.

Shapes: x (B, I); h, c (B, Hd); w (I + Hd, 4 Hd); b (4 Hd,). Gate order (i, f, g, o).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memcore.backends.jax._common import upcast_halves

__all__ = ["lstm_cell"]


@upcast_halves
def lstm_cell(x, h, c, w, b) -> tuple[jax.Array, jax.Array]:
    """One LSTM step: z = [x, h] w + b split into (i, f, g, o);
    c' = sig(f) c + sig(i) tanh(g); h_hat = sig(o) tanh(c').

    Returns:
        (h_hat, c'), both (B, Hd).
    """
    hd = h.shape[-1]
    z = jnp.concatenate([x, h], axis=-1) @ w + b
    i = jax.nn.sigmoid(z[:, :hd])
    f = jax.nn.sigmoid(z[:, hd : 2 * hd])
    g = jnp.tanh(z[:, 2 * hd : 3 * hd])
    o = jax.nn.sigmoid(z[:, 3 * hd :])
    c_new = f * c + i * g
    return o * jnp.tanh(c_new), c_new
